"""Settings.load: environment and flags → Settings, and every way a value can be unusable."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from relay.settings import (
    KNOBS,
    MIB,
    Settings,
    SettingsError,
    build_parser,
    default_max_bytes,
    store_kind_of,
)


def load(env: dict[str, str] | None = None, argv: list[str] | None = None) -> Settings:
    return Settings.load(argv or [], env or {})


def field_of(env_name: str) -> str:
    return env_name.removeprefix("HIVE_RELAY_").lower()


# ------------------------------------------------------------------- defaults
def test_defaults_follow_protocol() -> None:
    s = load()
    assert s.addr == "0.0.0.0:8443"
    assert (s.host, s.port) == ("0.0.0.0", 8443)
    assert s.store == "memory://"
    assert s.data_dir == ""
    assert s.max_body_bytes == 4 * MIB
    assert s.max_page_bytes == 8 * MIB
    assert s.max_envelopes == 50_000
    assert s.retention_days == 0
    assert s.push_rate == 100
    assert s.push_burst == 300
    assert s.max_sse == 2000
    assert s.presence_ttl == 0
    assert s.token_pubkey == s.access_tokens == s.access_tokens_file == s.metrics_token == ""
    assert s.max_bytes == default_max_bytes() >= 64 * MIB
    assert s.log_format == "text"


def test_loading_nothing_equals_the_dataclass_defaults() -> None:
    assert load() == Settings()


def test_every_knob_is_a_settings_field_with_the_same_default() -> None:
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    defaults = Settings()
    for knob in KNOBS:
        name = field_of(knob.env)
        assert name in fields, knob.env
        if knob.default is not None:
            assert getattr(defaults, name) == knob.default, knob.env
    # And the other way round: every field (bar nothing) has a knob.
    assert {field_of(k.env) for k in KNOBS} == set(fields)


def test_every_flag_mirrors_its_environment_variable() -> None:
    for knob in KNOBS:
        assert knob.env.startswith("HIVE_RELAY_")
        assert knob.flag == "--" + field_of(knob.env).replace("_", "-"), knob.env


# -------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1024", 1024),
        ("4194304", 4 * MIB),
        ("4_194_304", 4 * MIB),
        ("4MiB", 4 * MIB),
        ("4mib", 4 * MIB),
        ("4 MiB", 4 * MIB),
        ("64KiB", 64 * 1024),
        ("2k", 2000),
        ("1GiB", 1024 * MIB),
        (" 2048 ", 2048),
    ],
)
def test_int_settings_parse_sizes(text: str, value: int) -> None:
    assert load({"HIVE_RELAY_MAX_BODY_BYTES": text}).max_body_bytes == value


@pytest.mark.parametrize(("text", "value"), [("0.5", 0.5), ("2", 2.0), ("1e3", 1000.0), ("0", 0.0)])
def test_float_settings_parse(text: str, value: float) -> None:
    assert load({"HIVE_RELAY_PUSH_RATE": text}).push_rate == value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("1", True),
        ("yes", True),
        ("ON", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("Off", False),
    ],
)
def test_bool_settings_parse(text: str, value: bool) -> None:
    assert load({"HIVE_RELAY_ACCESS_LOG": text}).access_log is value


def test_string_settings_are_taken_as_given() -> None:
    s = load(
        {
            "HIVE_RELAY_STORE": "redis://cache:6379/2",
            "HIVE_RELAY_ACCESS_TOKENS": "a,b",
            "HIVE_RELAY_LOG_FORMAT": "json",
            "HIVE_RELAY_TRUSTED_PROXIES": "10.0.0.0/8, ::1",
            "HIVE_RELAY_CORS_ORIGINS": "https://app.example, *",
        }
    )
    assert s.store == "redis://cache:6379/2"
    assert s.access_tokens == "a,b"
    assert s.log_format == "json"
    assert len(s.trusted_networks) == 2
    assert s.cors_origin_list == ("https://app.example", "*")


@pytest.mark.parametrize(
    "store", ["memory://", "redis://localhost:6379/0", "rediss://h:6380", "REDIS://h"]
)
def test_known_store_schemes(store: str) -> None:
    assert load({"HIVE_RELAY_STORE": store}).store == store


def test_zero_means_off_where_documented() -> None:
    s = load(
        {"HIVE_RELAY_MAX_ENVELOPES": "0", "HIVE_RELAY_PUSH_RATE": "0", "HIVE_RELAY_MAX_SSE": "0"}
    )
    assert (s.max_envelopes, s.push_rate, s.max_sse) == (0, 0, 0)


def test_empty_environment_values_count_as_unset() -> None:
    s = load({"HIVE_RELAY_MAX_BODY_BYTES": "", "HIVE_RELAY_PUSH_RATE": "  ", "PORT": ""})
    assert s.max_body_bytes == 4 * MIB
    assert s.push_rate == 100
    assert s.addr == "0.0.0.0:8443"


def test_flags_win_over_the_environment() -> None:
    env = {
        "HIVE_RELAY_MAX_BODY_BYTES": "2048",
        "HIVE_RELAY_STORE": "redis://x",
        "HIVE_RELAY_PUSH_RATE": "5",
    }
    s = load(env, ["--max-body-bytes", "4096", "--store", "memory://"])
    assert s.max_body_bytes == 4096
    assert s.store == "memory://"
    assert s.push_rate == 5  # no flag: the environment still counts


def test_every_knob_can_be_set_by_flag_and_by_env() -> None:
    samples = {"int": "4096", "float": "2.5", "bool": "false"}
    strings = {
        "HIVE_RELAY_ADDR": "127.0.0.1:9999",
        "HIVE_RELAY_STORE": "rediss://h:1",
        "HIVE_RELAY_LOG_FORMAT": "json",
        "HIVE_RELAY_LOG_LEVEL": "debug",
        "HIVE_RELAY_TRUSTED_PROXIES": "127.0.0.1",
        "HIVE_RELAY_CORS_ORIGINS": "https://a.example",
        "HIVE_RELAY_FSYNC": "everysec",
        "HIVE_RELAY_JOURNAL_REPAIR": "truncate",
    }
    ranged = {
        "HIVE_RELAY_IPV6_PREFIX": "56",
        "HIVE_RELAY_WORKERS": "3",
        "HIVE_RELAY_REDIS_MIN_REPLICAS": "2",
    }
    # More than one worker needs a shared store; a TLS certificate needs its key.
    needs = {
        "HIVE_RELAY_WORKERS": {"HIVE_RELAY_STORE": "redis://h:1"},
        "HIVE_RELAY_TLS_CERT": {"HIVE_RELAY_TLS_KEY": "key.pem"},
        "HIVE_RELAY_TLS_KEY": {"HIVE_RELAY_TLS_CERT": "cert.pem"},
    }
    for knob in KNOBS:
        text = ranged.get(knob.env) or samples.get(knob.kind) or strings.get(knob.env, "some-value")
        name = field_of(knob.env)
        extra = needs.get(knob.env, {})
        from_env = getattr(load({knob.env: text, **extra}), name)
        from_flag = getattr(load(extra, argv=[knob.flag, text]), name)
        assert from_env == from_flag, knob.env
        assert from_env != getattr(Settings(), name), knob.env


# ------------------------------------------------------------- bind address
def test_bind_address_order() -> None:
    assert load().addr == "0.0.0.0:8443"
    assert load({"HIVE_RELAY_ADDR": "127.0.0.1:9000"}).addr == "127.0.0.1:9000"
    assert load({"PORT": "7000"}).addr == "0.0.0.0:7000"
    # $PORT comes first: a platform that sets it decides.
    assert load({"PORT": "7000", "HIVE_RELAY_ADDR": "127.0.0.1:9000"}).addr == "0.0.0.0:7000"
    # Flags win over both.
    both = {"PORT": "7000", "HIVE_RELAY_ADDR": "127.0.0.1:9000"}
    assert load(both, ["--addr", "127.0.0.2:6000"]).addr == "127.0.0.2:6000"
    assert load(both, ["--port", "6001"]).addr == "0.0.0.0:6001"


def test_ipv6_bind_address() -> None:
    s = load({"HIVE_RELAY_ADDR": "[::1]:9000"})
    assert (s.host, s.port) == ("::1", 9000)


# ------------------------------------------------------------------- errors
BAD_ENV = [
    ("HIVE_RELAY_MAX_BODY_BYTES", "abc"),
    ("HIVE_RELAY_MAX_BODY_BYTES", "12.5"),
    ("HIVE_RELAY_MAX_BODY_BYTES", "4 MB MB"),
    ("HIVE_RELAY_MAX_BODY_BYTES", "10"),  # below the minimum
    ("HIVE_RELAY_MAX_BODY_BYTES", "2GiB"),  # above the maximum
    ("HIVE_RELAY_MAX_BODY_BYTES", "-5"),
    ("HIVE_RELAY_MAX_ENVELOPES", "lots"),
    ("HIVE_RELAY_MAX_ENVELOPES", "-1"),
    ("HIVE_RELAY_MAX_BYTES", "100"),
    ("HIVE_RELAY_PUSH_RATE", "fast"),
    ("HIVE_RELAY_PUSH_RATE", "nan"),
    ("HIVE_RELAY_PUSH_RATE", "inf"),
    ("HIVE_RELAY_PUSH_RATE", "-1"),
    ("HIVE_RELAY_PUSH_BURST", "1.5"),
    ("HIVE_RELAY_PRESENCE_TTL", "-0.5"),
    ("HIVE_RELAY_RETENTION_DAYS", "a week"),
    ("HIVE_RELAY_ACCESS_LOG", "maybe"),
    ("HIVE_RELAY_STORE", "ftp://host"),
    ("HIVE_RELAY_STORE", "memory"),
    ("HIVE_RELAY_STORE", "postgres://db"),
    ("HIVE_RELAY_LOG_FORMAT", "xml"),
    ("HIVE_RELAY_LOG_LEVEL", "loud"),
    ("HIVE_RELAY_TRUSTED_PROXIES", "not-an-ip"),
    ("HIVE_RELAY_TRUSTED_PROXIES", "10.0.0.0/33"),
    ("HIVE_RELAY_CORS_ORIGINS", "app.example.com"),
    ("HIVE_RELAY_ADDR", "no-port"),
    ("HIVE_RELAY_ADDR", ":8443"),
    ("HIVE_RELAY_ADDR", "host:http"),
    ("HIVE_RELAY_ADDR", "host:70000"),
    ("PORT", "http"),
    ("PORT", "70000"),
    ("PORT", "-1"),
]


@pytest.mark.parametrize(("name", "value"), BAD_ENV)
def test_unusable_environment_values_name_the_setting(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load({name: value})
    message = str(raised.value)
    assert message.startswith(f"{name}:"), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--max-body-bytes", "abc"], ("HIVE_RELAY_MAX_BODY_BYTES", "--max-body-bytes")),
        (["--push-rate", "x"], ("HIVE_RELAY_PUSH_RATE", "--push-rate")),
        (["--store", "ftp://h"], ("HIVE_RELAY_STORE", "--store")),
        (["--addr", "nope"], ("HIVE_RELAY_ADDR", "--addr")),
        (["--port", "abc"], ("PORT", "--port")),
        (["--port", "99999"], ("PORT", "--port")),
    ],
)
def test_unusable_flag_values_name_the_setting(argv: list[str], names: tuple[str, ...]) -> None:
    with pytest.raises(SettingsError) as raised:
        load(argv=argv)
    message = str(raised.value)
    assert any(name in message for name in names), message


def test_a_bad_value_is_an_error_even_when_a_flag_would_not_need_it() -> None:
    # The environment is checked even for settings a flag does not touch.
    with pytest.raises(SettingsError, match="HIVE_RELAY_PUSH_RATE"):
        load({"HIVE_RELAY_PUSH_RATE": "x"}, ["--max-body-bytes", "4096"])


def test_a_bad_env_value_is_overridden_by_a_good_flag() -> None:
    assert load({"HIVE_RELAY_PUSH_RATE": "x"}, ["--push-rate", "3"]).push_rate == 3


def test_unknown_flag_exits_with_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        load(argv=["--no-such-flag"])
    assert raised.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize(
    "changes",
    [
        {"store": "ftp://x"},
        {"log_format": "yaml"},
        {"log_level": "chatty"},
        {"addr": "nohost"},
        {"trusted_proxies": "x.y"},
        {"cors_origins": "example.com"},
    ],
)
def test_settings_validate_when_made_directly(changes: dict[str, Any]) -> None:
    with pytest.raises(SettingsError):
        Settings(**changes)
    with pytest.raises(SettingsError):
        Settings().replace(**changes)


# ------------------------------------------------------- one declaration
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_settings_rows() -> list[tuple[str, str, str]]:
    """(variable, flag, default cell) of each row of README's settings table."""
    rows = []
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and cells[1].startswith("`--"):
            rows.append((cells[0].strip("`"), cells[1].strip("`"), cells[2]))
    return rows


def readme_default(knob: Any) -> str:
    if knob.default == "":
        return "unset"
    if knob.kind == "bool":
        return "`true`" if knob.default else "`false`"
    if knob.kind == "float":
        return f"`{knob.default:g}`"
    return f"`{knob.default}`"


def test_readme_table_lists_every_setting_once_in_order_with_its_flag_and_default() -> None:
    rows = readme_settings_rows()
    assert rows[0][:2] == ("PORT", "--port")
    rows = rows[1:]
    assert [env for env, _, _ in rows] == [k.env for k in KNOBS]
    for (env, flag, default), knob in zip(rows, KNOBS, strict=True):
        assert flag == knob.flag, env
        if knob.default is None:  # computed from the machine
            assert "quarter of the machine" in default, env
        else:
            assert default.startswith(readme_default(knob)), (env, default)


def test_help_shows_the_bounds_a_value_is_checked_against() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "env HIVE_RELAY_MAX_BODY_BYTES; default 4194304; 64 to 1073741824]" in text
    assert "env HIVE_RELAY_KEEPALIVE_SECS; default 25.0; 0.05 to 3600]" in text
    assert "env HIVE_RELAY_STORE; default memory://]" in text
    with pytest.raises(SettingsError, match="below the minimum 64"):
        load({"HIVE_RELAY_MAX_BODY_BYTES": "63"})
    assert load({"HIVE_RELAY_MAX_BODY_BYTES": "64"}).max_body_bytes == 64
    with pytest.raises(SettingsError, match="above the maximum 3600"):
        load(argv=["--keepalive-secs", "3600.5"])


def test_the_store_scheme_is_checked_once_and_names_the_store_kind() -> None:
    assert load().store_kind == "memory"
    assert load({"HIVE_RELAY_STORE": "REDIS://h"}).store_kind == "redis"
    assert load({"HIVE_RELAY_STORE": "rediss://h:6380"}).store_kind == "redis"
    with pytest.raises(SettingsError, match="HIVE_RELAY_STORE: unknown store 'memory'"):
        store_kind_of("memory")


def test_a_store_scheme_in_capitals_is_the_same_store_everywhere(tmp_path: Path) -> None:
    # The scheme is read in one place: MEMORY:// snapshots like memory:// does.
    from starlette.testclient import TestClient

    from relay.app import create_app
    from relay.store.snapshot import FILENAME

    settings = Settings(store="MEMORY://", data_dir=str(tmp_path), push_rate=0)
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/workspaces/caps/envelopes", content=b"{}").status_code == 200
    assert (tmp_path / FILENAME).exists()


# ------------------------------------------------------------- Sentinel URLs
def test_sentinel_urls_name_the_sentinels_and_the_service() -> None:
    from relay.store.redis_url import parse_redis_url

    url = "rediss+sentinel://u:p%40ss@s1:26380,[::1]:26381,s3/mymaster/2"
    assert load({"HIVE_RELAY_STORE": url}).store_kind == "redis"
    t = parse_redis_url(url)
    assert (t.kind, t.tls, t.service, t.db) == ("sentinel", True, "mymaster", 2)
    assert t.hosts == (("s1", 26380), ("::1", 26381), ("s3", 26379))
    assert (t.username, t.password) == ("u", "p@ss")
    plain = parse_redis_url("redis+sentinel://h:1/svc")
    assert (plain.tls, plain.db, plain.username, plain.password) == (False, 0, None, None)
    assert parse_redis_url("redis://h:1/0").kind == "standalone"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+sentinel://h:1", "no service name"),
        ("redis+sentinel://h:1/", "no service name"),
        ("redis+sentinel:///svc", "no Sentinel address"),
        ("redis+sentinel://h:x/svc", "no valid port"),
        ("redis+sentinel://h:1,:2/svc", "has no host"),
        ("redis+sentinel://h:1/svc/x", "is not a number"),
    ],
)
def test_a_malformed_sentinel_url_is_refused_at_start(url: str, why: str) -> None:
    with pytest.raises(SettingsError, match=f"HIVE_RELAY_STORE: .*{why}"):
        load({"HIVE_RELAY_STORE": url})


# -------------------------------------------------------------- Cluster URLs
def test_cluster_urls_name_the_startup_nodes() -> None:
    from relay.store.redis_url import parse_redis_url

    url = "rediss+cluster://u:p%40ss@n1:7000,[::1]:7001,n3"
    assert load({"HIVE_RELAY_STORE": url}).store_kind == "redis"
    t = parse_redis_url(url)
    assert (t.kind, t.tls, t.db) == ("cluster", True, 0)
    assert t.hosts == (("n1", 7000), ("::1", 7001), ("n3", 6379))
    assert (t.username, t.password) == ("u", "p@ss")
    plain = parse_redis_url("redis+cluster://h:1/0")
    assert (plain.kind, plain.tls, plain.username, plain.password) == (
        "cluster",
        False,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+cluster://", "no Cluster node address"),
        ("redis+cluster://h:x", "no valid port"),
        ("redis+cluster://h:1,:2", "has no host"),
        ("redis+cluster://h:1/3", "only database 0"),
        ("redis+clusterx://h:1", "unknown store"),
    ],
)
def test_a_malformed_cluster_url_is_refused_at_start(url: str, why: str) -> None:
    with pytest.raises(SettingsError, match=f"HIVE_RELAY_STORE: .*{why}"):
        load({"HIVE_RELAY_STORE": url})


def test_replica_acknowledgement_settings_are_bounded() -> None:
    s = load()
    assert (s.redis_min_replicas, s.redis_wait_ms) == (0, 500)
    with pytest.raises(SettingsError, match="HIVE_RELAY_REDIS_MIN_REPLICAS"):
        load({"HIVE_RELAY_REDIS_MIN_REPLICAS": "17"})
    with pytest.raises(SettingsError, match="HIVE_RELAY_REDIS_WAIT_MS"):
        load({"HIVE_RELAY_REDIS_WAIT_MS": "0"})
