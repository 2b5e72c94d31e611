# cxr-reid HTTP service: CPU-only image serving the shipped default model.
#   docker build -t cxr-reid .
#   docker run -p 8000:8000 -v cxr-reid-data:/data -e CXR_REID_API_KEYS=key1 cxr-reid
# Settings come from CXR_REID_* environment variables. It serves on 0.0.0.0, so it refuses to start
# without an API key (CXR_REID_API_KEYS, or `cxr-reid keys add` into the /data volume) unless
# CXR_REID_INSECURE=1 says that an open API is meant. BASE may be any Debian-family image with
# Python 3.11 and its venv module (e.g. one built with debootstrap where no registry is reachable:
# see docs/docker.md); TORCH_VARIANT=cu128 (or another CUDA build) makes a GPU image;
# EXTRAS=serve,milvus adds pymilvus for CXR_REID_VECTOR_URL=milvus://... (docs/scale-out.md).
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_VARIANT=cpu
# a wheel index holding that torch build, when PyTorch's own cannot be reached (empty: PyTorch's)
ARG TORCH_INDEX=""
ARG EXTRAS=serve
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/cxr-reid
COPY pyproject.toml README.md ./
COPY scripts/_venv.sh ./scripts/
COPY app ./app
COPY index ./index
COPY models ./models
# The same install as scripts/serve.sh: torch pinned to the CPU build of PyTorch's index, one pip call.
# An index that does not answer is left out (one line says so); when nothing serves the build, the
# build stops with the command that fixes it.
RUN VENV=/opt/venv PACKAGE=".[${EXTRAS}]" TORCH_VARIANT="${TORCH_VARIANT}" TORCH_INDEX="${TORCH_INDEX}" \
    TORCH_FIX="docker build --build-arg TORCH_INDEX=<a wheel index URL holding torch 2.13.0+${TORCH_VARIANT}> ." \
    sh -e scripts/_venv.sh \
    && rm -rf /opt/cxr-reid/build
ENV PATH=/opt/venv/bin:$PATH

# Run as an unprivileged user; the gallery lives in the /data volume it owns.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/cxr cxr \
    && mkdir -p /data \
    && chown cxr:cxr /data
USER cxr
WORKDIR /home/cxr

ENV CXR_REID_DATA_DIR=/data \
    CXR_REID_PORT=8000
VOLUME ["/data"]
EXPOSE 8000

# Healthy means ready: /readyz is 200 only when the model is loaded and the gallery can be served
# (not locked by another process, not unreadable, not another model's vectors).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["cxr-reid", "healthcheck"]

CMD ["cxr-reid", "serve", "--host", "0.0.0.0"]
