# syntax=docker/dockerfile:1
# The image the Helm chart (helm/jetpool) runs: jetpool installed with `pip install .` into a virtualenv
# and run as a numeric non-root user, so Kubernetes can enforce runAsNonRoot.
#
#   docker build -t jetpool:0.1.0 .
#   docker run --rm jetpool:0.1.0 run -c /usr/share/jetpool/config/example.yaml --nats-url nats://host:4222
#
# A pod runs `jetpool run` against a NATS URL, so the image has only what that needs: no extras (no
# embedded nats-server, no psutil, no rich: those are the `local` and `shop` extras of this machine's
# tools). On Kubernetes the chart mounts the config at /etc/jetpool/config.yaml, sets JETPOOL_NATS_URL,
# makes the root filesystem read-only and mounts an emptyDir on /tmp.
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
# Writable: on Kubernetes the chart mounts a data volume here for the handlers' files (SQLite audit store,
# gateway ledger) under the read-only root filesystem.
WORKDIR /var/lib/jetpool
USER 10001:10001
# /metrics, /health and /ready (jetpool run --http-port 8080).
EXPOSE 8080
# SIGTERM goes straight to the supervisor, which drains its workers before exiting.
ENTRYPOINT ["jetpool"]
CMD ["--help"]
