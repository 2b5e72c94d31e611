"""A gallery whose vectors are in Milvus (``Gallery(vector_url=)``, index/milvus_live.py) against a real
Milvus Lite file, beside the same gallery on in-process FAISS: the same matches with the same scores,
through writes, deletes, relabels, a reopen that must re-feed Milvus from SQL, a reindex to another
model, and (with a real PostgreSQL) two replicas sharing one Milvus.

Both sides are exact at this size (FAISS Flat, Milvus Lite FLAT), so ids must agree in order and
scores to 1e-5 (float32 sums in another order); the vectors are random, so no two neighbours tie.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from index import Gallery, NewImage  # noqa: E402
from index.milvus_index import MilvusIndex  # noqa: E402

DIM = 64
MODEL = "test-model"
COLLECTIONS = ("default", "site B")
TOL = 1e-5


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def images(n: int, start: int = 0) -> list[NewImage]:
    return [
        NewImage(patient_id=f"P{(start + i) // 3}", collection=COLLECTIONS[(start + i) % 2]) for i in range(n)
    ]


def open_gallery(path: Path, vector_url: Path | None = None, **kw) -> Gallery:
    return Gallery(
        path,
        dim=DIM,
        model_id=kw.pop("model_id", MODEL),
        autosave_seconds=None,
        vector_url=str(vector_url) if vector_url else None,
        **kw,
    )


def answers(g: Gallery, queries: np.ndarray, collection: str | None) -> list[list[tuple[int, float]]]:
    return [[(m.record.image_id, m.score) for m in g.search(q, k=10, collection=collection)] for q in queries]


def assert_same_answers(milvus: Gallery, faiss: Gallery, queries: np.ndarray) -> None:
    for collection in (*COLLECTIONS, None):
        got, want = answers(milvus, queries, collection), answers(faiss, queries, collection)
        for g, w in zip(got, want, strict=True):
            assert [i for i, _ in g] == [i for i, _ in w], collection
            np.testing.assert_allclose([s for _, s in g], [s for _, s in w], atol=TOL)


def test_milvus_answers_as_faiss_through_writes_deletes_and_relabels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, queries = unit(rng, 400), unit(rng, 20)
    with open_gallery(tmp_path / "faiss") as ref, open_gallery(tmp_path / "milvus", tmp_path / "v.db") as g:
        assert g.effective_index_factory == "milvus-lite:FLAT"
        for s in range(0, 400, 100):  # several writes, each spanning both collections
            assert [r.image_id for r in g.add(x[s : s + 100], images(100, s))] == [
                r.image_id for r in ref.add(x[s : s + 100], images(100, s))
            ]
        assert_same_answers(g, ref, queries)
        # a query that is an enrolled image finds itself first, in its own collection only
        top = g.search(x[1], k=1, collection="site B")[0]
        assert top.record.image_id == 2 and top.score == pytest.approx(1.0, abs=TOL)
        assert g.search(x[1], k=5, collection="default")[0].record.image_id != 2

        for gal in (g, ref):
            assert gal.delete_patient("P7") == 3
            assert gal.delete_image(50)
            assert gal.set_patient_id(60, "P999") is not None
        assert_same_answers(g, ref, queries)
        assert g.is_consistent() and g.looks_consistent()
        assert len(g) == len(ref) == 396


def test_reopen_feeds_milvus_from_sql_when_it_missed_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x, queries = unit(rng, 300), unit(rng, 10)
    url = tmp_path / "v.db"
    with open_gallery(tmp_path / "faiss") as ref, open_gallery(tmp_path / "milvus", url) as g:
        ref.add(x, images(300))
        g.add(x, images(300))
        name = g._live.current.name
    # behind the gallery's back: Milvus loses 40 vectors and gains one SQL never held
    idx = MilvusIndex.open(str(url), "unused", DIM, model_id=MODEL)
    idx.name = name
    idx.remove(range(1, 41))
    idx.add(unit(rng, 1), np.array([9999]), "default")
    assert idx.ntotal == 261
    idx.close()
    with open_gallery(tmp_path / "faiss") as ref, open_gallery(tmp_path / "milvus", url) as g:
        assert g._live.current.ntotal == 300
        assert g.is_consistent()
        assert_same_answers(g, ref, queries)


def test_reindex_moves_to_a_new_collection_and_drops_the_old(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x, new = unit(rng, 120), unit(rng, 120)
    url = tmp_path / "v.db"
    with open_gallery(tmp_path / "milvus", url) as g:
        records = g.add(x, images(120))
        old_name = g._live.current.name
        by_id = {r.image_id: new[i] for i, r in enumerate(records)}
        assert g.reindex(lambda recs: np.stack([by_id[r.image_id] for r in recs]), model_id="model-2") == 120
        assert g._live.current.name != old_name
        assert not g._live.current._client.has_collection(old_name)
        top = g.search(new[5], k=1, collection=None)[0]
        assert top.record.image_id == records[5].image_id and top.score == pytest.approx(1.0, abs=TOL)
        assert g.is_consistent()


@pytest.mark.slow
def test_two_replicas_on_postgresql_share_one_milvus(database_url: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x, queries = unit(rng, 60), unit(rng, 5)
    url = tmp_path / "v.db"

    def replica(name: str) -> Gallery:
        return open_gallery(
            tmp_path / name,
            url,
            database_url=database_url,
            blob_dir=tmp_path / "blobs",
            follow_poll_seconds=0.2,
        )

    with replica("r1") as r1, replica("r2") as r2, open_gallery(tmp_path / "faiss") as ref:
        r1.add(x[:30], images(30))
        r2.add(x[30:], images(30, 30))
        ref.add(x, images(60))
        r1.catch_up()
        r2.catch_up()
        for g in (r1, r2):
            assert_same_answers(g, ref, queries)
            assert g.is_consistent()
        r1.delete_patient("P3")
        ref.delete_patient("P3")
        r2.catch_up()
        assert_same_answers(r2, ref, queries)


def test_service_with_a_vector_url_answers_as_with_faiss(
    make_client, tmp_path: Path, phantom_images: list[Path]
) -> None:  # noqa: ANN001
    """Through the app: CXR_REID_VECTOR_URL's setting puts the vectors in Milvus, and searches answer
    with the same matches, scores and same-patient decisions as the FAISS service."""
    faiss_client = make_client(tmp_path / "faiss")
    milvus_client = make_client(tmp_path / "milvus", vector_url=str(tmp_path / "v.db"))
    for client in (faiss_client, milvus_client):
        for i, path in enumerate(phantom_images):
            response = client.post(
                "/images",
                files={"file": (path.name, path.read_bytes())},
                data={"patient_id": f"p{i // 3}", "collection": COLLECTIONS[i % 2]},
            )
            assert response.status_code == 201, response.text
    assert milvus_client.app.state.service.gallery.effective_index_factory == "milvus-lite:FLAT"
    for image_id in (1, 4, 9):
        for collection in (*COLLECTIONS, "*"):
            form = {"image_id": image_id, "k": 10, "collection": collection}
            want = faiss_client.post("/search", data=form).json()["matches"]
            got = milvus_client.post("/search", data=form).json()["matches"]
            assert [(m["image_id"], m["same_patient"]) for m in got] == [
                (m["image_id"], m["same_patient"]) for m in want
            ]
            np.testing.assert_allclose([m["score"] for m in got], [m["score"] for m in want], atol=TOL)


def test_milvus_down_gives_503_and_loses_nothing(
    make_client, tmp_path: Path, phantom_images: list[Path]
) -> None:  # noqa: ANN001
    """Milvus stops (the Lite server is shut down under the service): a search answers 503 with the
    reason; an upload, which searches for a wrong patient before it stores, answers 503 and stores
    nothing; a delete is committed in SQL and marks Milvus behind; /readyz says not ready."""
    from milvus_lite import server_manager_instance

    url = tmp_path / "v.db"
    client = make_client(tmp_path / "milvus", vector_url=str(url))
    for i, path in enumerate(phantom_images[:6]):
        files = {"file": (path.name, path.read_bytes())}
        assert client.post("/images", files=files, data={"patient_id": f"p{i // 3}"}).status_code == 201
    assert client.post("/search", data={"image_id": 1}).status_code == 200
    assert client.get("/readyz").status_code == 200
    server_manager_instance.release_server(str(url))

    response = client.post("/search", data={"image_id": 1})
    assert response.status_code == 503 and "Milvus" in response.json()["detail"]
    files = {"file": (phantom_images[6].name, phantom_images[6].read_bytes())}
    response = client.post("/images", files=files, data={"patient_id": "p2"})
    assert response.status_code == 503 and response.headers.get("retry-after")
    gallery = client.app.state.service.gallery
    assert len(gallery) == 6
    assert client.delete("/images/2").status_code == 200
    assert len(gallery) == 5 and gallery._live.behind
    assert client.get("/readyz").status_code == 503
