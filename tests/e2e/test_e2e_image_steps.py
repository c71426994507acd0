"""The Dockerfile's steps, replayed without Docker (no engine on these machines).

From a clean copy of the repository (the working tree's tracked and untracked,
not ignored, files, filtered by .dockerignore: the image's build context), the
test runs the build stage's RUN commands as written, with the image's absolute
paths placed under a temporary root, into a fresh virtual environment; then it
starts the relay with the final stage's ENV, WORKDIR, ENTRYPOINT and CMD, with
$PORT set as Render sets it, and checks /v1/health, the HEALTHCHECK command, the
volume (a snapshot survives a restart) and, when the test runs as root, that the
entry point hands a root-owned /data to uid 10001 and drops to it.

One deliberate difference: pip's download cache is allowed (the Dockerfile
disables it to keep the layer small), so a re-run does not download again.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from e2e_helpers import REPO, Proc, clean_env, free_port, wait_for

from tests.conftest import require_tool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RELAY_UID = 10001
# The image's Python is 3.11 on Debian bookworm; Debian's own python3.11 is the
# closest interpreter here, and one every user can run (the privilege drop needs
# that); otherwise the interpreter running the tests.
DEBIAN_PYTHON = Path("/usr/bin/python3.11")


@dataclass
class Stage:
    name: str
    base: str
    steps: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.steps if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name}: expected one {keyword}, found {found}"
        return found[0]


def parse_dockerfile(text: str) -> list[Stage]:
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=parts[0]))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].steps.append((keyword, args))
    return stages


def parse_env(args: str, current: dict[str, str]) -> dict[str, str]:
    out = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        assert sep, f"ENV {token!r}: use the KEY=value form"
        for name, val in {**current, **out}.items():
            value = value.replace(f"${name}", val).replace(f"${{{name}}}", val)
        out[key] = value
    return out


class ImageRoot:
    """Absolute paths of the image, placed under a local directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, image_path: str) -> Path:
        assert image_path.startswith("/"), image_path
        return self.root / image_path.lstrip("/")

    def token(self, token: str) -> str:
        return str(self.path(token)) if token.startswith("/") else token

    def env_value(self, value: str) -> str:
        return ":".join(self.token(part) for part in value.split(":"))


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "negations are not replayed here"
    return patterns


def ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.strip("/")
        if pattern.startswith("**/"):
            sub = pattern[3:]
            if any(fnmatch.fnmatchcase(part, sub) for part in parts):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
    return False


def build_context(dest: Path) -> list[str]:
    """The build context: the working tree's files git would commit, minus .dockerignore."""
    git = require_tool("git")
    listed = subprocess.run(
        [git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    patterns = dockerignore_patterns()
    copied = []
    for rel in sorted(set(filter(None, listed.split("\0")))):
        src = REPO / rel
        if not src.is_file() or ignored(rel, patterns):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
        copied.append(rel)
    return copied


@dataclass
class Image:
    root: ImageRoot
    env: dict[str, str]
    workdir: Path
    command: list[str]
    healthcheck: list[str]
    data_dir: Path


@pytest.fixture(scope="module")
def dockerfile() -> list[Stage]:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def image(dockerfile: list[Stage]) -> Iterator[Image]:
    build, final = dockerfile[0], dockerfile[-1]
    # A directory every user can traverse: the relay may run as uid 10001.
    top = Path(tempfile.mkdtemp(prefix="hive-relay-image-"))
    top.chmod(0o755)
    try:
        yield _build_image(top, build, final)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _interpreter() -> str:
    if DEBIAN_PYTHON.exists():
        return str(DEBIAN_PYTHON)
    return getattr(sys, "_base_executable", sys.executable)


def _build_image(top: Path, build: Stage, final: Stage) -> Image:
    root = ImageRoot(top / "root")
    context = top / "context"
    context.mkdir()
    copied = build_context(context)
    assert "pyproject.toml" in copied
    assert any(c.startswith("relay/") for c in copied)
    assert "deploy/container-entrypoint.py" in copied
    assert not any(c.startswith(("tests/", "docs/", ".venv/", ".git/")) for c in copied)

    # ---- build stage: WORKDIR, ENV, COPY . ., RUN … as written.
    shim = top / "shim"
    shim.mkdir()
    (shim / "python").symlink_to(_interpreter())
    env = clean_env({"PATH": f"{shim}:{os.environ.get('PATH', '/usr/bin:/bin')}"})
    cwd = context
    for keyword, args in build.steps:
        if keyword == "ENV":
            env.update(parse_env(args, env))
        elif keyword == "WORKDIR":
            cwd = context  # the build context lands in the WORKDIR via `COPY . .`
        elif keyword == "COPY":
            assert args == ". .", f"build stage COPY {args!r} is not replayed by this test"
        elif keyword == "RUN":
            argv = shlex.split(args)
            assert not set(argv) & {"&&", "||", ";", "|"}, f"keep RUN plain: {args}"
            argv = [root.token(t) for t in argv if t != "--no-cache-dir"]
            run_env = {k: v for k, v in env.items() if k != "PIP_NO_CACHE_DIR"}
            done = subprocess.run(
                argv, cwd=cwd, env=run_env, capture_output=True, text=True, timeout=240, check=False
            )
            assert done.returncode == 0, f"RUN {args} failed:\n{done.stdout}\n{done.stderr}"
        else:
            raise AssertionError(f"build stage {keyword} is not replayed by this test")

    # ---- final stage: COPY, ENV, WORKDIR, ENTRYPOINT, CMD, HEALTHCHECK.
    final_env = clean_env()
    final_env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    workdir = root.path("/")
    entrypoint: list[str] = []
    command: list[str] = []
    healthcheck: list[str] = []
    for keyword, args in final.steps:
        if keyword == "COPY":
            parts = args.split()
            if parts[0].startswith("--from="):
                assert parts[0] == f"--from={build.name}" and parts[1] == parts[2], args
                assert root.path(parts[2]).exists(), f"{parts[2]} was not built"
            else:
                src, dest = parts
                root.path(dest).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(context / src, root.path(dest))
        elif keyword == "ENV":
            values = parse_env(args, final_env)
            final_env.update({k: root.env_value(v) for k, v in values.items()})
        elif keyword == "WORKDIR":
            workdir = root.path(args)
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "ENTRYPOINT":
            entrypoint = [root.token(t) for t in json.loads(args)]
        elif keyword == "CMD":
            command = [root.token(t) for t in json.loads(args)]
        elif keyword == "HEALTHCHECK":
            _, _, exec_form = args.partition("CMD ")
            healthcheck = json.loads(exec_form)
        elif keyword == "RUN":
            # Only the user and the data directory are made here (not replayed:
            # they change the system); never packages or build tools.
            assert not any(w in args for w in ("apt-get", "pip ", "gcc", "build-essential"))
        else:
            assert keyword in ("LABEL", "VOLUME", "EXPOSE", "STOPSIGNAL"), keyword
    assert entrypoint and command and healthcheck
    data_dir = Path(final_env["HIVE_RELAY_DATA_DIR"])
    # Like a fresh Fly.io or Render volume: an empty, root-owned mount point.
    data_dir.mkdir(parents=True)
    for p in (top, root.root, root.path("/opt"), workdir):
        p.chmod(0o755)
    return Image(root, final_env, workdir, entrypoint + command, healthcheck, data_dir)


def _run_relay(image: Image, port: int, log: Path) -> Proc:
    env = {**image.env, "PORT": str(port)}
    argv = list(image.command)
    argv[0] = shutil.which(argv[0], path=env["PATH"]) or argv[0]
    return Proc(argv, env=env, cwd=image.workdir, log_path=log)


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_the_image_steps_build_and_serve(image: Image, tmp_path: Path) -> None:
    venv_python = image.root.path("/opt/venv/bin/python")
    # The relay comes from the virtual environment, not from a source tree.
    where = subprocess.run(
        [str(venv_python), "-c", "import relay, client; print(relay.__file__)"],
        cwd=image.workdir,
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    ).stdout.strip()
    assert where.startswith(str(image.root.path("/opt/venv/lib"))), where
    redis = subprocess.run(
        [str(venv_python), "-c", "import redis"], capture_output=True, env=clean_env(), check=False
    )
    assert redis.returncode == 0, "the image installs the redis extra"

    port = free_port()
    relay = _run_relay(image, port, tmp_path / "relay1.log")
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            if not relay.alive():
                raise AssertionError(f"the relay exited:\n{relay.logs()}")
            try:
                return httpx.get(url + "/v1/health", timeout=1).text == "ok"
            except httpx.HTTPError:
                return False

        wait_for(healthy, 30, "the relay started by the image's entry point")
        # $PORT won over the image's default 8443, on all interfaces.
        assert f"listening on 0.0.0.0:{port}" in relay.logs()
        if os.getuid() == 0:
            # Started as root, like Fly.io and Render: the relay runs as uid 10001
            # and the root-owned volume was handed to it.
            assert _uid_of(relay.pid) == RELAY_UID
            assert image.data_dir.stat().st_uid == RELAY_UID

        # The HEALTHCHECK command, as Docker would run it (same env).
        check = subprocess.run(
            image.healthcheck,
            env={**image.env, "PORT": str(port)},
            cwd=image.workdir,
            capture_output=True,
            timeout=10,
            check=False,
        )
        assert shutil.which(image.healthcheck[0], path=image.env["PATH"]) == str(
            image.root.path("/opt/venv/bin/python")
        ), "the health check's python is the image's"
        assert check.returncode == 0, check.stderr

        seq = httpx.post(f"{url}/v1/workspaces/img/envelopes", json={"v": 1}).json()["seq"]
        assert relay.stop(signal.SIGTERM, timeout=20) == 0
    finally:
        relay.stop()
    snapshot = image.data_dir / "relay.snapshot"
    assert snapshot.exists(), "the graceful stop wrote the snapshot into the volume"
    if os.getuid() == 0:
        assert snapshot.stat().st_uid == RELAY_UID

    # A new container on the same volume has the envelope back.
    port2 = free_port()
    relay = _run_relay(image, port2, tmp_path / "relay2.log")
    try:
        url = f"http://127.0.0.1:{port2}"
        wait_for(lambda: _get_rows(url) is not None, 30, "the relay to restart on the same volume")
        assert _get_rows(url) == [{"seq": seq, "body": {"v": 1}}]
    finally:
        assert relay.stop(signal.SIGTERM, timeout=20) == 0
    # And the health check fails once nothing listens.
    down = subprocess.run(
        image.healthcheck,
        env={**image.env, "PORT": str(port2)},
        capture_output=True,
        timeout=10,
        check=False,
    )
    assert down.returncode != 0


def _get_rows(url: str) -> list[object] | None:
    try:
        r = httpx.get(f"{url}/v1/workspaces/img/envelopes", timeout=1)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def test_dockerfile_shape(dockerfile: list[Stage]) -> None:
    """What the issue asks of the image, read off the Dockerfile itself."""
    assert len(dockerfile) >= 2, "multi-stage"
    build, final = dockerfile[0], dockerfile[-1]
    for stage in dockerfile:
        assert stage.base.startswith("python:3.11-slim"), stage.base
    assert final.one("EXPOSE") == "8443"
    assert json.loads(final.one("CMD")) == ["python", "-m", "relay"]
    assert "HIVE_RELAY_DATA_DIR=/data" in final.one("ENV")
    assert json.loads(final.one("VOLUME")) == ["/data"]
    health = final.one("HEALTHCHECK")
    assert "/v1/health" in health and json.loads(health.partition("CMD ")[2])[0] == "python"
    assert "curl" not in health and "wget" not in health
    # The relay's user exists in the image and owns /data; the entry point drops
    # to it (deploy/container-entrypoint.py), and never runs the relay as root.
    user_step = next(args for kw, args in final.steps if kw == "RUN" and "useradd" in args)
    assert f"--uid {RELAY_UID}" in user_step and f"chown {RELAY_UID}:{RELAY_UID} /data" in user_step
    entry = (REPO / "deploy" / "container-entrypoint.py").read_text()
    assert f"RELAY_UID = {RELAY_UID}" in entry and "os.setuid(RELAY_UID)" in entry
    users = final.all("USER")
    assert not users or users[-1] not in ("root", "0", "0:0")
    # No build tools in the final image: nothing is installed there.
    for kw, args in final.steps:
        if kw == "RUN":
            assert not any(w in args for w in ("apt-get", "apk ", "pip ", "gcc", "build-essential"))
    assert any(kw == "RUN" and "pip install" in args for kw, args in build.steps)
