# syntax=docker/dockerfile:1
#
# camserve server image.
#
#   docker build -t camserve:0.1.0 .                                # CUDA (default)
#   docker build --build-arg VARIANT=cpu -t camserve:0.1.0-cpu .    # CPU only, no CUDA libraries
#
# Config and weights are not part of the image: mount a camserve.toml under /etc/camserve (and set
# CAMSERVE_CONFIG to it) and weights under /models, both read-only. Without a config the server
# serves the built-in EfficientNet-Lite0, whose weights ship inside a Python package installed
# here, so nothing is downloaded at run time.
#
# The CUDA image runs CAMSERVE_FRONTENDS=4 gRPC frontend processes plus one engine process under
# a supervisor (one container per GPU). Pixels and maps cross between them in /dev/shm, about
# 2 x shm_ring_mb (64) x frontends MiB, which Docker's default 64 MiB /dev/shm cannot hold:
#   docker run --gpus device=0 --shm-size=1g -p 50051:50051 -p 9090:9090 camserve:0.1.0
# The CPU image leaves CAMSERVE_FRONTENDS unset (auto: one process on the CPU), so the default
# /dev/shm is enough there.
#
# Stages: base-<variant> (where Python and PyTorch come from) -> torch-<variant> (a virtualenv
# that sees PyTorch) -> builder (builds camserve's wheel, installs it with the server extra) ->
# runtime (the base again plus the finished virtualenv, run as a non-root user).

# cuda | cpu
ARG VARIANT=cuda
# CUDA variant: Python, PyTorch and torchvision come with this image.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
# CPU variant: a slim Python; PyTorch comes from the CPU-only wheel index.
ARG CPU_BASE_IMAGE=python:3.11.11-slim-bookworm

FROM ${BASE_IMAGE} AS base-cuda
# GPU image: 4 frontends + the engine. A fixed count rather than auto (one per CPU core less one,
# at most 8), so the /dev/shm it needs does not depend on the host: 2 x 64 x 4 = 512 MiB, which
# --shm-size=1g covers. The environment beats the TOML: set CAMSERVE_FRONTENDS at run time (or
# set it empty to let the config's `frontends` decide).
ENV CAMSERVE_FRONTENDS=4

# CPU image: CAMSERVE_FRONTENDS stays unset = auto, the single-process layout on the CPU.
FROM ${CPU_BASE_IMAGE} AS base-cpu

# ---------------------------------------------------------------------------------------------
FROM base-cuda AS torch-cuda
# The virtualenv sees the image's CUDA build of PyTorch, so pip keeps it instead of fetching
# another multi-gigabyte copy.
RUN python -m venv --system-site-packages /opt/camserve

FROM base-cpu AS torch-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The same PyTorch release as the CUDA base image, so both variants compute the same thing.
ARG TORCH_SPEC="torch==2.5.1 torchvision==0.20.1"
RUN python -m venv /opt/camserve \
 && /opt/camserve/bin/pip install --no-cache-dir --disable-pip-version-check \
        --index-url "${TORCH_INDEX_URL}" ${TORCH_SPEC}

# ---------------------------------------------------------------------------------------------
FROM torch-${VARIANT} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY client/ client/
COPY server/ server/
# The already installed torch satisfies the server extra, so pip adds only what is missing.
# The import check fails the build, not the first request, when something is off.
RUN /opt/camserve/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/camserve/bin/pip install "$(ls /wheels/camserve-*.whl)[server]" \
 && /opt/camserve/bin/python -c "import torch, torchvision, camserve.server, camserve.client"

# ---------------------------------------------------------------------------------------------
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="camserve" \
      org.opencontainers.image.description="gRPC service for batched Grad-CAM explanations" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0" \
      io.camserve.variant="${VARIANT}"

RUN groupadd --system --gid 10001 camserve \
 && useradd --system --uid 10001 --gid camserve --create-home --home-dir /home/camserve \
        --shell /usr/sbin/nologin camserve \
 && mkdir -p /etc/camserve /models

COPY --from=builder /opt/camserve /opt/camserve

ENV PATH=/opt/camserve/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CAMSERVE_HOST=0.0.0.0

USER camserve:camserve
WORKDIR /home/camserve

# 50051: gRPC (Explain, health, reflection; every frontend listens on it with SO_REUSEPORT);
# 9090: Prometheus /metrics over HTTP (the supervisor's, aggregated over all processes).
EXPOSE 50051 9090 8080

# SIGTERM makes the server report NOT_SERVING, refuse new calls, finish accepted ones and exit
# within its grace period (20 s by default); give the container runtime a longer stop timeout.
# With frontends the supervisor receives it and stops its children the same way.
STOPSIGNAL SIGTERM

# SERVING only after the models are loaded and warmed up: allow a generous start period.
# The port is the default one; change both together if the config moves it. Whichever frontend
# takes the connection answers; all report NOT_SERVING while the engine process restarts.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["camserve", "health", "--server", "127.0.0.1:50051"]

# Exec form: the server (the supervisor, with frontends) is PID 1 and receives the stop signal
# itself.
ENTRYPOINT ["camserve-server"]
CMD []
