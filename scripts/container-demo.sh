#!/usr/bin/env bash
# Build the Docker image with buildah (no Docker daemon needed), run it, check its health check and
# run the demo of docs/pacs.md against it; prints the image size. Needs root, buildah and, unless BASE is
# given, debootstrap (Debian packages). See docs/docker.md.
#   BASE=python:3.11-slim bash scripts/container-demo.sh     # a registry is reachable
#   bash scripts/container-demo.sh                           # no registry: a Debian bookworm base
# BUILD_OPTS adds `buildah bud` options (e.g. --volume mounts a proxy's CA bundle for pip);
# PORT (default 8200) is where the container serves, on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-localhost/cxr-reid:latest}
PORT=${PORT:-8200}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ -z "${BASE:-}" ]; then
    BASE=localhost/cxr-reid-base:bookworm
    if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
        echo "== building $BASE with debootstrap (Debian bookworm, Python 3.11)"
        ctr=$(buildah from scratch)
        root=$(buildah mount "$ctr")
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$root" http://deb.debian.org/debian
        chroot "$root" apt-get clean
        rm -rf "$root"/var/lib/apt/lists/*
        buildah umount "$ctr" >/dev/null
        buildah config --env LANG=C.UTF-8 "$ctr"
        buildah commit -q "$ctr" "$BASE"
        buildah rm "$ctr" >/dev/null
    fi
fi

echo "== building $IMAGE on $BASE"
# docker format: the OCI format has no HEALTHCHECK
# shellcheck disable=SC2086  # BUILD_OPTS is a list of options
buildah bud --isolation chroot --format docker --layers --build-arg BASE="$BASE" ${BUILD_OPTS:-} -t "$IMAGE" .
health=$(buildah inspect --type image --format '{{.Docker.Config.Healthcheck.Test}}' "$IMAGE")
case "$health" in *healthcheck*) echo "health check: $health" ;; *) echo "no HEALTHCHECK in $IMAGE" >&2; exit 1 ;; esac

echo "== running it on 127.0.0.1:$PORT"
mkdir -p "$WORK/data" && chown 10001:10001 "$WORK/data"
ctr=$(buildah from "$IMAGE")
buildah run --isolation chroot --user cxr --env CXR_REID_PORT="$PORT" -v "$WORK/data:/data" "$ctr" -- \
    cxr-reid serve --host 127.0.0.1 >"$WORK/serve.log" 2>&1 &
server=$!
stop() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; buildah rm "$ctr" >/dev/null; }
trap 'stop; rm -rf "$WORK"' EXIT
for _ in $(seq 120); do
    buildah run --isolation chroot --user cxr --env CXR_REID_PORT="$PORT" "$ctr" -- cxr-reid healthcheck \
        >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$WORK/serve.log" >&2; exit 1; }
    sleep 1
done
buildah run --isolation chroot --user cxr --env CXR_REID_PORT="$PORT" "$ctr" -- cxr-reid healthcheck

bash scripts/demo.sh "http://127.0.0.1:$PORT"
echo "== image size"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE"
