"""Settings: the Go coordinator's YAML keys plus ours, overridable by environment.

Every key is declared once in :data:`KEYS` with its default, its parser and a
one-line meaning; the loader, the error messages and the README's
configuration table all come from that one list, so they cannot drift apart.
Values are validated once, at start-up, and the result is frozen: nothing
later in the program has to wonder whether a port is numeric.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .core.stopping import StopWhen, decimal
from .core.strategy import COMBINATIONS, STRATEGIES
from .errors import ConfigError
from .untrusted_text import cut

__all__ = [
    "KEYS",
    "MAX_CONFIG_BYTES",
    "Key",
    "Parser",
    "Settings",
    "check_not_placeholder",
    "default_settings",
    "load_settings",
    "misspelt_environment",
    "optional_token",
    "read_config_file",
    "similar_key",
    "warn_misspelt_environment",
]

_log = logging.getLogger(__name__)

Parser = Callable[[Any], Any]


class _Redacted:
    """Stands for a secret value in error messages: a bad token must not be echoed."""

    def __repr__(self) -> str:
        return "<redacted>"


_REDACTED = _Redacted()


class _Shown:
    """Stands for a bad value in an error message: its repr, cut as untrusted text is
    (:func:`.untrusted_text.cut`): a mistake is recognisable in it, and a 20 MB value
    pasted by mistake is not a 20 MB line in the log or on the terminal."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __repr__(self) -> str:
        return cut(repr(self.value))


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    text = value.strip() if isinstance(value, str) else ""
    if text.lstrip("+-").isascii() and text.lstrip("+-").isdigit():  # int() reads any digits
        return int(text)
    raise ValueError


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str):
        return decimal(value)  # ASCII: float() also reads fullwidth digits and "1_000"
    number = float(value)
    if not math.isfinite(number):
        raise ValueError
    return number


def _checked(convert: Callable[[Any], Any], ok: Callable[[Any], bool]) -> Parser:
    """A parser that converts a value, then insists that ``ok`` holds for it."""

    def parse(value: Any) -> Any:
        number = convert(value)
        if not ok(number):
            raise ValueError
        return number

    return parse


_port = _checked(_integer, lambda n: 0 <= n <= 65535)
_positive_int = _checked(_integer, lambda n: n >= 1)
_non_negative_int = _checked(_integer, lambda n: n >= 0)
_positive_seconds = _checked(_number, lambda n: n > 0)
_seconds_or_zero = _checked(_number, lambda n: n >= 0)
_fraction = _checked(_number, lambda n: 0 < n <= 1)
_decay = _checked(_number, lambda n: 0 <= n < 1)
_positive = _checked(_number, lambda n: n > 0)
_non_negative = _checked(_number, lambda n: n >= 0)


def _path(value: Any) -> str:
    """A path, not empty: any characters, as a path on Linux may hold bytes that are not UTF-8
    (``os.environ`` hands them over as surrogate escapes, which give the OS the same bytes)."""
    if not isinstance(value, str | int) or isinstance(value, bool) or str(value).strip() == "":
        raise ValueError
    return str(value).strip()


#: Characters no text value may hold: controls (Cc: newlines, ESC), surrogates (Cs: bytes
#: that are not UTF-8), line and paragraph separators (Zl, Zp), and the bidi controls that
#: reorder the rest of a log line (embeddings, overrides, isolates).
_NOT_TEXT_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_BIDI_CONTROLS = frozenset(map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))


def _text(value: Any) -> str:
    """Text that is not a path, not empty: Unicode without controls or line breaks.

    It travels in status messages (JSON), Prometheus labels, protobuf strings
    and log lines, which hold Unicode text: an environment value with bytes
    that are not UTF-8 (``PROBLEM_ID=$'prob\\xff'``) made every metrics scrape
    fail with a UnicodeEncodeError traceback. Other format characters are
    text: a Persian word holds a zero-width non-joiner, an emoji sequence a
    zero-width joiner, a Japanese name an ideographic space (all refused by
    ``str.isprintable``).
    """
    text = _path(value)
    if any(c in _BIDI_CONTROLS or unicodedata.category(c) in _NOT_TEXT_CATEGORIES for c in text):
        raise ValueError
    return text


def _file_name(value: Any) -> str:
    """A file or folder name relative to the root; the Go keys carry stray slashes."""
    name = _path(value)
    if "\0" in name or ".." in Path(name.strip("/")).parts or name.strip("/") == "":
        raise ValueError
    return name


def _address(value: Any) -> str:
    """``host:port`` as the Go system writes it."""
    host, sep, number = _text(value).rpartition(":")
    if not sep or not host:
        raise ValueError
    _port(number)
    return f"{host}:{number}"


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0", ""})


def _flag(value: Any) -> bool:
    """A YAML boolean, or its spelling in an environment variable (``true``/``false``, ...)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str | int) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError


def _optional_port(value: Any) -> int | None:
    """A port, or None (off) for an empty value."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    return _port(value)


def _optional_url(value: Any) -> str:
    if value is None or value == "":
        return ""
    url = _text(value)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError
    return url


def _optional_path(value: Any) -> str:
    """A file path, or empty for "not set" (whether it is readable is checked by its user)."""
    if value is None or value == "":
        return ""
    path = _path(value)
    if "\0" in path:
        raise ValueError
    return path


def optional_token(value: Any) -> str:
    """A shared secret: printable ASCII without spaces (it travels in an HTTP header), or empty."""
    if value is None or value == "":
        return ""
    token = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else None
    if token is None or not 1 <= len(token) <= 4096:
        raise ValueError
    if not all(0x21 <= ord(char) <= 0x7E for char in token):
        raise ValueError
    return token


#: Values that stand in for a secret in examples and shipped manifests, compared in lower
#: case without punctuation ("Change-Me" is "changeme"): a coordinator must not run with one.
_PLACEHOLDERS = frozenset(
    [
        "changeme",
        "changeit",
        "replaceme",
        "secret",
        "password",
        "passw0rd",
        "token",
        "authtoken",
        "statustoken",
        "mytoken",
        "yourtoken",
        "example",
        "test",
        "testing",
        "default",
        "admin",
        "todo",
        "fixme",
        "placeholder",
        "none",
        "null",
        "undefined",
        "empty",
        "insecure",
        "letmein",
        "123456",
        "12345678",
        "qwerty",
    ]
)


def check_not_placeholder(key: str, token: str) -> None:
    """Refuse a well-known placeholder as the secret of ``key`` (ConfigError, exit status 2).

    ``AUTH_TOKEN=change-me`` is what a copied example or an unedited manifest
    leaves: anyone who read the same example could call the coordinator.
    """
    folded = "".join(char for char in token.lower() if char.isalnum())
    if folded in _PLACEHOLDERS:
        raise ConfigError(
            key,
            token,
            "a secret, not a well-known placeholder: make one with `openssl rand -hex 24`",
        )


def _selector_ids(value: Any) -> tuple[str, ...]:
    """Selector ids (``host:port``): a YAML list or a comma-separated string; empty = any."""
    if value is None or value == "":
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError
    ids = tuple(_address(item) for item in items if str(item).strip())
    if len(set(ids)) != len(ids):
        raise ValueError
    return ids


def _choice(*names: str) -> Parser:
    """One of ``names`` (any case)."""

    def parse(value: Any) -> str:
        name = _text(value).lower()
        if name not in names:
            raise ValueError
        return name

    return parse


def _optional_number(parse: Parser) -> Parser:
    """``parse``, or None (the default of another setting) for an empty value."""

    def optional(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip() == ""):
            return None
        return parse(value)

    return optional


def _function(value: Any) -> str:
    """``package.module:function``, or empty (not set)."""
    if value is None or value == "":
        return ""
    text = _text(value)
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", text):
        raise ValueError
    return text


def _condition(value: Any) -> str:
    """A STOP_WHEN condition (``accuracy>=0.95``), normalised, or empty (not set)."""
    if value is None or value == "":
        return ""
    return str(StopWhen.parse(_text(value)))


def _log_level(value: Any) -> str:
    level = _text(value).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError
    return level


def _log_format(value: Any) -> str:
    name = _text(value).lower()
    if name not in ("text", "json"):
        raise ValueError
    return name


@dataclass(frozen=True)
class Key:
    """One configuration key: its name, default, parser and meaning."""

    name: str
    default: Any
    parse: Parser
    expected: str
    meaning: str
    go: bool = False  # a key of the Go coordinator (kept for drop-in compatibility)
    secret: bool = False  # never echoed in errors, logs or the settings' repr

    @property
    def field(self) -> str:
        return self.name.lower()


KEYS: tuple[Key, ...] = (
    Key(
        "FL_ROOT_PATH",
        "./data",
        _path,
        "a folder path",
        "Shared storage of this FL problem (the Go default was `../data`).",
        go=True,
    ),
    Key(
        "INIT_FILES_PATH",
        "initFiles/",
        _file_name,
        "a folder name under FL_ROOT_PATH",
        "Folder whose every file selectors send to their clients.",
        go=True,
    ),
    Key(
        "MODEL_FILE",
        "model.h5",
        _file_name,
        "a file name",
        "Keras model (architecture + initial weights) in INIT_FILES_PATH; read only.",
        go=True,
    ),
    Key(
        "CHECKPOINT_FILE",
        "fl_checkpoint",
        _file_name,
        "a file name",
        "Global weights (HDF5) in INIT_FILES_PATH; replaced atomically after each round.",
        go=True,
    ),
    Key(
        "AGG_CHECKPOINT_FILE_PATH",
        "/fl_agg_checkpoint",
        _file_name,
        "a file name",
        "A selector's aggregate, under FL_ROOT_PATH/<selector-id>.",
        go=True,
    ),
    Key(
        "AGG_CHECKPOINT_WEIGHT_PATH",
        "/fl_agg_checkpoint_weight",
        _file_name,
        "a file name",
        "A selector's total weight (decimal integer text), under FL_ROOT_PATH/<selector-id>.",
        go=True,
    ),
    Key(
        "ESTIMATED_WAITING_TIME",
        20000,
        _non_negative_int,
        "an integer >= 0 (milliseconds)",
        "Reconnection hint for refused clients, in ms (used by selectors).",
        go=True,
    ),
    Key(
        "CHECKIN_LIMIT",
        2,
        _positive_int,
        "an integer >= 1",
        "Goal count: clients accepted per round.",
        go=True,
    ),
    Key(
        "WEBSERVER_ADDRESS",
        "localhost:50052",
        _address,
        "host:port",
        "The legacy webserver's FlStatus server: with LEGACY_STATUS_PUSH, each stage change is "
        "pushed there; otherwise unused (the status stream is served on STATUS_PORT).",
        go=True,
    ),
    Key(
        "PORT",
        50050,
        _port,
        "a port number 0-65535 (0 = any free port)",
        "gRPC port (FlIntra) for selectors.",
        go=True,
    ),
    Key(
        "PROBLEM_ID",
        "DEFAULT",
        _text,
        "a non-empty string of Unicode text (UTF-8; no controls or line breaks)",
        "Name of the FL problem, carried in every status message.",
        go=True,
    ),
    Key(
        "HOST",
        "0.0.0.0",
        _text,
        "an interface address or host name",
        "Listen address of the gRPC and status servers.",
    ),
    Key(
        "STATUS_PORT",
        50052,
        _port,
        "a port number 0-65535 (0 = any free port)",
        "Websocket status stream (`ws://HOST:STATUS_PORT/status`).",
    ),
    Key(
        "METRICS_PORT",
        "",
        _optional_port,
        "a port number 0-65535 (0 = any free port) or empty (off)",
        "Prometheus metrics at `http://HOST:METRICS_PORT/metrics`; empty: not served.",
    ),
    Key(
        "WEBHOOK_URL",
        "",
        _optional_url,
        "an http(s) URL or empty",
        "If set, every status message is also POSTed there as JSON.",
    ),
    Key(
        "LEGACY_STATUS_PUSH",
        False,
        _flag,
        "true or false",
        "Push each stage change as FlStatus/RoundStatus to WEBSERVER_ADDRESS, as the Go "
        "coordinator did (off: the Go default address is this coordinator's STATUS_PORT).",
    ),
    Key(
        "GOAL_COUNT_TIMEOUT",
        10.0,
        _positive_seconds,
        "a number of seconds > 0",
        "Time limit of each GoalCountReached call to a selector.",
    ),
    Key(
        "KEEP_CHECKPOINTS",
        5,
        _positive_int,
        "an integer >= 1",
        "Global checkpoints kept (by round) in FL_ROOT_PATH/.coordinator/history for rollback.",
    ),
    Key(
        "ROUND_HISTORY",
        2000,
        _positive_int,
        "an integer >= 1",
        "Rounds kept in FL_ROOT_PATH/.coordinator/rounds.jsonl and served by GET /rounds.",
    ),
    Key(
        "GOAL_COUNT_RETRIES",
        2,
        _non_negative_int,
        "an integer >= 0",
        "Retries of a failed GoalCountReached call (waits of 1 s, 2 s, 4 s, ... plus jitter) "
        "before the selector is dropped from the round.",
    ),
    Key(
        "SELECTION_TIMEOUT",
        0.0,
        _seconds_or_zero,
        "a number of seconds >= 0",
        "Selection window, in seconds (0 = wait for the goal forever, as the Go coordinator).",
    ),
    Key(
        "MIN_CHECKIN_FRACTION",
        0.5,
        _fraction,
        "a fraction in (0, 1]",
        "When the selection window closes, the round goes on if at least this fraction of "
        "the goal checked in; otherwise it is abandoned.",
    ),
    Key(
        "REPORTING_TIMEOUT",
        600.0,
        _seconds_or_zero,
        "a number of seconds >= 0",
        "Reporting window, in seconds from the goal being reached (0 = no limit); also how "
        "long an aggregation waits for another process's lock on the global checkpoint.",
    ),
    Key(
        "MIN_REPORTING_FRACTION",
        0.5,
        _fraction,
        "a fraction in (0, 1]",
        "Aggregate only if the selectors with usable reports held at least this fraction of "
        "the round's clients; otherwise the round is abandoned.",
    ),
    Key("LOG_LEVEL", "INFO", _log_level, "DEBUG, INFO, WARNING or ERROR", "Log verbosity."),
    Key(
        "LOG_FORMAT",
        "text",
        _log_format,
        "text or json",
        "Log lines for people (`text`) or one JSON object per line (`json`).",
    ),
    Key(
        "TLS_CERT_FILE",
        "",
        _optional_path,
        "a PEM certificate file or empty",
        "Certificate (PEM, chain first) of the gRPC server and the status websocket; "
        "empty = plaintext. Needs TLS_KEY_FILE.",
    ),
    Key(
        "TLS_KEY_FILE",
        "",
        _optional_path,
        "a PEM private key file or empty",
        "Private key (PEM) of TLS_CERT_FILE.",
    ),
    Key(
        "TLS_CLIENT_CA_FILE",
        "",
        _optional_path,
        "a PEM CA bundle file or empty",
        "Mutual TLS: only gRPC clients with a certificate from this CA may connect (needs "
        "TLS_CERT_FILE).",
    ),
    Key(
        "TLS_SELECTOR_CA_FILE",
        "",
        _optional_path,
        "a PEM CA bundle file or empty",
        "If set, GoalCountReached calls to selectors use TLS and trust this CA; empty = "
        "plaintext calls.",
    ),
    Key(
        "AUTH_TOKEN",
        "",
        optional_token,
        "printable ASCII without spaces, or empty",
        "Shared secret selectors send as `authorization: Bearer <token>` on every gRPC call "
        "(except the health check); empty = no token required.",
        secret=True,
    ),
    Key(
        "AUTH_TOKEN_FILE",
        "",
        _optional_path,
        "a file holding the token, or empty",
        "File holding AUTH_TOKEN (first line), e.g. a mounted secret; not with AUTH_TOKEN.",
    ),
    Key(
        "ALLOWED_SELECTORS",
        "",
        _selector_ids,
        "distinct selector ids (host:port), comma-separated or a YAML list",
        "If set, only these selector ids may check in or report; empty = any.",
    ),
    Key(
        "STATUS_TOKEN",
        "",
        optional_token,
        "printable ASCII without spaces, or empty",
        "If set, status subscribers must send `Authorization: Bearer <token>` on the "
        "websocket handshake (else HTTP 401).",
        secret=True,
    ),
    Key(
        "GRPC_MAX_MESSAGE_BYTES",
        4 * 1024 * 1024,
        _positive_int,
        "an integer >= 1 (bytes)",
        "Largest gRPC message accepted; a larger one closes its connection.",
    ),
    Key(
        "GRPC_MAX_BUFFERED_BYTES",
        64 * 1024 * 1024,
        _positive_int,
        "an integer >= 1 (bytes), raised to twice GRPC_MAX_MESSAGE_BYTES",
        "Bytes of gRPC requests received and not read yet (half-sent messages, unfinished "
        "headers), all connections together; past it the connection whose data waited "
        "longest is closed (GOAWAY ENHANCE_YOUR_CALM).",
    ),
    Key(
        "MAX_STATUS_SUBSCRIBERS",
        1000,
        _non_negative_int,
        "an integer >= 0",
        "Concurrent status subscribers; one more is refused with HTTP 503 (0 = no limit).",
    ),
    Key(
        "STATUS_MAX_MESSAGE_BYTES",
        4096,
        _positive_int,
        "an integer >= 1 (bytes)",
        "Largest websocket message a status subscriber may send (they should send nothing); "
        "a larger one closes its connection (code 1009).",
    ),
    Key(
        "MAX_CONNECTIONS",
        1000,
        _positive_int,
        "an integer >= 1",
        "Concurrent connections per port (gRPC, status, metrics), lowered to each port's "
        "share of three quarters of RLIMIT_NOFILE; at the limit the gRPC port closes its least "
        "recently active connection (GOAWAY), the others the oldest one still in its "
        "handshake, or else the new one.",
    ),
    Key(
        "IDLE_CONNECTION_TIMEOUT",
        30.0,
        _seconds_or_zero,
        "a number of seconds >= 0",
        "A gRPC connection without call traffic for this long is closed with an HTTP/2 GOAWAY "
        "(0 = never).",
    ),
    Key(
        "HANDSHAKE_TIMEOUT",
        5.0,
        _positive_seconds,
        "a number of seconds > 0",
        "Time a peer has for a TLS handshake, the websocket upgrade or a metrics request; "
        "then its connection is closed.",
    ),
    Key(
        "MAX_SELECTORS_PER_ROUND",
        0,
        _non_negative_int,
        "an integer >= 0",
        "Distinct selector ids that may hold clients in one round; check-ins from more are "
        "refused (0 = no limit).",
    ),
    Key(
        "CHECK_TIMEOUT",
        60.0,
        _positive_seconds,
        "a number of seconds > 0",
        "Time limit of the check of one selector's files (in a worker process, killed when "
        "it is over); the selector is then rejected. Also the longest the averaging waits on "
        "one call to a selector's storage (an open, a read, a close): that selector is then "
        "rejected and the others averaged again. A check that cannot run for want of the "
        "coordinator's own descriptors or memory is tried again for this long, then fails "
        "the round (no selector is rejected).",
    ),
    Key(
        "CHECK_WORKERS",
        2,
        _positive_int,
        "an integer >= 1",
        "Worker processes checking selectors' files at once; further reports wait their turn.",
    ),
    Key(
        "STRATEGY",
        "fedavg",
        _choice(*STRATEGIES),
        " or ".join(STRATEGIES),
        "Server optimizer applied to each round's mean update (see Strategies).",
    ),
    Key(
        "SERVER_LEARNING_RATE",
        "",
        _optional_number(_positive),
        "a number > 0, or empty (the strategy's default)",
        "Server learning rate; empty: the strategy's default.",
    ),
    Key(
        "SERVER_MOMENTUM",
        0.9,
        _decay,
        "a number in [0, 1)",
        "Momentum of fedavgm.",
    ),
    Key("BETA_1", 0.9, _decay, "a number in [0, 1)", "First-moment decay of the adaptive ones."),
    Key("BETA_2", 0.99, _decay, "a number in [0, 1)", "Second-moment decay (fedadam, fedyogi)."),
    Key(
        "TAU",
        "",
        _optional_number(_positive),
        "a number > 0, or empty (the strategy's default)",
        "Adaptivity of fedadagrad, fedadam and fedyogi (v starts at TAU^2).",
    ),
    Key(
        "SELECTOR_CLIP_NORM",
        0.0,
        _non_negative,
        "a number >= 0",
        "Each selector's mean update is scaled down to this L2 norm before it is combined "
        "(0 = off).",
    ),
    Key(
        "ROBUST_AGGREGATION",
        "mean",
        _choice(*COMBINATIONS),
        " or ".join(COMBINATIONS),
        "How the selectors' updates are combined: weighted mean, or unweighted coordinate-wise "
        "median or trimmed mean (at least 3 selectors).",
    ),
    Key(
        "TRIM_FRACTION",
        0.2,
        _checked(_number, lambda n: 0 < n < 0.5),
        "a fraction in (0, 0.5)",
        "Fraction of the selectors' values dropped at each end by trimmed_mean.",
    ),
    Key(
        "EVALUATE",
        "",
        _function,
        "package.module:function, or empty",
        "Function called as function(checkpoint_path, model_path, round) -> dict[str, float] "
        "in a worker process after each completed round; empty: no evaluation.",
    ),
    Key(
        "EVALUATE_TIMEOUT",
        300.0,
        _positive_seconds,
        "a number of seconds > 0",
        "Time limit of one evaluation (and of its import at start-up); then its worker "
        "process is killed and that round has no metrics.",
    ),
    Key(
        "ROUNDS",
        0,
        _non_negative_int,
        "an integer >= 0",
        "The run ends (stage FINISHED) after this round; 0 = never.",
    ),
    Key(
        "STOP_WHEN",
        "",
        _condition,
        "a condition such as accuracy>=0.95 (metric, >=, <=, > or <, number), or empty",
        "The run ends when an evaluated round's metrics meet it (needs EVALUATE).",
    ),
    Key(
        "DP_NOISE_MULTIPLIER",
        0.0,
        _non_negative,
        "a number >= 0",
        "z of client-level differential privacy: noise N(0, (z*DP_CLIP_NORM)^2) per coordinate "
        "of each round's sum (see Differential privacy); 0 = off.",
    ),
    Key(
        "DP_CLIP_NORM",
        0.0,
        _non_negative,
        "a number >= 0 (> 0 with DP_NOISE_MULTIPLIER)",
        "C: the L2 norm every client's update is clipped to (and selectors check).",
    ),
    Key(
        "DP_DELTA",
        1e-5,
        _checked(_number, lambda n: 0 < n < 1),
        "a number in (0, 1)",
        "delta at which the privacy spent (epsilon) is reported.",
    ),
    Key(
        "DP_POPULATION",
        0,
        _non_negative_int,
        "an integer >= CHECKIN_LIMIT with DP_NOISE_MULTIPLIER",
        "Clients that could be sampled; the sampling rate is CHECKIN_LIMIT / DP_POPULATION.",
    ),
    Key(
        "DP_MAX_EPSILON",
        "",
        _optional_number(_positive),
        "a number > 0, or empty (no budget)",
        "The run ends (FINISHED) before a round that would spend more epsilon than this.",
    ),
)


@dataclass(frozen=True)
class Settings:
    """The validated configuration. Field names are the keys in lower case."""

    fl_root_path: str
    init_files_path: str
    model_file: str
    checkpoint_file: str
    agg_checkpoint_file_path: str
    agg_checkpoint_weight_path: str
    estimated_waiting_time: int
    checkin_limit: int
    webserver_address: str
    port: int
    problem_id: str
    host: str
    status_port: int
    metrics_port: int | None
    webhook_url: str
    legacy_status_push: bool
    goal_count_timeout: float
    keep_checkpoints: int
    round_history: int
    goal_count_retries: int

    selection_timeout: float
    min_checkin_fraction: float
    reporting_timeout: float
    min_reporting_fraction: float
    log_level: str
    log_format: str
    tls_cert_file: str
    tls_key_file: str
    tls_client_ca_file: str
    tls_selector_ca_file: str
    auth_token: str = field(repr=False)
    auth_token_file: str
    allowed_selectors: tuple[str, ...]
    status_token: str = field(repr=False)
    grpc_max_message_bytes: int
    grpc_max_buffered_bytes: int
    max_status_subscribers: int
    status_max_message_bytes: int
    max_connections: int
    idle_connection_timeout: float
    handshake_timeout: float
    max_selectors_per_round: int
    check_timeout: float
    check_workers: int
    strategy: str
    server_learning_rate: float | None
    server_momentum: float
    beta_1: float
    beta_2: float
    tau: float | None
    selector_clip_norm: float
    robust_aggregation: str
    trim_fraction: float
    evaluate: str
    evaluate_timeout: float
    rounds: int
    stop_when: str
    dp_noise_multiplier: float
    dp_clip_norm: float
    dp_delta: float
    dp_population: int
    dp_max_epsilon: float | None

    @property
    def root(self) -> Path:
        return Path(self.fl_root_path)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


class _RepeatedKey(Exception):
    """A key given twice in a config file; the message says which, and on which lines."""


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load``, refusing a top-level key given twice.

    YAML loaders keep the last of two equal keys without a word, so a key an
    operator added at the end of a long file silently won over, or lost to,
    the one above it. (Keys a ``<<`` merge brings in may be overridden.)
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise _RepeatedKey(
                        f"each key once ({key_node.value} is on lines {seen[key_node.value]} "
                        f"and {line}; remove one)"
                    )
                seen[key_node.value] = line
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


#: Largest config file read: a real one is a few KiB; ``--config /dev/zero`` (or a log file
#: given by mistake) must not be read until memory runs out.
MAX_CONFIG_BYTES = 1 << 20


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping of keys, or raise ConfigError.

    At most :data:`MAX_CONFIG_BYTES` are read (a pipe, ``/dev/stdin``, is fine).
    """
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError("--config", str(path), f"a readable file ({error.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        expected = (
            f"a config file of at most {MAX_CONFIG_BYTES // 1024} KiB (is it the right file?)"
        )
        raise ConfigError("--config", str(path), expected)
    try:
        loaded = _load_yaml(data.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError("--config", str(path), f"valid YAML ({first_line})") from None
    except _RepeatedKey as repeated:
        raise ConfigError("--config", str(path), str(repeated)) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError("--config", str(path), "a YAML mapping of KEY: value")
    return {str(key): value for key, value in loaded.items()}


def load_settings(
    file_values: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Settings, list[str]]:
    """Merge defaults, file values and environment (in that order of precedence, lowest first).

    Returns the settings and the names of keys in the file that we do not know
    (the caller warns about them: a typo should not pass silently, but the Go
    system's config files may carry keys for other programs).
    """
    file_values = dict(file_values or {})
    environ = os.environ if environ is None else environ
    known = {key.name for key in KEYS}
    unknown = sorted(name for name in file_values if name not in known)
    values: dict[str, Any] = {}
    for key in KEYS:
        raw = key.default
        if key.name in file_values:
            raw = file_values[key.name]
        if key.name in environ:
            raw = environ[key.name]
        try:
            values[key.field] = key.parse(raw)
        except (ValueError, TypeError):
            shown = _REDACTED if key.secret else _Shown(raw)
            raise ConfigError(key.name, shown, key.expected) from None
    settings = Settings(**values)
    _check_combinations(settings)
    return settings, unknown


def similar_key(name: str) -> str | None:
    """The key ``name`` is likely a typo of (``CHECKIN_LIMT``: ``CHECKIN_LIMIT``), or None."""
    close = difflib.get_close_matches(name.upper(), [key.name for key in KEYS], n=1, cutoff=0.85)
    return close[0] if close else None


def misspelt_environment(environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """Environment variables that are not keys but look like one: ``(name, key)`` pairs.

    A mistyped file key is warned about by the caller; a mistyped variable
    would pass silently (the environment holds many variables that are not
    ours), so only those within a typo of a key are named, with that key.
    """
    environ = os.environ if environ is None else environ
    known = {key.name for key in KEYS}
    return sorted(
        (name, key)
        for name in environ
        if name not in known and (key := similar_key(name)) is not None
    )


def warn_misspelt_environment(environ: Mapping[str, str] | None = None) -> None:
    """Log a warning for each :func:`misspelt_environment` variable (after logging is set up)."""
    for name, key in misspelt_environment(environ):
        _log.warning(
            "environment variable %s is not a setting and is ignored; did you mean %s?", name, key
        )


def _check_combinations(settings: Settings) -> None:
    """Keys that only make sense together (the files themselves are loaded at start-up)."""
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        missing, present = (
            ("TLS_KEY_FILE", "TLS_CERT_FILE")
            if settings.tls_cert_file
            else ("TLS_CERT_FILE", "TLS_KEY_FILE")
        )
        raise ConfigError(missing, "", f"a file too, since {present} is set")
    if settings.tls_client_ca_file and not settings.tls_cert_file:
        raise ConfigError(
            "TLS_CLIENT_CA_FILE", settings.tls_client_ca_file, "TLS_CERT_FILE and TLS_KEY_FILE too"
        )
    _check_ports(settings)
    if settings.legacy_status_push:
        _check_webserver_address(settings)
    if settings.auth_token and settings.auth_token_file:
        expected = "empty when AUTH_TOKEN is set"
        raise ConfigError("AUTH_TOKEN_FILE", settings.auth_token_file, expected)
    for key, token in (
        ("AUTH_TOKEN", settings.auth_token),
        ("STATUS_TOKEN", settings.status_token),
    ):
        if token:
            check_not_placeholder(key, token)
    if settings.stop_when and not settings.evaluate:
        raise ConfigError("STOP_WHEN", settings.stop_when, "empty, or EVALUATE set too")
    _check_privacy(settings)


def _check_ports(settings: Settings) -> None:
    """The gRPC, status and metrics ports listen on the same HOST: one port cannot be two of
    them (it was refused at start-up as "address already in use: is another coordinator
    running?", which sent the operator looking for a process that was not there)."""
    defaults = {key.name: key.default for key in KEYS}
    taken: dict[int, str] = {}
    for key, port in (
        ("PORT", settings.port),
        ("STATUS_PORT", settings.status_port),
        ("METRICS_PORT", settings.metrics_port),
    ):
        if not port:  # 0: any free port; None: off
            continue
        if port in taken:
            given, other = key, taken[port]
            if defaults[given] == port != defaults[other]:  # name the one that was set
                given, other = other, given
            default = " by default" if defaults[other] == port else ""
            raise ConfigError(given, port, f"a port other than {other}'s ({port}{default})")
        taken[port] = key


def _check_privacy(settings: Settings) -> None:
    """Differential privacy needs its clip norm and population, and combines with the plain
    weighted mean only: a robust combination or SELECTOR_CLIP_NORM would change the
    sensitivity the noise is calibrated to (the README's Differential privacy section)."""
    if not settings.dp_noise_multiplier:
        if settings.dp_max_epsilon is not None:
            raise ConfigError(
                "DP_MAX_EPSILON", settings.dp_max_epsilon, "empty, or DP_NOISE_MULTIPLIER > 0"
            )
        return
    if not settings.dp_clip_norm:
        raise ConfigError("DP_CLIP_NORM", 0.0, "a number > 0, since DP_NOISE_MULTIPLIER is set")
    if settings.dp_population < settings.checkin_limit:
        expected = f"an integer >= CHECKIN_LIMIT ({settings.checkin_limit})"
        raise ConfigError("DP_POPULATION", settings.dp_population, expected)
    if settings.robust_aggregation != "mean":
        expected = "mean, since DP_NOISE_MULTIPLIER is set (DP needs the summed updates)"
        raise ConfigError("ROBUST_AGGREGATION", settings.robust_aggregation, expected)
    if settings.selector_clip_norm:
        expected = "0, since DP_NOISE_MULTIPLIER is set (DP_CLIP_NORM bounds each client)"
        raise ConfigError("SELECTOR_CLIP_NORM", settings.selector_clip_norm, expected)


def _check_webserver_address(settings: Settings) -> None:
    """A legacy push needs an address it can dial, and not this coordinator's own status port
    (the Go default ``localhost:50052`` is exactly that: a push to it never succeeds)."""
    host, _, port = settings.webserver_address.rpartition(":")
    if int(port) == 0:
        raise ConfigError("WEBSERVER_ADDRESS", settings.webserver_address, "a port >= 1")
    own_hosts = {"localhost", "127.0.0.1", "[::1]", "0.0.0.0", settings.host}
    if int(port) == settings.status_port and host in own_hosts:
        expected = (
            f"the legacy webserver's address, not this coordinator's STATUS_PORT "
            f"({settings.status_port}), since LEGACY_STATUS_PUSH is on"
        )
        raise ConfigError("WEBSERVER_ADDRESS", settings.webserver_address, expected)


def default_settings() -> Settings:
    """The embedded defaults, ignoring the environment (for tests and tools)."""
    settings, _ = load_settings({}, {})
    return settings
