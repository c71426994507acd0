"""The container image's entry point: run the command (CMD) as the relay's own user.

Started as root, which is how Fly.io and Render start a container and how their
volumes arrive (mounted root-owned), it first gives the data directory
($HIVE_RELAY_DATA_DIR, and the files at its top level such as relay.snapshot) to
uid/gid 10001, then drops to that user for good and execs the command. Started as
any other user (`docker run --user`, Kubernetes `runAsUser`), it execs the command
unchanged. The relay never runs as root.

Only the standard library: the image has no shell tools beyond Debian's base.
"""

from __future__ import annotations

import os
import sys

RELAY_UID = 10001
RELAY_GID = 10001


def _give_data_dir(path: str) -> None:
    os.makedirs(path, mode=0o750, exist_ok=True)
    entries = [path, *(os.path.join(path, name) for name in os.listdir(path))]
    for entry in entries:
        st = os.lstat(entry)
        if (st.st_uid, st.st_gid) != (RELAY_UID, RELAY_GID):
            os.lchown(entry, RELAY_UID, RELAY_GID)


def main(argv: list[str]) -> None:
    if not argv:
        argv = [sys.executable, "-m", "relay"]
    if os.getuid() == 0:
        data_dir = os.environ.get("HIVE_RELAY_DATA_DIR", "").strip()
        if data_dir:
            try:
                _give_data_dir(data_dir)
            except OSError as exc:  # a read-only mount: the relay reports it clearly
                print(f"hive-relay-entrypoint: cannot prepare {data_dir}: {exc}", file=sys.stderr)
        os.setgroups([])
        os.setgid(RELAY_GID)
        os.setuid(RELAY_UID)
        if os.getuid() == 0 or os.geteuid() == 0:  # pragma: no cover - defensive
            sys.exit("hive-relay-entrypoint: could not drop root")
    os.execvp(argv[0], argv)  # noqa: S606 - exec the command, no shell


if __name__ == "__main__":
    main(sys.argv[1:])
