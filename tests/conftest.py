"""Shared fixtures: a small random-weight checkpoint, a few phantom images, API test clients, real
server processes (``app/server_process.py``).

Plain helpers the test modules import (``from conftest import ...``): ``save_random_checkpoint``,
``synthetic_site`` and ``dicom_dataset``.

Random weights still embed deterministically, so identical bytes score 1.0; tests that need a
model that knows identity train one (tests/test_train_e2e.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from app.local_postgres import LocalPostgres, PostgresUnavailableError, bindir
from app.server_process import Server
from app.server_process import server_env as server_environment

# The tiny test network cannot be exported or fused (it pools unevenly), so runtime "auto" would try
# and fall back at every app the tests create: they run it in PyTorch directly. The runtime choice
# itself is tested in tests/test_embedder.py, and server processes (app/server_process.py) keep "auto".
os.environ.setdefault("CXR_REID_RUNTIME", "torch")

# Under pytest-xdist (scripts/test.sh runs the full suite on one worker per core) each worker and
# every process it starts compute on one thread: workers of several threads each on the same cores
# spin against one another, and training then runs several times slower than in a serial run.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CXR_REID_TORCH_THREADS"):
        os.environ.setdefault(variable, "1")
    torch.set_num_threads(1)

if TYPE_CHECKING:
    from fastapi.testclient import TestClient
    from pydicom.dataset import Dataset

    from models.net.embedder import Embedder


def save_random_checkpoint(
    path: Path,
    *,
    name: str,
    seed: int,
    embedding_dim: int,
    genuine: tuple[float, float, int],
    impostor: tuple[float, float, int],
    **extra: object,
) -> Path:
    """Save a width-8 IR-18 at 64 px with seeded random weights and a calibration fitted to
    synthetic genuine / impostor scores, each ``(mean, std, count)`` clipped to [-1, 1]."""
    from models.imaging.preprocess import PreprocessConfig
    from models.net.backbones import BackboneConfig, build_backbone
    from models.net.checkpoint import save_checkpoint
    from models.scoring.calibration import Calibration

    torch.manual_seed(seed)
    backbone_config = BackboneConfig(variant="ir", depth=18, width=8, embedding_dim=embedding_dim)
    network = build_backbone(backbone_config).eval()
    rng = np.random.default_rng(seed)
    calibration = Calibration.fit(np.clip(rng.normal(*genuine), -1, 1), np.clip(rng.normal(*impostor), -1, 1))
    save_checkpoint(
        path,
        name=name,
        backbone_config=backbone_config.to_dict(),
        preprocess_config=PreprocessConfig(size=64).to_dict(),
        state_dict=network.state_dict(),
        calibration=calibration.to_dict(),
        **extra,
    )
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-8 IR-18 at 64 px with a 128-d embedding and a fitted calibration."""
    return save_random_checkpoint(
        tmp_path_factory.mktemp("checkpoint") / "tiny.pt",
        name="tiny-test",
        seed=0,
        embedding_dim=128,
        genuine=(0.8, 0.08, 500),
        impostor=(0.2, 0.15, 20_000),
        training_summary={"note": "random weights for tests"},
        metrics={},
    )


@pytest.fixture(scope="session")
def phantom_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of 6 phantom patients x 3 studies as PNG; returns the manifest path."""
    from models.imaging.phantom import write_phantom_set

    return write_phantom_set(tmp_path_factory.mktemp("phantoms"), 6, 3, size=128, fmt="png", seed=1)


@pytest.fixture(scope="session")
def phantom_images(phantom_set: Path) -> list[Path]:
    """The phantom PNG files, three per patient, in manifest order."""
    import csv

    with phantom_set.open() as handle:
        return [phantom_set.parent / row["path"] for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def embedder(tiny_checkpoint: Path) -> Embedder:
    """The tiny checkpoint loaded once per test module, shared by every app that module starts."""
    from models.net.embedder import Embedder

    return Embedder.from_checkpoint(tiny_checkpoint)


@pytest.fixture
def make_client(tmp_path: Path, embedder: Embedder) -> Iterator[Callable[..., TestClient]]:
    """Start apps on tmp data dirs (shared model); every client is closed at the end.

    ``raise_server_exceptions=False`` gives a test the 500 response instead of the exception.
    """
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    opened: list[TestClient] = []

    def _make(
        data_dir: Path | None = None, *, raise_server_exceptions: bool = True, **settings: object
    ) -> TestClient:
        config = Settings(data_dir=data_dir or tmp_path / "data", **settings)
        client = TestClient(
            create_app(config, embedder=embedder), raise_server_exceptions=raise_server_exceptions
        )
        client.__enter__()
        opened.append(client)
        return client

    yield _make
    for client in reversed(opened):
        client.__exit__(None, None, None)


@pytest.fixture
def server_env(tiny_checkpoint: Path, tmp_path: Path) -> dict[str, str]:
    """Environment for a server process on the tiny checkpoint, with its gallery in tmp_path."""
    return server_environment(tmp_path / "data", tiny_checkpoint, CXR_REID_TORCH_THREADS="1")


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Server processes a test starts; whatever is left running is killed at the end."""
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """A private PostgreSQL cluster (app/local_postgres.py) for this test process; skipped where
    PostgreSQL is not installed (scripts/test.sh installs it)."""
    try:
        bindir()
    except PostgresUnavailableError as exc:
        pytest.skip(str(exc))
    # not under pytest's 0700 temp root: the server runs as the unprivileged postgres user
    pg = LocalPostgres(Path(tempfile.mkdtemp(prefix="cxr-reid-pg-")))
    pg.start()
    try:
        yield pg
    finally:
        pg.stop("immediate")
        shutil.rmtree(pg.root, ignore_errors=True)


@pytest.fixture
def database_url(postgres: LocalPostgres, request: pytest.FixtureRequest) -> str:
    """A new empty database on the test cluster, one per test."""
    database_url.count = getattr(database_url, "count", 0) + 1  # type: ignore[attr-defined]
    return postgres.fresh_database(f"t{os.getpid()}_{database_url.count}")  # type: ignore[attr-defined]


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def synthetic_site(
    patients: int, per_patient: int, *, noise: float, seed: int = 0, dim: int = 32, shared: float = 0.0
) -> tuple[np.ndarray, list[str]]:
    """Unit vectors around a random centre per patient, ids ``p0, p1, ...``: a labelled site with
    known identities. ``shared`` adds one direction every image leans to (a site whose images all
    look alike)."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=dim)
    vectors, ids = [], []
    for p in range(patients):
        centre = rng.normal(size=dim) + shared * common
        for _ in range(per_patient):
            v = centre + rng.normal(size=dim) * noise
            vectors.append(v / np.linalg.norm(v))
            ids.append(f"p{p}")
    return np.asarray(vectors, np.float32), ids


def dicom_dataset(
    pixels: np.ndarray | None, *, transfer_syntax: str | None = None, **elements: object
) -> Dataset:
    """A minimal DICOM: file meta and SOP ids (CR image storage), then ``elements`` as attributes.

    With ``pixels`` it gets a 16-bit MONOCHROME2 pixel module, encapsulated when ``transfer_syntax``
    is a compressed one (default: explicit VR little endian).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax) if transfer_syntax else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        data = pixels.astype("<u2").tobytes()
        ds.PixelData = encapsulate([data]) if meta.TransferSyntaxUID.is_compressed else data
    return ds
