# syntax=docker/dockerfile:1
# streamq images, one Dockerfile with four targets, all running the same `streamq` entry point
# as a non-root user (uid 10001):
#
#   docker build --target api        -t streamq-api .         # the front: no torch, slim, starts in ~1 s
#   docker build --target worker     -t streamq-worker .      # GPU worker: CUDA runtime base, CUDA torch
#   docker build --target worker-cpu -t streamq-worker-cpu .  # CPU worker: slim base, CPU torch
#   docker build --target worker-vllm -t streamq-worker-vllm . # GPU worker on vLLM's engine (1+ GPUs)
#
# Build arguments: TORCH (the torch requirement, default the version the project pins),
# TORCH_INDEX (the wheel index: a CUDA build for `worker`, the CPU build for `worker-cpu`),
# CUDA_BASE (the CUDA runtime image of the GPU worker), VLLM (the vLLM requirement of worker-vllm).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ----- the front -----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STREAMQ_LOG_FORMAT=json
RUN useradd --create-home --uid 10001 --user-group streamq
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY api ./api
COPY streamq ./streamq
# worker/'s code only: the `streamq` command lists its subcommands (worker/cli.py imports nothing
# heavy). The front's dependencies only (no `worker` extra: no torch, no transformers); the Python
# client and `streamq chat` / `ask` come with it.
COPY worker ./worker
RUN pip install --no-compile . && rm -rf /root/.cache
USER 10001
EXPOSE 8000
# Behind a load balancer or in a container the front binds 0.0.0.0: it then needs
# STREAMQ_API_KEYS (or STREAMQ_API_KEYS_FILE), or an explicit STREAMQ_INSECURE=1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
ENTRYPOINT ["streamq"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]

# ----- the GPU worker ------------------------------------------------------------------------
FROM ${CUDA_BASE} AS worker
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH HF_HOME=/models STREAMQ_LOG_FORMAT=json STREAMQ_DEVICE=cuda \
    STREAMQ_METRICS_PORT=9310 STREAMQ_METRICS_HOST=0.0.0.0
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 --user-group streamq \
    && mkdir -p /models && chown streamq:streamq /models
# torch first, from the CUDA wheel index, so that the `worker` extra finds it installed.
RUN pip install --no-compile --index-url "${TORCH_INDEX}" "${TORCH}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY api ./api
COPY streamq ./streamq
COPY worker ./worker
RUN pip install --no-compile '.[worker]'
USER 10001
VOLUME ["/models"]
EXPOSE 9310
# SIGTERM: the worker stops taking jobs and lets running ones finish for STREAMQ_DRAIN_SECONDS;
# give it that long plus a margin before SIGKILL (compose: stop_grace_period; k8s:
# terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('STREAMQ_METRICS_PORT', '9310'), timeout=2)"]
ENTRYPOINT ["streamq"]
CMD ["worker"]

# ----- the CPU worker (machines without a GPU; the tiny demo model, load tests) --------------
FROM ${PYTHON_IMAGE} AS worker-cpu
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models STREAMQ_LOG_FORMAT=json STREAMQ_DEVICE=cpu STREAMQ_METRICS_PORT=9310 \
    STREAMQ_METRICS_HOST=0.0.0.0
RUN useradd --create-home --uid 10001 --user-group streamq \
    && mkdir -p /models && chown streamq:streamq /models
RUN pip install --no-compile --index-url "${TORCH_INDEX}" "${TORCH}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY api ./api
COPY streamq ./streamq
COPY worker ./worker
RUN pip install --no-compile '.[worker]'
USER 10001
VOLUME ["/models"]
EXPOSE 9310
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('STREAMQ_METRICS_PORT', '9310'), timeout=2)"]
ENTRYPOINT ["streamq"]
CMD ["worker"]

# ----- the GPU worker on vLLM's engine (one or more GPUs: STREAMQ_TENSOR_PARALLEL_SIZE) ----------
FROM ${CUDA_BASE} AS worker-vllm
# vLLM brings the CUDA torch it was built for; the project's `worker` extra then finds it there.
ARG VLLM=vllm==0.32.0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH HF_HOME=/models STREAMQ_LOG_FORMAT=json STREAMQ_DEVICE=cuda \
    STREAMQ_ENGINE=vllm STREAMQ_METRICS_PORT=9310 STREAMQ_METRICS_HOST=0.0.0.0
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 --user-group streamq \
    && mkdir -p /models && chown streamq:streamq /models
RUN pip install --no-compile "${VLLM}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY api ./api
COPY streamq ./streamq
COPY worker ./worker
RUN pip install --no-compile '.[worker]'
USER 10001
VOLUME ["/models"]
EXPOSE 9310
STOPSIGNAL SIGTERM
# vLLM compiles and captures CUDA graphs before it serves: a slower start than the plain worker.
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('STREAMQ_METRICS_PORT', '9310'), timeout=2)"]
ENTRYPOINT ["streamq"]
CMD ["worker"]
