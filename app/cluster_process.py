"""Several service replicas on one private PostgreSQL gallery, on loopback: the harness of
``scripts/cluster-demo.sh``, ``bench/cluster.py`` and their tests (as ``app.server_process`` is for
one server). Also the client calls they make, retrying as a PACS or a feed would."""

from __future__ import annotations

import io
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from app.local_postgres import LocalPostgres
from app.server_process import ROOT, Server, free_port, server_env, uvicorn_command

RADIOGRAPHS = ROOT / "examples" / "radiographs"
RETRY_SECONDS = 90.0


# ---------------------------------------------------------------- images
def radiograph_variants(n: int, seed: int = 0) -> list[tuple[str, str, bytes]]:
    """``n`` distinct PNG files (patient, file name, bytes): the example radiographs in turn, each a
    small random crop with a little noise. The patient is the example's (child-a, child-b, ...)."""
    rng = np.random.default_rng(seed)
    bases = sorted(RADIOGRAPHS.glob("*.jpeg"))
    out = []
    for i in range(n):
        path = bases[i % len(bases)]
        patient = "-".join(path.stem.split("-")[:2])
        img = Image.open(path).convert("L")
        w, h = img.size
        dx, dy = (int(rng.integers(0, max(1, s // 25))) for s in (w, h))
        img = img.crop(
            (dx, dy, w - int(rng.integers(0, max(1, w // 25))), h - int(rng.integers(0, max(1, h // 25))))
        )
        pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 2.0, (img.size[1], img.size[0]))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="PNG")
        out.append((patient, f"{path.stem}-v{i}.png", buf.getvalue()))
    return out


def another_network(source: Path | None, target: Path, *, noise: float = 0.05, seed: int = 0) -> str:
    """Save a checkpoint of another network to switch to: ``source``'s (the shipped model's by
    default) weights, each floating-point tensor moved by ``noise`` of its own spread, under another
    name; its embeddings differ enough that comparing them with ``source``'s shows. Returns its id."""
    import torch

    from models.net.checkpoint import load_checkpoint, save_checkpoint
    from models.net.embedder import DEFAULT_CHECKPOINT

    payload = load_checkpoint(source or DEFAULT_CHECKPOINT)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in payload["state_dict"].items():
        if value.is_floating_point() and value.numel() > 1:
            v = value.float()
            v = v + noise * v.std() * torch.randn(v.shape, generator=generator)
            state[key] = v
        else:
            state[key] = value
    return save_checkpoint(
        target,
        name=f"{payload['name']}-next",
        backbone_config=payload["backbone"],
        preprocess_config=payload["preprocess"],
        state_dict=state,
        calibration=payload["calibration"],
    )


# ---------------------------------------------------------------- a client that retries as a PACS would
def enrol(url: str, patient: str, name: str, data: bytes, *, retry_for: float = RETRY_SECONDS) -> dict:
    """POST /images until acknowledged (201): a 503 (database restarting) or a dead connection is
    tried again; returns the enrolled image's JSON."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            r = httpx.post(
                f"{url}/images",
                files={"file": (name, data, "image/png")},
                data={"patient_id": patient},
                timeout=60,
            )
            if r.status_code == 201:
                return r.json()["images"][0]
            if r.status_code not in (409, 429, 503):
                raise RuntimeError(f"enrol {name} via {url}: {r.status_code} {r.text[:300]}")
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"enrol {name} via {url}: not acknowledged within {retry_for:.0f} s")
        time.sleep(0.25)


def search_ids(url: str, name: str, data: bytes, k: int = 5) -> list[int]:
    r = httpx.post(f"{url}/search", files={"file": (name, data, "image/png")}, data={"k": str(k)}, timeout=60)
    r.raise_for_status()
    return [m["image_id"] for m in r.json()["matches"]]


def readyz(url: str) -> dict:
    r = httpx.get(f"{url}/readyz", timeout=10)
    return r.json() if r.status_code == 200 else {"status": r.status_code, **r.json()}


def all_images(url: str) -> list[dict]:
    out, offset = [], 0
    while True:
        page = httpx.get(f"{url}/images", params={"offset": offset, "limit": 500}, timeout=30).json()
        out += page["items"]
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return out


# ---------------------------------------------------------------- the cluster
@dataclass
class Cluster:
    """PostgreSQL and ``replicas`` service processes on loopback, all under ``root``."""

    root: Path
    replicas: int = 3
    model: Path | None = None
    next_model: Path | None = None  # CXR_REID_NEXT_MODEL_PATH of every replica
    poll_seconds: float = 0.5
    pg: LocalPostgres = field(init=False)
    servers: list[Server | None] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.pg = LocalPostgres(Path(tempfile.mkdtemp(prefix="cxr-reid-pg-")))
        self.pg.start()
        self.ports = [free_port() for _ in range(self.replicas)]
        self.servers = [None] * self.replicas
        # the first replica creates the schema; the others then start together
        self.start_replica(0)
        threads = [threading.Thread(target=self.start_replica, args=(i,)) for i in range(1, self.replicas)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if any(s is None for s in self.servers):
            raise RuntimeError("a replica did not start; see its log under " + str(self.root))

    def env(self, i: int) -> dict[str, str]:
        return server_env(
            self.root / f"replica-{i + 1}",
            self.model,
            CXR_REID_DATABASE_URL=self.pg.url,
            CXR_REID_BLOB_DIR=str(self.root / "blobs"),
            CXR_REID_FOLLOW_POLL_SECONDS=str(self.poll_seconds),
            CXR_REID_TORCH_THREADS="1",
            OMP_NUM_THREADS="1",
            **({"CXR_REID_NEXT_MODEL_PATH": str(self.next_model)} if self.next_model else {}),
        )

    def job_env(self, model: Path | None) -> dict[str, str]:
        """The environment of a `cxr-reid` job (reindex, enroll) on this cluster's gallery."""
        env = self.env(self.replicas)  # a data dir of its own, next to the replicas'
        env.pop("CXR_REID_NEXT_MODEL_PATH", None)
        if model is not None:
            env["CXR_REID_MODEL_PATH"] = str(model)
        return env

    def start_replica(self, i: int) -> None:
        self.servers[i] = Server(
            uvicorn_command(self.ports[i]), self.env(i), self.ports[i], self.root / f"replica-{i + 1}.log"
        )

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def kill(self, i: int) -> None:
        server = self.servers[i]
        if server is not None:
            server.kill()
        self.servers[i] = None

    def stop(self) -> None:
        for i in range(len(self.servers)):
            server = self.servers[i]
            if server is not None:
                server.stop(signal.SIGTERM)
        if hasattr(self, "pg"):
            self.pg.stop("fast")
            shutil.rmtree(self.pg.root, ignore_errors=True)

    def converged(self, timeout: float = 60.0) -> list[dict]:
        """Wait until every replica has applied every change; returns their /readyz answers."""
        deadline = time.monotonic() + timeout
        while True:
            states = [readyz(self.url(i)) for i in range(self.replicas)]
            reps = [s.get("replication") or {} for s in states]
            if all(r.get("behind") == 0 for r in reps) and len({r.get("applied_change") for r in reps}) == 1:
                return states
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas did not converge within {timeout:.0f} s: {reps}")
            time.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
