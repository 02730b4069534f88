# syntax=docker/dockerfile:1
# The image the Helm chart (helm/jetpool) runs: jetpool installed with `pip install .` into a virtualenv
# and run as a numeric non-root user, so Kubernetes can enforce runAsNonRoot.
#
#   docker build -t jetpool:0.1.0 .
#   docker run --rm jetpool:0.1.0 run -c /usr/share/jetpool/config/example.yaml --nats-url nats://host:4222
#
# A pod runs `jetpool run` (one service's workers), `jetpool api`, `jetpool gateway` or `jetpool provision`
# against a NATS URL and a PostgreSQL DSN, so the image has the base dependencies only (aiohttp and
# asyncpg among them): no extras. No embedded nats-server or PostgreSQL, no psutil (the `local` extra),
# and no rich (the `shop` extra): the shop's terminal tools (jetpool demo, load, chaos, audit) do not run
# in a pod; run them from a workstation with `pip install '.[shop]'`, or read the audit trail with SQL.
# On Kubernetes the chart mounts the config at /etc/jetpool/config.yaml, sets JETPOOL_NATS_URL, makes
# the root filesystem read-only and mounts an emptyDir on /tmp.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/jetpool
WORKDIR /src
# .dockerignore lets in only the package, its metadata and the example configs.
COPY . .
RUN /opt/jetpool/bin/pip install .

FROM ${PYTHON_IMAGE}
# tini, Debian's, as PID 1: it reaps orphaned processes (the kernel re-parents them to PID 1, which
# must wait for them) and passes SIGTERM/SIGINT on to jetpool, whose own handlers start the drain.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*
# The chart's podSecurityContext uses this uid/gid; keep them in step.
RUN groupadd --system --gid 10001 jetpool \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/jetpool --create-home \
            --shell /usr/sbin/nologin jetpool
COPY --from=build /opt/jetpool /opt/jetpool
COPY --from=build /src/config /usr/share/jetpool/config
# Bytecode was compiled at install time; the root filesystem is read-only at run time.
ENV PATH=/opt/jetpool/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Writable: on Kubernetes the chart mounts a data volume here for files a handler keeps, under the
# read-only root filesystem.
WORKDIR /var/lib/jetpool
USER 10001:10001
# /metrics, /health and /ready (jetpool run --http-port 8080); the order API (jetpool api, 8000); the
# payment gateway simulator (jetpool gateway, 8100).
EXPOSE 8080 8000 8100
# tini forwards SIGTERM to the supervisor only (not -g: the supervisor drains its workers itself).
ENTRYPOINT ["tini", "--", "jetpool"]
CMD ["--help"]
