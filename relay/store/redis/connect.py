"""Clients for the target a store URL names: one Redis, the primary Sentinel names,
or a Redis Cluster.

Every kind gives the store a pooled client for commands and a second client for
the pub/sub connection (watch.py). Through Sentinel, every new connection asks
the Sentinels for the current primary, and a connection to a primary that was
demoted (READONLY) is dropped by redis-py, so a failover is followed without a
relay restart: commands in flight answer 503 until the new primary is known.

For a Cluster, `redis` is redis-py's `RedisCluster` (it follows MOVED/ASK and
refreshes its slot map after a node fails), and `node_client(host, port)` makes
plain clients for one node: the sharded pub/sub connections (one per shard
primary) and the writes that must WAIT on the connection that made them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis import exceptions as rx
from redis._parsers import AsyncCommandsParser
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from relay.store.redis_url import RedisTarget, parse_redis_url


@dataclass(frozen=True, slots=True)
class Timeouts:
    socket: float  # a command's reply
    connect: float  # opening a connection
    pool_size: int  # connections per relay process
    pool_wait: float  # waiting for a free pooled connection


@dataclass(slots=True)
class Clients:
    redis: Any  # pooled, for commands
    pubsub: Any  # for the pub/sub connection: no read timeout, no retries
    where: str  # for logs: host:port/db, or sentinel service@hosts
    sentinel: Sentinel | None = None
    cluster: bool = False
    node_options: dict[str, Any] | None = None  # cluster: for node_client()
    timeouts: Timeouts | None = None
    startup: tuple[tuple[str, int], ...] = ()  # cluster: the nodes the URL names

    def node_client(self, host: str, port: int, **options: Any) -> Redis:
        """A plain client for one Cluster node (its credentials and TLS, these options)."""
        return Redis(host=host, port=port, **{**(self.node_options or {}), **options})

    def node_pool_client(self, host: str, port: int) -> Redis:
        """A pooled client for one Cluster node whose requests wait for a free connection.

        Like the standalone pool: at most `pool_size` connections, and a request
        past them waits up to `pool_wait` seconds (then 503) instead of failing.
        """
        assert self.timeouts is not None
        options = dict(self.node_options or {})
        tls = bool(options.pop("ssl", False))
        pool = BlockingConnectionPool(
            connection_class=SSLConnection if tls else Connection,
            max_connections=self.timeouts.pool_size,
            timeout=self.timeouts.pool_wait,
            host=host,
            port=port,
            **options,
        )
        return Redis(connection_pool=pool)

    async def aclose(self) -> None:
        await self.redis.aclose()
        if self.pubsub is not None:
            await self.pubsub.aclose()
        if self.sentinel is not None:
            await self.sentinel.aclose()


def _command_retry() -> Retry:
    # One retry, on connection errors only: a pooled connection that died with a
    # restarted (or demoted) Redis is replaced once. Timeouts are not retried (a
    # command that timed out may have run; the wait stays bounded).
    return Retry(NoBackoff(), 1, supported_errors=(rx.ConnectionError,))


def pubsub_options(t: Timeouts) -> dict[str, Any]:
    return {
        "socket_timeout": None,
        "socket_connect_timeout": t.connect,
        "health_check_interval": 0,
        "retry": Retry(NoBackoff(), 0),
        "protocol": 2,
    }


def open_clients(url: str, t: Timeouts) -> Clients:
    target = parse_redis_url(url)
    if target.kind == "sentinel":
        return _sentinel_clients(target, t)
    if target.kind == "cluster":
        return _cluster_clients(target, t)
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=t.pool_size,
        timeout=t.pool_wait,
        socket_timeout=t.socket,
        socket_connect_timeout=t.connect,
        retry=_command_retry(),
    )
    kw = pool.connection_kwargs
    if "path" in kw:
        where = str(kw["path"])
    else:
        where = f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"
    return Clients(Redis(connection_pool=pool), Redis.from_url(url, **pubsub_options(t)), where)


def _sentinel_clients(target: RedisTarget, t: Timeouts) -> Clients:
    node: dict[str, Any] = {"db": target.db, "ssl": target.tls}
    if target.username is not None:
        node["username"] = target.username
    if target.password is not None:
        node["password"] = target.password
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.hosts),
        sentinel_kwargs={"socket_timeout": t.connect, "socket_connect_timeout": t.connect},
    )
    redis = sentinel.master_for(
        target.service,
        max_connections=t.pool_size,
        socket_timeout=t.socket,
        socket_connect_timeout=t.connect,
        retry=_command_retry(),
        **node,
    )
    pubsub = sentinel.master_for(target.service, **pubsub_options(t), **node)
    hosts = ",".join(f"{h}:{p}" for h, p in target.hosts)
    return Clients(redis, pubsub, f"sentinel {hosts} service {target.service}", sentinel)


class _CommandsOnce(AsyncCommandsParser):
    """redis-py's key parser for RedisCluster, asking COMMAND only once.

    RedisCluster re-initialises after any connection error, and that re-asks
    COMMAND of its default node before the command at hand: with the default
    node dead (a shard down), every command to every shard would fail. COMMAND's
    answer does not change while the relay runs, so the first one is kept.
    """

    async def initialize(self, node: Any = None) -> None:
        if self.commands:
            return
        await super().initialize(node)


# The task's claim on a Cluster connection, so that a pipeline or a command that
# redis-py runs inside another one (its retries, a slot-map refresh) takes no second one.
_HOLDING: contextvars.ContextVar[bool] = contextvars.ContextVar("holding", default=False)


class _WaitingCluster(RedisCluster):
    """RedisCluster whose commands wait for a free connection instead of failing.

    redis-py's Cluster nodes keep a fixed number of connections and raise
    MaxConnectionsError at once when all are busy (the standalone relay uses a
    BlockingConnectionPool, which waits). Here every command and pipeline first
    takes one of `limit` places, waiting up to `wait` seconds; past that it fails
    as the standalone pool does ("No connection available", 503). One place
    covers one connection on each node the command or pipeline touches, so with
    at most `limit` places taken no node's pool is ever exhausted.
    """

    def __init__(self, *args: Any, limit: int, wait: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._places = asyncio.Semaphore(limit)
        self._place_wait = wait

    @contextlib.asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        if _HOLDING.get():
            yield
            return
        try:
            async with asyncio.timeout(self._place_wait):
                await self._places.acquire()
        except TimeoutError:
            raise rx.ConnectionError("No connection available.") from None
        token = _HOLDING.set(True)
        try:
            yield
        finally:
            _HOLDING.reset(token)
            self._places.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.place():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # redis-py's refusal
        return _WaitingPipeline(self, transaction)  # type: ignore[abstract]


class _WaitingPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        client = self.cluster_client
        assert isinstance(client, _WaitingCluster)
        async with client.place():
            return await super().execute(raise_on_error, allow_redirections)


CLUSTER_RETRIES = 2  # a command is tried this often more after a node failure (slot map refreshed)


def _cluster_clients(target: RedisTarget, t: Timeouts) -> Clients:
    node: dict[str, Any] = {"ssl": target.tls}
    if target.username is not None:
        node["username"] = target.username
    if target.password is not None:
        node["password"] = target.password
    redis = _WaitingCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in target.hosts],
        # At most pool_size commands in flight (waiting up to pool_wait for a place);
        # the nodes' own cap is twice that, room for connections redis-py is still
        # closing in the background after a node failure (they count until closed).
        limit=t.pool_size,
        wait=t.pool_wait,
        # A shard without a primary must not stop the others: their slots keep working,
        # the uncovered ones answer 503 (SlotNotCoveredError, errors.py).
        require_full_coverage=False,
        max_connections=2 * t.pool_size,
        socket_timeout=t.socket,
        socket_connect_timeout=t.connect,
        retry=Retry(NoBackoff(), CLUSTER_RETRIES),
        **node,
    )
    redis.commands_parser = _CommandsOnce()
    options = {**node, "socket_timeout": t.socket, "socket_connect_timeout": t.connect}
    hosts = ",".join(f"{h}:{p}" for h, p in target.hosts)
    return Clients(
        redis,
        None,
        f"cluster {hosts}",
        cluster=True,
        node_options=options,
        timeouts=t,
        startup=target.hosts,
    )
