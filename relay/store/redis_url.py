"""The one parser of Redis store URLs, with no redis-py import (settings check with it).

    redis://[user:pass@]host:port/db            one Redis (rediss:// for TLS)
    redis+sentinel://[user:pass@]h:p[,h:p…]/service[/db]
                                                the primary Sentinel names `service`
                                                (rediss+sentinel:// for TLS)
    redis+cluster://[user:pass@]h:p[,h:p…]      a Redis Cluster, found from any of
                                                these nodes (rediss+cluster:// for TLS)

The credentials in a Sentinel URL are the data nodes' (the primary and its
replicas); the Sentinels are asked with no password, as redis-py does by default.
A Cluster URL names some of its nodes (any one reachable is enough to find the
rest) and has no database: a Cluster has only database 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from relay.settings import SettingsError

SENTINEL_DEFAULT_PORT = 26379
REDIS_DEFAULT_PORT = 6379


@dataclass(frozen=True, slots=True)
class RedisTarget:
    kind: str  # "standalone", "sentinel" or "cluster"
    url: str  # the URL as given (standalone: what redis-py's from_url reads)
    tls: bool = False
    hosts: tuple[tuple[str, int], ...] = ()  # sentinel: the Sentinels; cluster: startup nodes
    service: str = ""  # sentinel: the monitored primary's name
    db: int = 0
    username: str | None = None
    password: str | None = None


def _bad(url: str, why: str) -> SettingsError:
    return SettingsError(f"HIVE_RELAY_STORE: {why} in {_redact(url)!r}")


def _redact(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def _host_port(url: str, part: str, what: str, default_port: int) -> tuple[str, int]:
    part = part.strip()
    if part.startswith("["):  # [v6]:port
        host, _, tail = part[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = part.rpartition(":") if ":" in part else (part, "", "")
    if not host:
        raise _bad(url, f"a {what} address {part!r} has no host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url, f"a {what} address {part!r} has no valid port")
    return host, int(port_text)


def parse_redis_url(url: str) -> RedisTarget:
    """The target a redis… store URL names; SettingsError naming what is wrong."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise _bad(url, "no scheme")
    if scheme in ("redis", "rediss"):
        return RedisTarget("standalone", url, tls=scheme == "rediss")
    if scheme in ("redis+cluster", "rediss+cluster"):
        return _cluster(url, scheme, rest)
    if scheme not in ("redis+sentinel", "rediss+sentinel"):
        raise _bad(url, f"unknown scheme {scheme!r}")
    netloc, _, path = rest.partition("/")
    username, password, netloc = _credentials(netloc)
    if not netloc:
        raise _bad(url, "no Sentinel address")
    hosts = tuple(
        _host_port(url, part, "Sentinel", SENTINEL_DEFAULT_PORT) for part in netloc.split(",")
    )
    path = urlsplit("x://h/" + path).path.strip("/")
    service, _, db_text = path.partition("/")
    if not service:
        raise _bad(url, "no service name (…/service-name after the Sentinels)")
    db = 0
    if db_text:
        if not db_text.isdigit():
            raise _bad(url, f"the database {db_text!r} is not a number")
        db = int(db_text)
    return RedisTarget(
        "sentinel",
        url,
        tls=scheme == "rediss+sentinel",
        hosts=hosts,
        service=unquote(service),
        db=db,
        username=username,
        password=password,
    )


def _credentials(netloc: str) -> tuple[str | None, str | None, str]:
    username = password = None
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        user, colon, pw = cred.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    return username, password, netloc


def _cluster(url: str, scheme: str, rest: str) -> RedisTarget:
    netloc, _, path = rest.partition("/")
    username, password, netloc = _credentials(netloc)
    if not netloc:
        raise _bad(url, "no Cluster node address")
    hosts = tuple(
        _host_port(url, part, "Cluster node", REDIS_DEFAULT_PORT) for part in netloc.split(",")
    )
    path = urlsplit("x://h/" + path).path.strip("/")
    if path not in ("", "0"):
        raise _bad(url, f"a Redis Cluster has only database 0, not {path!r}")
    return RedisTarget(
        "cluster",
        url,
        tls=scheme == "rediss+cluster",
        hosts=hosts,
        username=username,
        password=password,
    )
