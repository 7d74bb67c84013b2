// The coordinator's dashboard: the live round from the websocket (/status), the history
// from GET /rounds. No framework and no network beyond the coordinator: the charts are
// uPlot (vendored next to this file). Every value from the coordinator is put in the
// page as text (textContent), never as markup: selector ids and reasons are untrusted.
"use strict";
(() => {
  const ENDED = new Set(["COMPLETED", "FAILED", "FINISHED"]);
  const HISTORY_ROWS = 50; // rows of the rounds table (the charts take every round)
  const PROBLEM_ROWS = 30;
  const FETCH_LIMIT = 1000; // GET /rounds' largest page
  const RETRY_FIRST = 500, RETRY_MAX = 5000; // ms between reconnection attempts
  const TOKEN_KEY = "fl-coordinator-status-token";

  const $ = (id) => document.getElementById(id);
  const base = new URL(".", location.href);
  const records = new Map(); // round number -> record from /rounds
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let socket = null;
  let retry = RETRY_FIRST;
  let latest = null;
  let drawPending = false;
  const charts = {};

  class Unauthorized extends Error {}

  function setState(state, text) {
    const node = $("connection");
    node.dataset.state = state;
    node.textContent = text || state;
  }

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function seconds(time) {
    return Date.parse(time) / 1000;
  }

  function clock(time) {
    return time ? new Date(time).toLocaleTimeString() : "-";
  }

  function span(s) {
    if (s === null || s === undefined || Number.isNaN(s)) return "-";
    return s < 10 ? s.toFixed(2) + " s" : s < 600 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
  }

  // [stage, began, seconds or null while under way], the ended stage left out.
  function stageSpans(stages, now) {
    const entries = Object.entries(stages || {});
    const found = [];
    entries.forEach(([stage, began], index) => {
      if (ENDED.has(stage)) return;
      const next = entries[index + 1];
      const end = next ? seconds(next[1]) : now;
      found.push([stage, began, end === null ? null : end - seconds(began)]);
    });
    return found;
  }

  async function getJSON(path) {
    const headers = token ? { authorization: "Bearer " + token } : {};
    const response = await fetch(new URL(path, base), { headers, cache: "no-store" });
    if (response.status === 401) throw new Unauthorized();
    if (!response.ok) throw new Error(path + ": HTTP " + response.status);
    return response.json();
  }

  function base64url(text) {
    const bytes = new TextEncoder().encode(text);
    let binary = "";
    bytes.forEach((b) => (binary += String.fromCharCode(b)));
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function askForToken(wrong) {
    setState("locked", "token needed");
    $("token-form").hidden = false;
    $("token-error").textContent = wrong ? "That token was refused." : "";
    $("token").focus();
  }

  // -- the current round -------------------------------------------------------------

  function selectorState(message, id) {
    if (id in message.rejected) return "rejected";
    for (const state of ["reported", "unreachable", "configured"]) {
      if (message[state].includes(id)) return state;
    }
    return "selected";
  }

  function metricsText(values) {
    return Object.entries(values || {})
      .map(([name, value]) => name + " " + value.toPrecision(4))
      .join(", ");
  }

  function showStatus(message) {
    latest = message;
    $("problem").textContent = message.problem_id;
    document.title = message.problem_id + ": round " + message.round + " " + message.stage;
    $("round").textContent = message.round;
    const stage = $("stage");
    stage.textContent = message.stage;
    stage.className = "stage outcome-" + message.stage;
    $("aggregating").hidden = !message.aggregating;
    $("stage-started").textContent = clock(message.stage_started);
    const list = $("stages");
    list.replaceChildren();
    const ended = ENDED.has(message.stage) ? seconds(message.stage_started) : Date.now() / 1000;
    for (const [name, , took] of stageSpans(message.stages, ended)) {
      const item = el("li", name + " " + span(took));
      item.dataset.stage = name;
      if (name === message.stage || (name === "AGGREGATING" && message.aggregating)) {
        item.classList.add("current");
      }
      list.append(item);
    }
    $("clients").textContent = message.accepted + " / " + message.goal;
    $("clients-bar").max = Math.max(message.goal, 1);
    $("clients-bar").value = message.accepted;
    $("held").textContent = message.held ? message.held + " held for the next round" : "";
    const rows = [];
    const ids = [...message.selectors];
    for (const id of Object.keys(message.rejected)) if (!ids.includes(id)) ids.push(id);
    for (const id of ids) {
      const state = selectorState(message, id);
      const row = el("tr");
      row.dataset.selector = id;
      row.dataset.state = state;
      row.append(el("td", id), el("td", state, "fate-" + state), el("td", message.rejected[id] || ""));
      rows.push(row);
    }
    if (!rows.length) {
      const empty = el("td", "no selector holds a client of this round yet", "muted");
      empty.colSpan = 3;
      rows.push(el("tr"));
      rows[0].append(empty);
    }
    $("selectors").tBodies[0].replaceChildren(...rows);
    $("round-error").textContent = message.error || "";
    $("finished").textContent = message.finished || "";
    const metrics = message.metrics;
    $("metrics-now").textContent = metrics
      ? "metrics of round " + metrics.round + ": " + metricsText(metrics.values)
      : "";
  }

  // -- the history ---------------------------------------------------------------------

  function scheduleDraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      drawHistory();
      drawCharts();
    });
  }

  function newestFirst() {
    return [...records.values()].sort((a, b) => b.round - a.round);
  }

  function bar(record) {
    const spans = stageSpans(record.stages, seconds(record.ended));
    const total = spans.reduce((sum, [, , s]) => sum + s, 0) || 1;
    const node = el("div", undefined, "bar");
    for (const [name, , s] of spans) {
      const part = el("span", undefined, "s-" + name);
      part.style.width = (100 * s) / total + "%";
      part.title = name + " " + span(s);
      node.append(part);
    }
    return node;
  }

  function drawHistory() {
    const sorted = newestFirst();
    $("history-count").textContent = "(" + sorted.length + " rounds)";
    const rows = sorted.slice(0, HISTORY_ROWS).map((record) => {
      const row = el("tr");
      row.dataset.round = record.round;
      row.dataset.outcome = record.outcome;
      const first = Object.values(record.stages)[0];
      const cells = [
        el("td", record.round),
        el("td", record.outcome, "outcome-" + record.outcome),
        el("td", record.accepted + "/" + record.goal),
        el("td"),
        el("td", span(first ? seconds(record.ended) - seconds(first) : null)),
        el("td", metricsText(record.metrics), "metrics"),
      ];
      cells[3].append(bar(record));
      row.append(...cells);
      return row;
    });
    $("history").tBodies[0].replaceChildren(...rows);

    const problems = [];
    for (const record of sorted) {
      if (problems.length >= PROBLEM_ROWS) break;
      if (record.error) {
        const item = el("li", "round " + record.round + " " + record.outcome + ": " + record.error, "error");
        item.dataset.round = record.round;
        problems.push(item);
      }
      for (const fate of record.selectors) {
        if (fate.fate !== "rejected" && fate.fate !== "unreachable") continue;
        const text = "round " + record.round + ": " + fate.selector + " " + fate.fate;
        const item = el("li", fate.reason ? text + ": " + fate.reason : text);
        item.dataset.round = record.round;
        item.dataset.selector = fate.selector;
        problems.push(item);
      }
    }
    if (!problems.length) problems.push(el("li", "none in the rounds shown", "muted"));
    $("problems").replaceChildren(...problems.slice(0, PROBLEM_ROWS));
  }

  // One uPlot per chart, made again only when its series change.
  function plot(id, names, data) {
    const container = $(id);
    const key = names.join("\u0000");
    const width = Math.max(container.clientWidth, 200);
    if (charts[id] && charts[id].key === key) {
      charts[id].chart.setData(data);
      return;
    }
    if (charts[id]) charts[id].chart.destroy();
    const palette = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#9a6700", "#bf3989"];
    const chart = new uPlot(
      {
        width,
        height: 200,
        scales: { x: { time: false } },
        axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000] }, {}],
        series: [
          { label: "round" },
          ...names.map((name, i) => ({ label: name, stroke: palette[i % palette.length], width: 1.5, spanGaps: true })),
        ],
      },
      data,
      container,
    );
    charts[id] = { key, chart };
  }

  function drawCharts() {
    const ordered = newestFirst().reverse();
    const xs = ordered.map((r) => r.round);
    plot("aggregation-chart", ["aggregation s"], [xs, ordered.map((r) => r.aggregation_seconds ?? null)]);
    const names = [];
    for (const record of ordered) {
      for (const name of Object.keys(record.metrics || {})) if (!names.includes(name)) names.push(name);
    }
    $("metrics-empty").hidden = names.length > 0;
    $("metrics-chart").hidden = names.length === 0;
    if (names.length) {
      plot("metrics-chart", names, [xs, ...names.map((n) => ordered.map((r) => (r.metrics || {})[n] ?? null))]);
    }
  }

  function keep(page) {
    for (const record of page.rounds) {
      if (!record.metrics && streamed.has(record.round)) record.metrics = streamed.get(record.round);
      records.set(record.round, record);
    }
    scheduleDraw();
  }

  // Pages follow next_before: a page is at most FETCH_LIMIT records and about 1 MB
  // (a round of many selectors is a large record).
  async function loadHistory() {
    records.clear();
    let path = "rounds?limit=" + FETCH_LIMIT;
    for (let fetched = 0; ; ) {
      const page = await getJSON(path);
      keep(page);
      fetched += page.rounds.length;
      if (page.next_before === null || fetched >= FETCH_LIMIT) break;
      path = "rounds?limit=" + (FETCH_LIMIT - fetched) + "&before=" + page.next_before;
    }
  }

  async function refreshRecent() {
    try {
      keep(await getJSON("rounds?limit=10"));
    } catch (error) {
      console.warn("rounds", error);
    }
  }

  // -- the live stream -----------------------------------------------------------------

  function wantsRecords(message) {
    return ENDED.has(message.stage) && !records.has(message.round);
  }

  // A round's metrics come after its record (the evaluation runs once the round has
  // ended) and the stream carries them: put them in the record at once, rather than
  // fetching /rounds again, which may not have them yet.
  // (Kept by round for a record fetched later; only the latest few are needed.)
  // Evaluations end in round order and the server's records have a round's metrics by
  // the time the stream shows them: a recent completed round still without metrics (its
  // message was missed, say while reconnecting) is fetched again.
  const streamed = new Map();
  const refetched = new Set();  // rounds fetched again for their metrics (the last 10)
  function takeMetrics(message) {
    const metrics = message.metrics;
    if (!metrics || streamed.has(metrics.round)) return;
    streamed.set(metrics.round, metrics.values);
    if (streamed.size > 10) streamed.delete(streamed.keys().next().value);
    const record = records.get(metrics.round);
    if (record && !record.metrics) {
      record.metrics = metrics.values;
      scheduleDraw();
    }
    const missed = [...records.values()].filter((r) => r.round < metrics.round
      && r.round >= metrics.round - 10 && r.outcome === "COMPLETED" && !r.metrics
      && !refetched.has(r.round));  // once: a round whose evaluation failed never has any
    for (const n of refetched) if (n < metrics.round - 10) refetched.delete(n);
    for (const r of missed) refetched.add(r.round);
    if (missed.length) refreshRecent();
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const protocols = ["fl-status"];
    if (token) protocols.push("bearer." + base64url(token));
    socket = new WebSocket(scheme + "//" + location.host + "/status", protocols);
    socket.onopen = () => {
      retry = RETRY_FIRST;
      setState("live");
    };
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      showStatus(message);
      takeMetrics(message);
      if (wantsRecords(message)) refreshRecent();
    };
    socket.onclose = () => {
      socket = null;
      setState("reconnecting");
      setTimeout(start, retry);
      retry = Math.min(retry * 2, RETRY_MAX);
    };
  }

  // The history first (it also tells whether a token is needed), then the stream.
  async function start() {
    try {
      await loadHistory();
    } catch (error) {
      if (error instanceof Unauthorized) {
        askForToken(Boolean(token));
        return;
      }
      setState("reconnecting");
      setTimeout(start, retry);
      retry = Math.min(retry * 2, RETRY_MAX);
      return;
    }
    $("token-form").hidden = true;
    connect();
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value;
    sessionStorage.setItem(TOKEN_KEY, token);
    start();
  });

  window.addEventListener("resize", () => {
    for (const { chart } of Object.values(charts)) {
      chart.setSize({ width: Math.max(chart.root.parentElement.clientWidth, 200), height: 200 });
    }
  });

  // The stages under way grow by the second between messages.
  setInterval(() => {
    if (latest && !ENDED.has(latest.stage)) showStatus(latest);
  }, 1000);

  start();
})();
