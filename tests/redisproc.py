"""A private `redis-server` for tests: a free loopback port, a temp dir, AOF when asked.

    with RedisServer(aof=True) as server:
        server.url              # redis://127.0.0.1:<port>/0
        server.kill()           # SIGKILL; server.start() brings it back on the same
        server.start()          # port and directory (AOF replayed)

`redis_url()` is the one the store tests use: `REDIS_URL` when set (it must name a
disposable database: tests flush it), else a private server. Tests that kill or pause
Redis need a server of their own and skip under `REDIS_URL`. Without the
`redis-server` binary those tests skip (fail in CI) naming it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

from tests.conftest import require_tool
from tests.relayproc import free_port

STARTUP_TIMEOUT = 15.0


def _sync_client(url: str):  # type: ignore[no-untyped-def]
    redis = pytest.importorskip("redis", reason="the redis extra is not installed")
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)


class RedisServer:
    def __init__(
        self,
        aof: bool = False,
        fsync: str = "always",
        replica_of: int | None = None,
        cluster_node_timeout: int | None = None,
    ) -> None:
        self.binary = require_tool("redis-server")
        self.port = free_port()
        self.replica_of = replica_of  # the primary's port: start as its replica
        # Cluster mode with this node timeout (ms); the bus port is a free port of its own.
        self.cluster_node_timeout = cluster_node_timeout
        self.bus_port = free_port() if cluster_node_timeout is not None else 0
        self.aof = aof
        self.fsync = fsync
        self.dir = Path(tempfile.mkdtemp(prefix="relay-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.aof else "no",
            "--appendfsync",
            self.fsync,
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            str(self.dir / "redis.log"),
            "--daemonize",
            "no",
        ]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        if self.cluster_node_timeout is not None:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.dir / "nodes.conf"),
                "--cluster-node-timeout",
                str(self.cluster_node_timeout),
                "--cluster-port",
                str(self.bus_port),
                # A shard without a primary must not stop the others (issue 15).
                "--cluster-require-full-coverage",
                "no",
                "--cluster-allow-reads-when-down",
                "no",
            ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        client = _sync_client(self.url)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited:\n{self.logs()}")
                try:
                    if client.ping():
                        return
                except Exception:  # not up yet (refused, loading)
                    pass
                time.sleep(0.05)
            raise RuntimeError(f"redis-server did not start:\n{self.logs()}")
        finally:
            client.close()

    def logs(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.dir / "redis.log").read_text(errors="replace")
        return ""

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no shutdown work, like a crash or a lost machine."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.resume()
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def client(self):  # type: ignore[no-untyped-def]
        return _sync_client(self.url)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """A disposable Redis for a test session: REDIS_URL, else a private server."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


def flush(url: str) -> None:
    client = _sync_client(url)
    try:
        client.flushdb()
    finally:
        client.close()


def own_server_required() -> None:
    """Tests that kill or pause Redis cannot use a shared REDIS_URL."""
    if os.environ.get("REDIS_URL"):
        pytest.skip("REDIS_URL is set: this test kills its own redis-server and needs one")


class Sentinels:
    """Three `redis-server --sentinel` processes watching `primary` as service "main",
    with short timeouts so a killed primary's replica is promoted within seconds.

        sentinels.url          # redis+sentinel://127.0.0.1:p1,…/main
        sentinels.primary_port()
    """

    SERVICE = "main"

    def __init__(self, primary: RedisServer, count: int = 3) -> None:
        self.binary = require_tool("redis-server")
        self.primary = primary
        self.ports = [free_port() for _ in range(count)]
        self.dir = Path(tempfile.mkdtemp(prefix="relay-sentinel-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        return f"redis+sentinel://{hosts}/{self.SERVICE}"

    def __enter__(self) -> Sentinels:
        for i, port in enumerate(self.ports):
            conf = self.dir / f"sentinel-{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"logfile {self.dir / f'sentinel-{i}.log'}\n"
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} 400\n"
                f"sentinel failover-timeout {self.SERVICE} 2000\n"
            )
            self.procs.append(
                subprocess.Popen(
                    [self.binary, str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while self.primary_port() != self.primary.port:
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinels did not find the primary")
            time.sleep(0.05)
        return self

    def primary_port(self) -> int | None:
        """The primary's port as the first sentinel that answers names it."""
        redis = pytest.importorskip("redis", reason="the redis extra is not installed")
        for port in self.ports:
            client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
            try:
                addr = client.execute_command("SENTINEL", "get-master-addr-by-name", self.SERVICE)
                if addr:
                    return int(addr[1])
            except Exception:  # not up yet
                pass
            finally:
                client.close()
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """A private Redis Cluster: `primaries` primaries, each with `replicas` replicas,
    made by `redis-cli --cluster create` on free loopback ports (bus ports too), with a
    short node timeout so a killed primary's replica takes over within seconds.

        with RedisCluster(replicas=1) as c:
            c.url                 # redis+cluster://127.0.0.1:p1,127.0.0.1:p2,…
            c.node_for(key)       # the RedisServer that serves key's slot now
            c.keyslot(key)
            c.wait_ok()           # every live node says cluster_state:ok
    """

    def __init__(
        self, primaries: int = 3, replicas: int = 0, node_timeout: int = 1000, aof: bool = False
    ) -> None:
        self.cli = require_tool("redis-cli")
        self.node_timeout = node_timeout
        count = primaries * (1 + replicas)
        self.nodes = [RedisServer(aof=aof, cluster_node_timeout=node_timeout) for _ in range(count)]
        self.primaries = primaries
        self.replicas = replicas

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[: self.primaries])
        return f"redis+cluster://{hosts}"

    def __enter__(self) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            done = subprocess.run(
                [
                    self.cli,
                    "--cluster",
                    "create",
                    *addrs,
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                timeout=60,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout!r}")
            self.wait_ok()
            self.wait_replicas()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def alive(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def info(self, node: RedisServer) -> dict[str, str]:
        client = node.client()
        try:
            text = client.execute_command("CLUSTER", "INFO")
        finally:
            client.close()
        if isinstance(text, bytes):
            text = text.decode()
        if isinstance(text, dict):
            return {str(k): str(v) for k, v in text.items()}
        pairs = (line.split(":", 1) for line in str(text).splitlines() if ":" in line)
        return {k: v.strip() for k, v in pairs}

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node reports cluster_state:ok and agrees on every slot."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [self.info(n) for n in self.alive()]
                if (
                    all(
                        s.get("cluster_state") == "ok" and s.get("cluster_slots_ok") == "16384"
                        for s in states
                    )
                    and self._primaries_agree()
                ):
                    return
            except Exception:  # a node still starting
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def wait_replicas(self, timeout: float = 30.0) -> None:
        """Until every primary has its replicas connected and in sync (state=online)."""
        deadline = time.monotonic() + timeout
        while self.replicas:
            ready = True
            for node in self.primary_nodes():
                client = node.client()
                try:
                    info = client.info("replication")
                finally:
                    client.close()
                links = [v for k, v in info.items() if k.startswith("slave")]
                online = [v for v in links if isinstance(v, dict) and v.get("state") == "online"]
                if len(online) < self.replicas:
                    ready = False
            if ready:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster's replicas did not come online")
            time.sleep(0.1)

    def _primaries_agree(self) -> bool:
        views = {tuple(sorted(self.slot_owners(n).items())) for n in self.alive()}
        return len(views) == 1

    def slot_owners(self, node: RedisServer | None = None) -> dict[int, int]:
        """First slot of each range -> the port of its primary, as `node` sees it."""
        client = (node or self.alive()[0]).client()
        try:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        finally:
            client.close()
        return {int(r[0]): int(r[2][1]) for r in ranges}

    def keyslot(self, key: str) -> int:
        client = self.alive()[0].client()
        try:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))
        finally:
            client.close()

    def node_for(self, key: str) -> RedisServer:
        """The primary serving key's slot now."""
        return self.node_for_slot(self.keyslot(key))

    def workspaces_per_shard(self, per_shard: int, prefix: str = "ws") -> dict[int, list[str]]:
        """Workspace names whose keys land on each primary: port -> names."""
        out: dict[int, list[str]] = {n.port: [] for n in self.primary_nodes()}
        i = 0
        while any(len(names) < per_shard for names in out.values()):
            ws = f"{prefix}{i}"
            names = out[self.node_for(f"relay:{{{ws}}}:log").port]
            if len(names) < per_shard:
                names.append(ws)
            i += 1
        return out

    def replica_of(self, primary: RedisServer) -> list[RedisServer]:
        """The nodes that replicate `primary` now."""
        out = []
        for node in self.alive():
            if node is primary:
                continue
            client = node.client()
            try:
                info = client.info("replication")
            finally:
                client.close()
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == primary.port:
                out.append(node)
        return out

    def node_id(self, node: RedisServer) -> str:
        client = node.client()
        try:
            value = client.execute_command("CLUSTER", "MYID")
        finally:
            client.close()
        return value.decode() if isinstance(value, bytes) else str(value)

    def begin_move(self, slot: int, dst: RedisServer) -> RedisServer:
        """Start moving `slot` to `dst` the way `redis-cli --cluster reshard` does:
        IMPORTING/MIGRATING, then MIGRATE every key of the slot. Until finish_move,
        the source answers ASK for the keys that left. Returns the source."""
        src = self.node_for_slot(slot)
        src_id, dst_id = self.node_id(src), self.node_id(dst)
        d, s = dst.client(), src.client()
        try:
            d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while True:
                keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
                if not keys:
                    break
                s.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)
        finally:
            d.close()
            s.close()
        return src

    def finish_move(self, slot: int, dst: RedisServer) -> None:
        """CLUSTER SETSLOT … NODE on every primary: `dst` owns `slot` from now on."""
        dst_id = self.node_id(dst)
        for node in [dst, *(n for n in self.alive() if n is not dst)]:
            client = node.client()
            try:
                if client.info("replication").get("role") == "master":
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            finally:
                client.close()
        self.wait_ok()

    def move_slot(self, slot: int, dst: RedisServer) -> None:
        self.begin_move(slot, dst)
        self.finish_move(slot, dst)

    def node_for_slot(self, slot: int) -> RedisServer:
        client = self.alive()[0].client()
        try:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        finally:
            client.close()
        for r in ranges:
            if int(r[0]) <= slot <= int(r[1]):
                port = int(r[2][1])
                return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"slot {slot} has no primary")

    def primary_nodes(self) -> list[RedisServer]:
        out = []
        for node in self.alive():
            client = node.client()
            try:
                if client.info("replication").get("role") == "master":
                    out.append(node)
            finally:
                client.close()
        return out

    def flush(self) -> None:
        """FLUSHALL on every primary (tests share one cluster per session)."""
        for node in self.alive():
            client = node.client()
            try:
                if client.info("replication").get("role") == "master":
                    client.flushall()
            finally:
                client.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for node in self.nodes:
            node.stop()
            shutil.rmtree(node.dir, ignore_errors=True)
