# syntax=docker/dockerfile:1.7
# The model image: vLLM (CUDA build, `.[model-gpu]`: its wheel brings the matching CUDA torch) serving an OPAL
# model folder with the flags `opal serve` renders (opal/vllm_server.py vllm_argv, GPU set). Also holds the
# training stack (TRL, DeepSpeed) of the same extra. Build from the repository root:
#   docker build -f deploy/docker/model.Dockerfile -t opal-model:0.1.0 .
# Run on an NVIDIA host: docker run --gpus 1 -p 8000:8000 opal-model:0.1.0
# The CMD below serves the shipped model (models/opal-tiny-abo); Kubernetes and compose pass the same
# arguments (tests/project/test_deploy.py keeps all three equal to vllm_argv).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY inference inference
COPY topology topology
COPY workers workers
COPY training training
COPY opal opal
RUN /opt/venv/bin/pip install ".[model-gpu]"
# the wheel carries the data files too (package data in pyproject.toml): load the default category schemas as a check
RUN cd / && /opt/venv/bin/python -c "from schemas.schema_source import DEFAULT_LOCATIONS, load_locations; load_locations(DEFAULT_LOCATIONS)"

FROM ${PYTHON_IMAGE}
# Triton (vLLM's kernels) compiles a small launcher with the system C compiler at start-up.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 opal \
    && useradd --system --uid 10001 --gid opal --home-dir /home/opal --create-home --shell /usr/sbin/nologin opal \
    && install -d -o opal -g opal /var/cache/opal/compile
COPY --from=build /opt/venv /opt/venv
COPY models/opal-tiny-abo /opt/opal/models/opal-tiny-abo
# The environment vllm_env() gives a GPU server (no hub access, no usage reports); compiled kernels in
# /var/cache/opal/compile (mount a volume there so restarts load them: opal/vllm_server.py compile_cache).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/opal \
    VLLM_CACHE_ROOT=/var/cache/opal/compile/vllm \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/opal/compile/inductor \
    TRITON_CACHE_DIR=/var/cache/opal/compile/triton \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/opal
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]
CMD ["--model", "/opt/opal/models/opal-tiny-abo", "--served-model-name", "opal-tiny@sft-a0690701adc4", "--host", "0.0.0.0", "--port", "8000", "--dtype", "bfloat16", "--max-model-len", "2048", "--max-num-seqs", "32", "--limit-mm-per-prompt", "{\"image\": 1, \"video\": 0}", "--structured-outputs-config", "{\"backend\": \"guidance\", \"disable_any_whitespace\": true}", "--max-logprobs", "5", "--disable-log-stats", "--disable-uvicorn-access-log", "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.9"]
