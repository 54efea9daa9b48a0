# syntax=docker/dockerfile:1.7
# The stream image: the `opal` CLI and the workers (enrich, index, judge, preferences, topology). No torch.
# Build from the repository root (BuildKit reads stream.Dockerfile.dockerignore beside this file):
#   docker build -f deploy/docker/stream.Dockerfile -t opal-stream:0.1.0 .
# Run: docker run opal-stream:0.1.0 worker enrich     (every argument is `opal`'s; see deploy/README.md)
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY inference inference
COPY topology topology
COPY workers workers
COPY training training
COPY opal opal
RUN /opt/venv/bin/pip install ".[stream]" \
    && ! /opt/venv/bin/python -c "import torch" 2>/dev/null
# the wheel carries the data files too (package data in pyproject.toml): load the default category schemas as a check
RUN cd / && /opt/venv/bin/python -c "from schemas.schema_source import DEFAULT_LOCATIONS, load_locations; load_locations(DEFAULT_LOCATIONS)"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 opal \
    && useradd --system --uid 10001 --gid opal --home-dir /var/lib/opal --create-home --shell /usr/sbin/nologin opal \
    && install -d -o opal -g opal /data/preferences
COPY --from=build /opt/venv /opt/venv
# OPAL_WORKER_METRICS_PORT: every worker serves /metrics on 9100 in its own container (index and judge take
# --metrics-port 9100) on all interfaces (OPAL_WORKER_METRICS_HOST), for probes and Prometheus. The run dir holds worker announcements;
# /data/preferences (owned by opal, so a fresh volume there is writable) the preference builder's shards.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OPAL_WORKER_METRICS_HOST=0.0.0.0 \
    OPAL_WORKER_METRICS_PORT=9100 \
    OPAL_EMBEDDED_RUN_DIR=/var/lib/opal/run
WORKDIR /var/lib/opal
USER 10001:10001
EXPOSE 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=4)"]
ENTRYPOINT ["opal"]
CMD ["--help"]
