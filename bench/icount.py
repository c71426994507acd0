"""Server-side instructions per request, counted by callgrind: repeatable on a busy machine.

Wall-clock rates on a shared two-core machine swing by tens of percent from one
run to the next; instruction counts do not. This runs the server (relay or the
bare-Starlette ceiling) under `valgrind --tool=callgrind`, sends N and then
N + K requests in two runs, and reports (instructions(N+K) - instructions(N)) / K:
the whole server-side cost of one request — uvicorn, httptools, Starlette and
our code — without start-up. A CPU-bound server's rate is inversely
proportional to it, so ceiling / relay approximates the rate ratio.

    python bench/icount.py            # prints JSON lines, one per case
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
from tests.relayproc import free_port, relay_env  # noqa: E402

PAD = "a" * 980


def _server_cmd(kind: str, port: int) -> list[str]:
    if kind == "ceiling":
        return [sys.executable, str(HERE / "ceiling.py"), "--port", str(port)]
    return [sys.executable, "-m", "relay", "--addr", f"127.0.0.1:{port}"]


ACCESS_LOG = "false"  # --access-log: the default configuration, one line per request


def _run(kind: str, case: str, n: int, fsync: str = "") -> tuple[int, int]:
    port = free_port()
    out = Path(tempfile.mkdtemp()) / "cg.out"  # kept for _crypto(); removed there
    env = relay_env({"HIVE_RELAY_PUSH_RATE": "0", "HIVE_RELAY_ACCESS_LOG": ACCESS_LOG})
    if fsync and fsync != "none":  # a journal in a fresh data dir beside the output
        env["HIVE_RELAY_DATA_DIR"] = str(out.parent / "data")
        env["HIVE_RELAY_FSYNC"] = fsync
        env["HIVE_RELAY_SNAPSHOT_INTERVAL"] = "86400"  # the journal's cost alone
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *_server_cmd(kind, port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600  # valgrind starts slowly on a loaded machine
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/v1/health")
            conn.getresponse().read()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("server did not start under valgrind") from None
            time.sleep(0.2)
    ws = f"ic{os.getpid()}"
    if case == "read":
        path = "/read?size=2700" if kind == "ceiling" else None
        if kind == "relay":
            for i in range(1000):
                body = json.dumps({"n": i, "p": PAD})
                conn.request("POST", f"/v1/workspaces/{ws}/envelopes", body)
                conn.getresponse().read()
            conn.request("GET", f"/v1/workspaces/{ws}/envelopes?after=0")
            conn.getresponse().read()
            conn.request("GET", f"/v1/workspaces/{ws}/envelopes?after=0&limit=1000")
            seqs = [row["seq"] for row in json.loads(conn.getresponse().read())]
            path = f"/v1/workspaces/{ws}/envelopes?after={seqs[-6]}&limit=5"
        for _ in range(n):
            conn.request("GET", path)  # type: ignore[arg-type]
            conn.getresponse().read()
    else:
        target = "/append" if kind == "ceiling" else f"/v1/workspaces/{ws}/envelopes"
        if kind == "relay" and not fsync:  # at its 50,000 cap, so every push also prunes
            for start in range(0, 50_000, 1000):
                batch = [{"n": f"fill-{i}", "p": PAD} for i in range(start, start + 1000)]
                conn.request("POST", target + "/batch", json.dumps(batch))
                conn.getresponse().read()
        for i in range(n):
            conn.request(
                "POST",
                target,
                json.dumps({"n": f"{os.getpid()}-{i}", "p": PAD}),
                {"Content-Type": "application/json"},
            )
            conn.getresponse().read()
    conn.close()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    match = re.search(r"Collected : (\d+)", err)
    if not match:
        raise RuntimeError(err[-2000:])
    return int(match.group(1)), _crypto(out)


def _crypto(out: Path) -> int:
    """Instructions spent in libcrypto (OpenSSL: hashlib's SHA-256).

    valgrind does not execute SHA-NI, so under callgrind OpenSSL hashes with its
    generic code: 20,000–30,000 instructions per 1 KiB body in our runs (the
    count varies between runs), where this machine's CPU takes about 1.2 µs.
    Reported apart so the ratio can be read with and without that artefact (the
    ceiling hashes nothing).
    """
    try:
        text = subprocess.run(
            ["callgrind_annotate", "--threshold=100", str(out)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    total = 0
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+.*libcrypto", line)
        if m:
            total += int(m.group(1).replace(",", ""))
    return total


def per_request(
    kind: str, case: str, base: int, extra: int, fsync: str = ""
) -> tuple[float, float]:
    """Instructions per request, and the libcrypto part of them."""
    long_total, long_crypto = _run(kind, case, base + extra, fsync)
    short_total, short_crypto = _run(kind, case, base, fsync)
    return (long_total - short_total) / extra, (long_crypto - short_crypto) / extra


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base", type=int, default=200)
    p.add_argument("--extra", type=int, default=1000)
    p.add_argument("--case", choices=["publish", "read", "all"], default="all")
    p.add_argument(
        "--access-log", action="store_true", help="the relay with its access log on (default)"
    )
    p.add_argument(
        "--journal",
        action="store_true",
        help="publish only: the relay memory-only and with its journal (fsync always, "
        "everysec), one client, into an empty workspace: the journal's instructions "
        "per publish",
    )
    a = p.parse_args()
    global ACCESS_LOG
    ACCESS_LOG = "true" if a.access_log else "false"
    if shutil.which("valgrind") is None:
        print("needs valgrind (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    if a.journal:
        base_instr, _ = per_request("relay", "publish", a.base, a.extra, "none")
        for fsync in ("always", "everysec"):
            instr, _ = per_request("relay", "publish", a.base, a.extra, fsync)
            print(
                json.dumps(
                    {
                        "case": f"publish, journal fsync {fsync}",
                        "memory_only_instr": round(base_instr),
                        "journal_instr": round(instr),
                        "journal_extra_instr": round(instr - base_instr),
                        "ratio": round(base_instr / instr, 3),
                    }
                )
            )
        return 0
    cases = ["publish", "read"] if a.case == "all" else [a.case]
    for case in cases:
        ceiling, ceiling_crypto = per_request("ceiling", case, a.base, a.extra)
        relay, relay_crypto = per_request("relay", case, a.base, a.extra)
        print(
            json.dumps(
                {
                    "case": case,
                    "ceiling_instr": round(ceiling),
                    "relay_instr": round(relay),
                    "ratio": round(ceiling / relay, 3),
                    "relay_sha256_instr": round(relay_crypto),
                    "ratio_without_sha256": round(
                        (ceiling - ceiling_crypto) / (relay - relay_crypto), 3
                    ),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
