"""Settings operators reach for on real platforms: a client-address header set by the
platform's proxy, several token-signing keys during a rotation, and a memory
budget that respects a container's limit."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

import relay.settings as settings_mod
from relay.access import generate_keypair, issue_token
from relay.app import create_app
from relay.limits import client_address, client_key, normalize_address
from relay.settings import Settings, SettingsError, parse_networks


def scope(peer: str, *headers: tuple[bytes, bytes]) -> dict:
    return {"client": (peer, 1234), "headers": list(headers)}


def test_client_ip_header_is_believed_only_from_a_trusted_proxy() -> None:
    trusted = parse_networks("10.0.0.0/8")
    fly = b"fly-client-ip"
    from_proxy = scope(
        "10.1.2.3",
        (b"fly-client-ip", b"203.0.113.9"),
        (b"x-forwarded-for", b"198.51.100.1, 10.9.9.9"),
    )
    assert client_address(from_proxy, trusted, fly) == "203.0.113.9"
    # Without the header setting, X-Forwarded-For (right to left, skipping proxies).
    assert client_address(from_proxy, trusted) == "198.51.100.1"
    # A client that sets the header itself is not a trusted proxy: the socket wins.
    direct = scope("198.51.100.7", (b"fly-client-ip", b"1.2.3.4"))
    assert client_address(direct, trusted, fly) == "198.51.100.7"
    # A header that is not an address falls back to X-Forwarded-For.
    junk = scope("10.1.2.3", (b"fly-client-ip", b"nonsense"), (b"x-forwarded-for", b"192.0.2.5"))
    assert client_address(junk, trusted, fly) == "192.0.2.5"


def test_rate_limits_follow_the_header_address() -> None:
    app = create_app(
        Settings(
            push_rate=1, push_burst=1, trusted_proxies="127.0.0.1", client_ip_header="Fly-Client-IP"
        )
    )
    with TestClient(app, client=("127.0.0.1", 5000)) as c:
        url = "/v1/workspaces/ip/envelopes"
        assert c.post(url, json=1, headers={"Fly-Client-IP": "192.0.2.1"}).status_code == 200
        assert c.post(url, json=2, headers={"Fly-Client-IP": "192.0.2.1"}).status_code == 429
        # Another client behind the same proxy has its own bucket.
        assert c.post(url, json=3, headers={"Fly-Client-IP": "192.0.2.2"}).status_code == 200


@pytest.mark.parametrize(
    "spelling", ["1.2.3.4", "::ffff:1.2.3.4", "::ffff:102:304", "::FFFF:1.2.3.4"]
)
def test_an_ipv4_address_has_one_spelling(spelling: str) -> None:
    # Issue 18 §6: a dual-stack listener reports IPv4 clients as IPv4-mapped IPv6.
    assert normalize_address(spelling) == "1.2.3.4"
    assert client_address(scope(spelling), ()) == "1.2.3.4"
    assert client_key(client_address(scope(spelling), ())) == "1.2.3.4"
    trusted = parse_networks("10.0.0.0/8")
    forwarded = scope("::ffff:10.0.0.1", (b"x-forwarded-for", spelling.encode()))
    assert client_address(forwarded, trusted) == "1.2.3.4"
    fly = scope("10.0.0.1", (b"fly-client-ip", spelling.encode()))
    assert client_address(fly, trusted, b"fly-client-ip") == "1.2.3.4"


def test_ipv6_clients_count_by_their_network() -> None:
    a, b = "2001:db8:1:2::1", "2001:DB8:1:2:ffff:ffff:ffff:fffe"
    assert (
        client_key(normalize_address(a)) == client_key(normalize_address(b)) == "2001:db8:1:2::/64"
    )
    assert client_key("2001:db8:1:3::1") != client_key(a)
    # The prefix is the operator's: /56 joins neighbouring /64s, /128 counts each address.
    assert client_key("2001:db8:1:3::1", 56) == client_key(a, 56) == "2001:db8:1::/56"
    assert client_key(a, 128) == "2001:db8:1:2::1" != client_key(normalize_address(b), 128)
    assert normalize_address("fe80::1%eth0") == "fe80::1"
    for other in ("unknown", "not an address", "1.2.3.4"):
        assert client_key(other) == other


def test_limits_count_one_client_per_ipv4_spelling_and_per_ipv6_network() -> None:
    app = create_app(Settings(push_rate=1, push_burst=1, trusted_proxies="127.0.0.1"))
    with TestClient(app, client=("127.0.0.1", 5000)) as c:
        url = "/v1/workspaces/ip6/envelopes"

        def push(client: str, body: int) -> int:
            return c.post(url, json=body, headers={"X-Forwarded-For": client}).status_code

        assert push("1.2.3.4", 1) == 200
        assert push("::ffff:1.2.3.4", 2) == 429
        assert push("::ffff:102:304", 3) == 429
        assert push("2001:db8::1", 4) == 200
        assert push("2001:db8::2", 5) == 429
        assert push("2001:db8:0:1::1", 6) == 200  # the next /64 is another client
    app = create_app(
        Settings(push_rate=1, push_burst=1, trusted_proxies="127.0.0.1", ipv6_prefix=128)
    )
    with TestClient(app, client=("127.0.0.1", 5000)) as c:
        for n, client in enumerate(("2001:db8::1", "2001:db8::2")):
            r = c.post(url, json=n, headers={"X-Forwarded-For": client})
            assert r.status_code == 200, client


def test_several_signing_keys_accept_tokens_from_each() -> None:
    old_priv, old_pub = generate_keypair()
    new_priv, new_pub = generate_keypair()
    _, other_pub = generate_keypair()
    app = create_app(Settings(token_pubkey=f"{old_pub}, {new_pub}"))
    with TestClient(app) as c:
        for priv in (old_priv, new_priv):
            token = issue_token(bytes.fromhex(priv), "alice")
            r = c.get("/v1/workspaces/k/envelopes", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200
    app = create_app(Settings(token_pubkey=new_pub))
    with TestClient(app) as c:
        token = issue_token(bytes.fromhex(old_priv), "alice")
        r = c.get("/v1/workspaces/k/envelopes", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401  # the dropped key no longer signs valid tokens
    with pytest.raises(SettingsError, match="HIVE_RELAY_TOKEN_PUBKEY"):
        create_app(Settings(token_pubkey=f"{other_pub},not-a-key"))


def test_memory_budget_respects_a_container_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = tmp_path / "memory.max"
    limit.write_text("536870912\n")  # 512 MiB
    monkeypatch.setattr(settings_mod, "CGROUP_LIMITS", (str(limit),))
    assert settings_mod.default_max_bytes() == 128 * 1024 * 1024
    limit.write_text("max\n")  # no limit: the machine's memory decides
    assert settings_mod.default_max_bytes() > 128 * 1024 * 1024
