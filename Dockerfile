# syntax=docker/dockerfile:1
# Macula serving image.
#
#   docker build -t macula .                                   # CPU image (default): python:3.11-slim + CPU torch wheels
#   docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/model_store:/models:ro" macula
#
# CUDA image: the CUDA torch wheels bundle the CUDA user-space libraries, so the slim base works with
# the NVIDIA container toolkit (`docker run --gpus all ...`); pick the wheel index that matches the host driver:
#   docker build -t macula:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# or build on an NVIDIA base image (its distribution python3 is installed when the base has none):
#   docker build -t macula:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .

ARG BASE_IMAGE=python:3.11-slim

# ---- base: a Python interpreter and nothing else --------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# python:3.11-slim already has Python; CUDA bases (nvidia/cuda:*-ubuntu*) do not.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# ---- builder: a virtual environment with torch and the macula packages ----------------------------------------------
FROM base AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and on its own layer: it is by far the largest download and changes least often.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
COPY training ./training
# The torch pins in pyproject.toml are already satisfied by the wheels above (2.14.1+cpu matches ==2.14.1).
RUN pip install . && pip check

# ---- runtime: the venv, a non-root user, and the service as the entrypoint ------------------------------------------
FROM base AS runtime
ARG UID=10001
# g++ lets MACULA_COMPILE=auto build the compiled serving form (AOTInductor) into /data/compile-cache on the
# serving host's CPU (the form is specific to its instruction set); build with --build-arg COMPILER=none for an
# image without it, which serves eager unless a prebuilt cache is mounted (docs/operations.md, "Compiled serving").
ARG COMPILER=g++
# hadolint ignore=DL3008
RUN if [ "${COMPILER}" != none ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends "${COMPILER}" \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN groupadd --system --gid "${UID}" macula \
    && useradd --system --uid "${UID}" --gid "${UID}" --no-create-home --shell /usr/sbin/nologin macula \
    && mkdir -p /models /data \
    && chown "${UID}:${UID}" /data
COPY --from=builder /opt/venv /opt/venv
# Bind to every interface inside the container only; the service's own default stays 127.0.0.1.
# The default audit store is an SQLite file on the /data volume; replicas share PostgreSQL instead
# (MACULA_AUDIT_URL: see docs/operations.md, "Scale").
ENV PATH=/opt/venv/bin:$PATH \
    MACULA_HOST=0.0.0.0 \
    MACULA_PORT=8000 \
    MACULA_MODEL_DIR=/models \
    MACULA_AUDIT_DB=/data/macula_audit.db \
    MACULA_COMPILE_CACHE=/data/compile-cache
WORKDIR /data
VOLUME ["/models", "/data"]
# Numeric, so that Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
USER ${UID}:${UID}
EXPOSE 8000
# No curl in a slim image: the venv's Python does the probe. /healthz answers 200 while the process is alive.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MACULA_PORT', '8000') + '/healthz', timeout=4)"]
ENTRYPOINT ["python", "-m", "service"]
