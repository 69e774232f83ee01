# syntax=docker/dockerfile:1
# eczema-batch: one image for the one-shot `migrate` (eczema-batch db upgrade), the GPU workers
# and the CPU workers (docker-compose.yml builds it; README.md, "Running on a cluster").
#
# GPU-capable without a CUDA base image: PyPI's torch 2.13.0 wheel for Linux x86-64 is the CUDA
# 13.0 build and brings the CUDA runtime, cuDNN and NCCL as pip packages (cuda-toolkit 13.0.3,
# nvidia-cudnn-cu13, ...), so the host needs only the NVIDIA driver (R580 or newer for CUDA 13)
# and the NVIDIA Container Toolkit. The same image runs on CPU-only hosts.
#
# Python 3.11 is what the tests run on and what docker/constraints.txt was resolved for. The base
# is pinned by tag; no digest is given because none could be looked up where this file was
# written (no registry access): pin one with `docker buildx imagetools inspect IMAGE`.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# -- build: the project's wheel (the repository's migrations/ and workers/ go inside it) ------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY eczema_batch ./eczema_batch
COPY migrations ./migrations
COPY workers ./workers
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="eczema-batch" \
      org.opencontainers.image.description="eczema-batch catalogue tools and Celery workers (SegGPT + DINO)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The wheel with the DICOM extra (ingest decodes JPEG 2000 inside DICOM), every package pinned to
# the version the tests ran with (scripts/image-constraints writes docker/constraints.txt).
COPY --from=build /wheels /tmp/wheels
COPY docker/constraints.txt /tmp/constraints.txt
RUN set -- /tmp/wheels/eczema_batch-*.whl \
    && pip install --no-cache-dir --constraint /tmp/constraints.txt "$1[dicom]" \
    && rm -rf /tmp/wheels /tmp/constraints.txt \
    && eczema-batch --help > /dev/null

# A user without privileges; /workspace is its working folder and the compose file's named volume
# (a named volume takes the ownership of the folder it is mounted on, so it stays writable).
# /models is the mount point of the weights, read-only.
RUN groupadd --system --gid 10001 eczema \
    && useradd --system --uid 10001 --gid eczema --home-dir /home/eczema --create-home \
       --shell /usr/sbin/nologin eczema \
    && install -d -o eczema -g eczema -m 0750 /workspace \
    && install -d -m 0755 /models

# ECZEMA_BATCH_HOME: the workspace (embedded catalogue, reports, exports written to relative
# paths). No machine reaches a model hub: weights come from /models, the hub is never asked.
# The NVIDIA Container Toolkit mounts the driver's compute (CUDA) and utility (NVML) libraries.
ENV ECZEMA_BATCH_HOME=/workspace \
    ECZEMA_BATCH_MODEL_DIR=/models \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001:10001
WORKDIR /workspace

# Healthy while a worker of this container answers a remote-control ping through the broker
# (its main process answers, also in the middle of a chunk). The one-shot services turn it off.
HEALTHCHECK --interval=30s --timeout=30s --start-period=2m --retries=3 \
    CMD ["eczema-batch", "worker-ping", "--timeout", "10"]

# SIGTERM (Docker's stop signal) is Celery's warm shutdown: the worker finishes its chunk.
CMD ["eczema-batch", "worker", "--queue", "gpu"]
