# cxr-reid HTTP service: CPU-only image serving the shipped default model.
#   docker build -t cxr-reid .
#   docker run -p 8000:8000 -v cxr-reid-data:/data cxr-reid
# Settings come from CXR_REID_* environment variables (e.g. -e CXR_REID_API_KEYS=key1,key2).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the CPU index: a bare `torch` requirement would pull the multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/cxr-reid
COPY pyproject.toml README.md ./
COPY app ./app
COPY index ./index
COPY models ./models
RUN pip install . && rm -rf /opt/cxr-reid/build

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

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/healthz' % os.environ.get('CXR_REID_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(url, timeout=4).status == 200 else 1)"

CMD ["cxr-reid", "serve", "--host", "0.0.0.0"]
