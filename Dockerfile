# hive-relay container image.
#
#   docker build -t hive-relay .
#   docker run -p 8443:8443 -v hive-relay-data:/data hive-relay
#
# Every setting is an environment variable (docs/operations.md). The relay listens
# on 0.0.0.0:8443, or on 0.0.0.0:$PORT when the platform sets PORT (Render does).
# The memory store snapshots into the /data volume (HIVE_RELAY_DATA_DIR).
#
# tests/e2e/test_image_steps.py replays the build stage's RUN steps and the final
# stage's ENTRYPOINT, CMD and HEALTHCHECK in a fresh virtual environment: keep the
# build steps plain `python`/`pip` commands, and the image paths below as they are.

# ---------------------------------------------------------------- build stage
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv
# The build context is filtered by .dockerignore: the package sources and
# pyproject.toml, no tests, docs or local virtual environments.
COPY . .
# A regular (not editable) install: the final stage needs /opt/venv only.
RUN /opt/venv/bin/pip install --no-cache-dir ".[redis]"

# ---------------------------------------------------------------- final stage
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="hive-relay" \
      org.opencontainers.image.description="A content-blind relay for end-to-end-encrypted event envelopes" \
      org.opencontainers.image.licenses="MIT"

# The relay's own user. The data directory belongs to it; /opt/venv stays root's
# (read-only to the relay).
RUN groupadd --system --gid 10001 hive-relay \
    && useradd --system --uid 10001 --gid hive-relay --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin hive-relay \
    && mkdir -p /data \
    && chown 10001:10001 /data \
    && chmod 0750 /data

COPY --from=build /opt/venv /opt/venv
COPY deploy/container-entrypoint.py /usr/local/bin/hive-relay-entrypoint

ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HIVE_RELAY_DATA_DIR=/data

WORKDIR /app
VOLUME ["/data"]
EXPOSE 8443
STOPSIGNAL SIGTERM

# Python itself asks /v1/health (no curl in the image). It reads the same
# $PORT / $HIVE_RELAY_ADDR the relay binds to.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request as u;a=os.environ.get('HIVE_RELAY_ADDR') or '0.0.0.0:8443';p=os.environ.get('PORT') or a.rpartition(':')[2];sys.exit(0 if u.urlopen('http://127.0.0.1:%s/v1/health'%p,timeout=4).status==200 else 1)"]

# The entry point never runs the relay as root: started as root (as on Fly.io and
# Render, whose volumes are mounted root-owned) it hands /data to uid 10001 and
# drops to it; started as any other user (docker run --user, Kubernetes
# runAsUser) it runs the command unchanged.
ENTRYPOINT ["python", "/usr/local/bin/hive-relay-entrypoint"]
CMD ["python", "-m", "relay"]
