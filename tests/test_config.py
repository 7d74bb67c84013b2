"""Settings: the Go keys with their defaults, YAML, environment overrides, clear errors."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from helpers import REPO

from fl_coordinator.config import (
    KEYS,
    MAX_CONFIG_BYTES,
    Settings,
    load_settings,
    read_config_file,
)
from fl_coordinator.errors import ConfigError

README = REPO / "README.md"


def test_defaults_are_the_go_coordinators() -> None:
    settings, unknown = load_settings({}, {})
    assert unknown == []
    assert settings.init_files_path == "initFiles/"
    assert settings.model_file == "model.h5"
    assert settings.checkpoint_file == "fl_checkpoint"
    assert settings.agg_checkpoint_file_path == "/fl_agg_checkpoint"
    assert settings.agg_checkpoint_weight_path == "/fl_agg_checkpoint_weight"
    assert settings.estimated_waiting_time == 20000
    assert settings.checkin_limit == 2
    assert settings.webserver_address == "localhost:50052"
    assert settings.port == 50050
    assert settings.problem_id == "DEFAULT"
    # Ours: the root is ./data (the Go default ../data pointed outside the checkout).
    assert (settings.fl_root_path, settings.host, settings.status_port) == (
        "./data",
        "0.0.0.0",
        50052,
    )


def test_every_key_is_a_settings_field() -> None:
    assert [f.name for f in dataclasses.fields(Settings)] == [key.field for key in KEYS]


def test_file_then_environment(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("PORT: 6000\nCHECKIN_LIMIT: 5\nPROBLEM_ID: digits\nSOMETHING_ELSE: 1\n")
    settings, unknown = load_settings(read_config_file(config), {"PORT": "7000"})
    assert (settings.port, settings.checkin_limit, settings.problem_id) == (7000, 5, "digits")
    assert unknown == ["SOMETHING_ELSE"]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("PORT", "abc", "a port number"),
        ("PORT", "70000", "a port number"),
        ("STATUS_PORT", "-1", "a port number"),
        ("CHECKIN_LIMIT", "0", "an integer >= 1"),
        ("CHECKIN_LIMIT", "two", "an integer >= 1"),
        ("ESTIMATED_WAITING_TIME", "-5", "an integer >= 0"),
        ("WEBHOOK_URL", "ftp://example", "an http(s) URL"),
        ("GOAL_COUNT_TIMEOUT", "0", "seconds > 0"),
        ("GOAL_COUNT_TIMEOUT", "nan", "seconds > 0"),
        ("WEBSERVER_ADDRESS", "nohost", "host:port"),
        ("INIT_FILES_PATH", "../elsewhere", "a folder name"),
        ("LOG_LEVEL", "LOUD", "DEBUG, INFO"),
        ("LEGACY_STATUS_PUSH", "maybe", "true or false"),
        # Python's int() and float() read other scripts' digits and underscores: an
        # operator's number is ASCII (these were taken as port 50051, 12 rounds, 1000).
        ("PORT", "\u0665\u0660\u0660\u0665\u0661", "a port number"),
        ("ROUNDS", "\u0661\u0662", "an integer >= 0"),
        ("KEEP_CHECKPOINTS", "\uff11\uff10", "an integer >= 1"),
        ("SERVER_LEARNING_RATE", "1_000", "a number > 0"),
        ("TAU", "\uff11e-3", "a number > 0"),
        ("STOP_WHEN", "accuracy>=\uff11", "a condition such as"),
    ],
)
def test_bad_values_name_key_value_and_expectation(key: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {key: value})
    message = str(raised.value)
    assert message.startswith(f"configuration error: {key}={value!r}: expected ")
    assert expected in message
    assert "\n" not in message


def test_yaml_types_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="CHECKIN_LIMIT=True"):
        load_settings({"CHECKIN_LIMIT": True}, {})
    settings, _ = load_settings({"CHECKIN_LIMIT": 7, "GOAL_COUNT_TIMEOUT": 2.5}, {})
    assert (settings.checkin_limit, settings.goal_count_timeout) == (7, 2.5)


@pytest.mark.parametrize(
    ("content", "expected"),
    [("PORT: [unclosed", "valid YAML"), ("- just\n- a list\n", "a YAML mapping")],
)
def test_bad_config_files(tmp_path: Path, content: str, expected: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        read_config_file(config)
    with pytest.raises(ConfigError, match="a readable file"):
        read_config_file(tmp_path / "missing.yaml")


def test_readme_documents_every_key() -> None:
    readme = README.read_text()
    missing = [key.name for key in KEYS if f"| `{key.name}` |" not in readme]
    assert missing == []


def test_security_keys_are_off_by_default() -> None:
    settings, _ = load_settings({}, {})
    assert (settings.tls_cert_file, settings.auth_token, settings.status_token) == ("", "", "")
    assert (settings.allowed_selectors, settings.max_selectors_per_round) == ((), 0)


def test_allowed_selectors_from_a_yaml_list_or_a_comma_separated_string() -> None:
    from_file, _ = load_settings({"ALLOWED_SELECTORS": ["a:1", "b.example:2"]}, {})
    from_env, _ = load_settings({}, {"ALLOWED_SELECTORS": " a:1, b.example:2 ,"})
    assert from_file.allowed_selectors == from_env.allowed_selectors == ("a:1", "b.example:2")
    with pytest.raises(ConfigError, match="ALLOWED_SELECTORS"):
        load_settings({}, {"ALLOWED_SELECTORS": "a:1,nohost"})


@pytest.mark.parametrize("key", ["AUTH_TOKEN", "STATUS_TOKEN"])
def test_secrets_are_never_echoed(key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings({}, {key: "my secret\twith tab"})
    assert "my secret" not in str(error.value) and f"{key}=<redacted>" in str(error.value)
    settings, _ = load_settings({}, {key: "hunter2-token"})
    assert "hunter2" not in repr(settings)


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"TLS_CERT_FILE": "c.pem"}, "TLS_KEY_FILE"),
        ({"TLS_KEY_FILE": "k.pem"}, "TLS_CERT_FILE"),
        ({"TLS_CLIENT_CA_FILE": "ca.pem"}, "TLS_CLIENT_CA_FILE"),
        ({"AUTH_TOKEN": "t", "AUTH_TOKEN_FILE": "f"}, "AUTH_TOKEN_FILE"),
    ],
)
def test_keys_that_go_together(environ: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings({}, environ)
    assert error.value.key == key


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"DP_NOISE_MULTIPLIER": "1"}, "DP_CLIP_NORM=0.0: expected a number > 0, since"),
        (
            {"DP_NOISE_MULTIPLIER": "1", "DP_CLIP_NORM": "0.5", "DP_POPULATION": "2"},
            "DP_POPULATION=2: expected an integer >= CHECKIN_LIMIT (10)",
        ),
        (
            {"DP_NOISE_MULTIPLIER": "1", "DP_CLIP_NORM": "1", "DP_POPULATION": "1000",
             "ROBUST_AGGREGATION": "median"},
            "ROBUST_AGGREGATION='median': expected mean, since DP_NOISE_MULTIPLIER is set",
        ),
        (
            {"DP_NOISE_MULTIPLIER": "1", "DP_CLIP_NORM": "1", "DP_POPULATION": "1000",
             "SELECTOR_CLIP_NORM": "3"},
            "SELECTOR_CLIP_NORM=3.0: expected 0, since DP_NOISE_MULTIPLIER is set",
        ),
        ({"DP_MAX_EPSILON": "8"}, "DP_MAX_EPSILON=8.0: expected empty, or DP_NOISE_MULTIPLIER"),
        ({"DP_DELTA": "1"}, "DP_DELTA='1': expected a number in (0, 1)"),
        ({"DP_NOISE_MULTIPLIER": "-1"}, "DP_NOISE_MULTIPLIER='-1': expected a number >= 0"),
    ],
)  # fmt: skip
def test_differential_privacy_mistakes_are_one_line(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings({"CHECKIN_LIMIT": 10}, environ)
    assert str(error.value).startswith(f"configuration error: {message}")
    assert "\n" not in str(error.value)
    settings, _ = load_settings(
        {}, {"DP_NOISE_MULTIPLIER": "1", "DP_CLIP_NORM": "1", "DP_POPULATION": "1000"}
    )
    assert (settings.dp_noise_multiplier, settings.dp_delta, settings.dp_max_epsilon) == (
        1.0,
        1e-5,
        None,
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PORT": "50099", "STATUS_PORT": "50099"}, "STATUS_PORT=50099: expected a port other "
         "than PORT's (50099)"),
        ({"METRICS_PORT": "50050"}, "METRICS_PORT=50050: expected a port other than PORT's "
         "(50050 by default)"),
        ({"STATUS_PORT": "9", "METRICS_PORT": "9"}, "METRICS_PORT=9: expected a port other "
         "than STATUS_PORT's (9)"),
        ({"PORT": "50052"}, "PORT=50052: expected a port other than STATUS_PORT's (50052 by "
         "default)"),
        ({"STATUS_PORT": "50050"}, "STATUS_PORT=50050: expected a port other than PORT's "
         "(50050 by default)"),
    ],
)  # fmt: skip
def test_one_port_for_two_servers_is_refused_by_name(environ: dict[str, str], message: str) -> None:
    """It was "address already in use: is another coordinator running?" at start-up."""
    with pytest.raises(ConfigError) as raised:
        load_settings({}, environ)
    assert str(raised.value) == f"configuration error: {message}"


def test_any_free_port_may_be_asked_for_twice() -> None:
    settings, _ = load_settings({}, {"PORT": "0", "STATUS_PORT": "0", "METRICS_PORT": "0"})
    assert (settings.port, settings.status_port, settings.metrics_port) == (0, 0, 0)


def test_a_huge_bad_value_is_shown_cut_short() -> None:
    value = "x" * 20_000_000
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {"CHECKIN_LIMIT": value})
    message = str(raised.value)
    marker = "…[20000002 chars]"  # the repr's length, quotes included
    shown = repr(value)[: 200 - len(marker)]
    assert message == (
        f"configuration error: CHECKIN_LIMIT={shown}{marker}: expected an integer >= 1"
    )


@pytest.mark.parametrize("size", [MAX_CONFIG_BYTES + 1, 50 * 2**20])
def test_a_config_file_is_read_up_to_a_bound(tmp_path: Path, size: int) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(b"# " + b"x" * (size - 3) + b"\n")
    with pytest.raises(ConfigError) as raised:
        read_config_file(config)
    assert str(raised.value) == (
        f"configuration error: --config={str(config)!r}: expected a config file of at most "
        "1024 KiB (is it the right file?)"
    )


def test_an_endless_config_file_is_refused_in_bounded_memory() -> None:
    """--config /dev/zero read until memory ran out (a MemoryError traceback under a limit)."""
    with pytest.raises(ConfigError, match="at most 1024 KiB"):
        read_config_file(Path("/dev/zero"))


def test_a_config_file_of_the_bound_and_a_pipe_are_read(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    body = b"CHECKIN_LIMIT: 7\n"
    config.write_bytes(body + b"#" * (MAX_CONFIG_BYTES - len(body) - 1) + b"\n")
    assert read_config_file(config) == {"CHECKIN_LIMIT": 7}
    read_end, write_end = os.pipe()
    os.write(write_end, b"PORT: 0\n")
    os.close(write_end)
    try:
        assert read_config_file(Path(f"/proc/self/fd/{read_end}")) == {"PORT": 0}
    finally:
        os.close(read_end)


def test_a_key_given_twice_in_the_file_is_refused(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys silently: CHECKIN_LIMIT: 2 ... CHECKIN_LIMIT: 3
    served with 3, whichever the operator meant."""
    config = tmp_path / "config.yaml"
    config.write_text("CHECKIN_LIMIT: 2\nPORT: 0\nCHECKIN_LIMIT: 3\n")
    with pytest.raises(ConfigError) as raised:
        read_config_file(config)
    assert str(raised.value) == (
        f"configuration error: --config={str(config)!r}: expected each key once "
        "(CHECKIN_LIMIT is on lines 1 and 3; remove one)"
    )


def test_keys_a_merge_brings_in_may_be_overridden(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("common: &common {PORT: 1, CHECKIN_LIMIT: 4}\n<<: *common\nPORT: 0\n")
    assert read_config_file(config) == {
        "common": {"PORT": 1, "CHECKIN_LIMIT": 4},
        "PORT": 0,
        "CHECKIN_LIMIT": 4,
    }


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("PROBLEM_ID", "prob\udcffx"),  # PROBLEM_ID=$'prob\xffx': not UTF-8
        ("PROBLEM_ID", "two\nlines"),
        ("PROBLEM_ID", "two\u2028lines"),  # a line separator
        ("PROBLEM_ID", "abc\u202edcba"),  # a right-to-left override
        ("PROBLEM_ID", "tab\there"),
        ("HOST", "host\udcfe"),
        ("WEBSERVER_ADDRESS", "web\udcff:50052"),
        ("ALLOWED_SELECTORS", "a\udcff:1"),
    ],
)
def test_text_that_travels_must_be_printable_unicode(key: str, value: str) -> None:
    """PROBLEM_ID with a byte that is not UTF-8 was taken: every metrics scrape then failed
    (UnicodeEncodeError in the Prometheus label, a traceback per scrape)."""
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {key: value})
    assert str(raised.value).startswith(f"configuration error: {key}={value!r}: expected ")


@pytest.mark.parametrize(
    "name",
    [
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian: a zero-width non-joiner
        "\u0915\u094d\u200d\u0937",  # Devanagari: a zero-width joiner
        "team-\U0001f469\u200d\U0001f4bb",  # an emoji sequence (ZWJ)
        "\u554f\u984c\u3000\u4e00",  # Japanese: an ideographic space
        "digits\u00a0v2",  # a no-break space
    ],
)
def test_a_problem_id_in_any_script_is_taken(name: str) -> None:
    """Format characters and spaces that words of real scripts hold. Before:
    refused, "expected a non-empty string of printable characters" (str.isprintable)."""
    settings, _ = load_settings({}, {"PROBLEM_ID": name})
    assert settings.problem_id == name


def test_paths_may_hold_bytes_that_are_not_utf8_and_names_any_script() -> None:
    settings, _ = load_settings(
        {}, {"FL_ROOT_PATH": "/srv/fl/bad\udcffname", "PROBLEM_ID": "digits-é-数字"}
    )
    assert os.fsencode(settings.fl_root_path) == b"/srv/fl/bad\xffname"
    assert settings.problem_id == "digits-é-数字"
