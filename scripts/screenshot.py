"""Take the README's picture of the dashboard from a real run.

A real federation on this machine, as the demo runs it (a coordinator, reference
selectors and clients as processes, training on scikit-learn's digits), for
``--rounds`` rounds, each evaluated on the digits test set as the demo does; then
Debian's chromium, driven by Playwright as the browser tests drive it
(``tests/helpers/browser.py``), opens the coordinator's dashboard, waits until it
shows every round and the last round's metrics, and saves a PNG. The coordinator is
left in the selection of the next round (its clients are done), so the page is live.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import trio
import trio_websocket

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers.browser import chromium_page  # the tests' browser, with their options

from fl_coordinator.config import default_settings
from fl_coordinator.federation.data import split_digits, write_shards
from fl_coordinator.federation.demo import EVALUATE
from fl_coordinator.federation.local import LocalFederation
from fl_coordinator.federation.training import Hyper
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.problem import init_problem


async def _until_completed(status_url: str, rounds: int) -> None:
    async with trio_websocket.open_websocket_url(status_url) as ws:
        while True:
            message = json.loads(await ws.get_message())
            if message["stage"] == "FAILED":
                raise SystemExit(f"round {message['round']} failed: {message.get('error')}")
            if message["round"] > rounds:
                return


def _shoot(url: str, rounds: int, out: Path) -> None:
    from playwright.sync_api import expect

    with chromium_page() as page:
        page.set_viewport_size({"width": 1280, "height": 860})
        page.goto(url)
        expect(page.locator("#connection")).to_have_text("live")
        expect(page.locator("#history-count")).to_have_text(f"({rounds} rounds)")
        expect(page.locator("#aggregation-chart .uplot")).to_have_count(1)
        expect(page.locator("#metrics-chart .uplot")).to_have_count(1)
        expect(page.locator("#metrics-now")).to_contain_text(f"metrics of round {rounds}:")
        page.screenshot(path=str(out), full_page=True)


async def _main(rounds: int, clients: int, selectors: int, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="fl-screenshot-") as folder:
        root = Path(folder) / "demo"
        split = split_digits(clients)
        shards = write_shards(split, root / "clients")
        init_problem(Layout.from_settings(default_settings().replace(fl_root_path=str(root))))
        federation = LocalFederation(
            root,
            selectors,
            shards,
            rounds,
            Hyper(epochs=1),
            "digits-demo",
            coordinator_env={"EVALUATE": EVALUATE},  # the demo's: the metrics chart has lines
        )
        async with federation.running() as endpoints:
            with trio.fail_after(60 * rounds):
                await _until_completed(endpoints.status_url, rounds)
            page = endpoints.status_url.replace("ws://", "http://").removesuffix("/status") + "/"
            await trio.to_thread.run_sync(_shoot, page, rounds, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--selectors", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    args = parser.parse_args()
    trio.run(_main, args.rounds, args.clients, args.selectors, args.out)
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
