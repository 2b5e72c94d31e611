"""The re-identification service: a loaded model and its gallery; embed, verify, search, enrol
with the wrong-patient check, and delete. Alert review (:mod:`app.service.alerts`) and the
duplicates report (:mod:`app.service.duplicates`) are mixed into :class:`ReidService`, so callers
see one service; DICOM instances come in through :mod:`app.service.ingest`. Failures are the
domain errors of :mod:`app.service.errors`; no HTTP here."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import numpy as np

from app.service.alerts import AlertReview
from app.service.batcher import MicroBatcher
from app.service.clientargs import ALL_COLLECTIONS
from app.service.decoding import DecodeBudget, DecodedImage, QueryImage, Upload, decode_uploads, new_image
from app.service.duplicates import DuplicatesReport
from app.service.errors import ConflictError, InvalidInputError, NotFoundError, UnavailableError
from app.service.phi import stored_original
from app.service.results import (
    EnrolResult,
    GalleryStatus,
    PairVerdict,
    PatientVerdict,
    ScoredRecord,
)
from app.service.scoring import SCORE_SLACK, Scorer, record_key, resolve_operating_point
from index import (
    AlertRecord,
    Gallery,
    GalleryDuplicateError,
    GalleryUnavailableError,
    ImageMetadata,
    ImageRecord,
    NewAlert,
    NewImage,
    checked_patient_id,
)
from index.faiss_index import RWLock
from models.net.embedder import Embedder
from models.scoring.calibration import Calibration
from models.scoring.decide import OperatingPoint, Posterior, image_key, is_same_patient, posterior

log = logging.getLogger(__name__)

#: Enrol-time matches reported per new image.
ENROL_MATCHES = 5
#: A replica further behind the gallery database than this (seconds) is not ready: it would answer
#: from an index missing what other replicas stored.
REPLICA_LAG_LIMIT_SECONDS = 30.0


def labelled_image(image: NewImage, meta: ImageMetadata, *, name: str) -> NewImage:
    """``image`` (a :func:`new_image` row) with its patient id held to the gallery's label rule
    (:func:`index.clean_label`), whichever source it came from: the caller's ``meta`` (a form field,
    a manifest) or the image's DICOM PatientID. ``GalleryValidationError`` naming the image, the
    source and the reason when it fails: that image is refused (422 for ``POST /images``; STOW-RS
    and PACS sync report the instance as not stored), nothing of it is kept."""
    from_tag = meta.patient_id is None and image.patient_id is not None
    source = f"{name}: its DICOM PatientID" if from_tag else f"{name}: patient_id"
    image.patient_id = checked_patient_id(image.patient_id, source=source)
    return image


def _filed_as(gallery: Gallery, image: NewImage) -> ImageRecord | None:
    """The stored image this upload already is: the same bytes in the same collection under the
    same patient (or both unknown), else None."""
    if not image.sha256:
        return None
    found = gallery.find_by_sha256(image.sha256, collection=image.collection)
    if found is None or found.patient_id == image.patient_id:
        return found
    if image.patient_id is None:
        return None
    records, _ = gallery.patient_images(image.patient_id, collection=image.collection)
    return next((r for r in records if r.sha256 == image.sha256), None)


class ReidService(AlertReview, DuplicatesReport):
    """A loaded model and (when its vectors match the model) a gallery, safe to share across threads.

    Inference is serialised with a lock: torch already spreads one batch over the cores, and
    concurrent forward passes would only fight for them. The Gallery is thread-safe on its own;
    enrolments are serialised here as well, so an enrolment's wrong-patient check and its write see
    the same gallery.
    """

    def __init__(
        self,
        embedder: Embedder,
        gallery: Gallery | None,
        *,
        default_far: str = "1e-3",
        default_threshold: float | None = None,
        max_pixels: int = 50_000_000,
        decode_budget: DecodeBudget | None = None,
        gallery_problem: str | None = None,
        gallery_locked: bool = False,
        on_embedded: Callable[[int], None] | None = None,
        on_alert: Callable[[str], None] | None = None,
        on_alert_event: Callable[[str, AlertRecord], None] | None = None,
        next_embedder: Embedder | None = None,
    ) -> None:
        """``next_embedder``: the network a coming reindex switches the gallery to. Kept loaded, so
        that when the switch is committed (by ``cxr-reid reindex`` in any process) this service
        swaps to it and serves on, instead of refusing until restarted (``_switch_model``)."""
        super().__init__()  # DuplicatesReport: its lock and report cache
        self.embedder = embedder
        self._gallery = gallery
        self.gallery_problem = gallery_problem
        self.gallery_locked = gallery_locked  # another process holds it: worth opening again later
        self.default_far = default_far
        self.default_threshold = default_threshold
        self.max_pixels = max_pixels
        self.decode_budget = decode_budget
        self._on_embedded = on_embedded
        self._on_alert = on_alert  # called with each wrong-patient alert's kind (Prometheus counter)
        # called with ("raised" | an ALERT_ACTIONS state, the stored alert): the webhook, the counters
        self._on_alert_event = on_alert_event
        self._batcher = MicroBatcher(self.embedder.embed_prepared)
        self.next_embedder = next_embedder
        # every request runs under the read side (one_model), a model switch under the write side
        self._model_lock = RWLock()
        self._enrol_lock = threading.Lock()
        self._calibration_lock = threading.Lock()
        self._use(self._stored_site_calibration() or embedder.calibration)
        if gallery is not None:
            self._follow(gallery)
        # fail at start-up, not on the first request, when the default operating point is unusable
        self.operating_point()

    # ---------------------------------------------------------------- basics
    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    @property
    def calibration(self) -> Calibration:
        """The calibration in force: the gallery's site calibration if one was fitted, else the model's."""
        return self._state[0]

    def _use(self, calibration: Calibration) -> None:
        """Put a calibration in force, with the scorer its thresholds need (one reference swap, so a
        request sees the calibration and the scorer of one moment)."""
        self._state = (calibration, Scorer(calibration))

    @property
    def scorer(self) -> Scorer:
        return self._state[1]

    def _stored_site_calibration(self) -> Calibration | None:
        """The site calibration kept in the gallery for this model, if any and if it is usable."""
        if self._gallery is None:
            return None
        body = self._gallery.site_calibration()
        if body is None:
            return None
        calibration = Calibration.from_dict(body)
        calibration.provenance.update(calibration_id=body["calibration_id"])
        try:
            resolve_operating_point(
                calibration, default_far=self.default_far, default_threshold=self.default_threshold
            )
        except (ValueError, KeyError) as exc:
            log.error(
                "site calibration %s cannot serve the default operating point (%s); using the model's own",
                body["calibration_id"],
                exc,
            )
            return None
        log.info("site calibration %s in force (%s)", body["calibration_id"], calibration.summary())
        return calibration

    def calibrate(
        self,
        *,
        fars: Sequence[str],
        collection: str | None,
        bootstrap: int = 200,
        score_norm: bool = True,
    ) -> Calibration:
        """Fit a site calibration on the gallery's labelled images, keep it in the gallery and use it.

        Refused (ConflictError, nothing changes) when the labelled images cannot resolve a FAR
        asked for.
        """
        from models.training.site import CalibrationRefusedError, fit_site_calibration

        fars = list(dict.fromkeys(fars))
        if self.default_far not in fars:
            raise InvalidInputError(
                f"the service's default FAR {self.default_far} (CXR_REID_FAR) must be among the FARs "
                f"calibrated, got {fars}"
            )
        with self._calibration_lock:
            keys, vectors = self.gallery.labelled_vectors(collection=collection)
            try:
                calibration = fit_site_calibration(
                    vectors,
                    [f"{c}\x00{p}" for c, p in keys],
                    fars=fars,
                    default_far=self.default_far,
                    bootstrap=bootstrap,
                    score_norm=score_norm,
                    provenance={
                        "data": "gallery",
                        "collection": ALL_COLLECTIONS if collection is None else collection,
                        "model_id": self.model_id,
                    },
                )
            except CalibrationRefusedError as exc:
                raise ConflictError(f"{exc}; the calibration in force is unchanged") from None
            calibration_id = self.gallery.save_calibration(calibration.to_dict())
            calibration.provenance.update(calibration_id=calibration_id)
            self._use(calibration)
        log.info("site calibration %d fitted and in force: %s", calibration_id, calibration.summary())
        return calibration

    def _changed_elsewhere(self, kind: str) -> None:
        """Another replica fitted or cleared the site calibration: use what the gallery holds now."""
        if kind == "calibration":
            with self._calibration_lock:
                self._use(self._stored_site_calibration() or self.embedder.calibration)
            log.info("the site calibration changed in the gallery: %s", self.calibration.summary())

    def clear_calibration(self) -> bool:
        """Go back to the model's own calibration; True when a site calibration was in force."""
        with self._calibration_lock:
            cleared = self.gallery.clear_site_calibration()
            self._use(self.embedder.calibration)
        return cleared

    @property
    def gallery(self) -> Gallery:
        """The gallery; UnavailableError with the reason when none can serve (e.g. vectors of another
        model). For the service's own modules: the API and PACS sync call the service's methods."""
        if self._gallery is None:
            raise UnavailableError(self.gallery_problem or "no gallery is open")
        return self._gallery

    def ensure_gallery(self) -> None:
        """UnavailableError now, with the reason, when no gallery can serve: a check before work
        that will need one (reading a request body, say)."""
        _ = self.gallery

    def attach_gallery(self, gallery: Gallery) -> None:
        """Serve a gallery opened after start-up (it was locked by another process until now)."""
        with self._calibration_lock:
            self._gallery = gallery
            self.gallery_problem = None
            self.gallery_locked = False
            self._use(self._stored_site_calibration() or self.embedder.calibration)
            self._follow(gallery)

    def _follow(self, gallery: Gallery) -> None:
        gallery.on_change(self._changed_elsewhere)
        gallery.on_reindex(self._switch_model)

    def one_model(self) -> AbstractContextManager[None]:
        """Hold for the whole of a request that embeds or compares vectors: a model switch waits
        until no such request is in flight, and holds new ones until it is done, so that no answer
        compares a vector of one network with a vector of another."""
        return self._model_lock.read()

    def _switch_model(self) -> None:
        """The gallery was switched to a new model (a reindex, here or in another process; called on
        a thread of its own). With that model as ``next_embedder``: hold the requests, swap the
        network, rebuild the index from the new vectors, serve on. Otherwise the gallery refuses
        searches until this process is restarted with the new model."""
        gallery = self._gallery
        nxt = self.next_embedder
        t0 = time.perf_counter()
        with self._model_lock.write():
            if nxt is None or gallery.stored_model_id != nxt.model_id:
                gallery.reload_after_reindex()
                log.warning(
                    "the gallery switched to model %s; this service runs %s and refuses searches until "
                    "restarted with it (CXR_REID_MODEL_PATH, or CXR_REID_NEXT_MODEL_PATH beforehand)",
                    gallery.stored_model_id,
                    self.embedder.model_id,
                )
                return
            old_batcher = self._batcher
            self.embedder, self.next_embedder = nxt, None
            self._batcher = MicroBatcher(nxt.embed_prepared)
            gallery.reload_after_reindex(adopt_model=nxt.model_id)
            with self._calibration_lock:
                self._use(self._stored_site_calibration() or nxt.calibration)
        old_batcher.close()
        log.info("switched to model %s in %.2fs", nxt.model_id, time.perf_counter() - t0)

    def gallery_size(self) -> int:
        if self._gallery is None:
            return 0
        return len(self._gallery)

    def gallery_status(self, collections: Sequence[str] | None = None) -> GalleryStatus:
        """Size (of ``collections`` only, when given) and index of the gallery being served
        (UnavailableError when none is)."""
        gallery = self.gallery
        if collections is None:
            images = self.gallery_size()
        else:
            counts = gallery.collections()
            images = sum(counts.get(name, 0) for name in set(collections))
        return GalleryStatus(
            images=images,
            index=gallery.effective_index_factory,
            index_rebuilding=gallery.index_rebuilding,
            replication=gallery.replication(),
        )

    def readiness_problem(self) -> str | None:
        """None when ready; otherwise what is wrong, in words."""
        if self._gallery is None:
            return self.gallery_problem or "no gallery is open"
        replication = self._gallery.replication()
        if replication is not None and replication["lag_seconds"] > REPLICA_LAG_LIMIT_SECONDS:
            return (
                f"this replica is {replication['lag_seconds']:.0f} s behind the gallery database "
                f"({replication['behind']} change(s); listening: {replication['listening']}): check its "
                "connection to the database"
            )
        try:
            consistent = self._gallery.looks_consistent()
        except GalleryUnavailableError as exc:  # the vector store (Milvus) does not answer
            return str(exc)
        if not consistent:
            return "the gallery index does not match its database; restart the service to rebuild it"
        missing = self._gallery.missing_originals()
        if missing:
            return (
                f"{missing:,} stored original(s) are missing under {self._gallery.originals_dir}: "
                "search still works, but `cxr-reid reindex` cannot re-embed those images; restore the "
                "folder from a backup (`cxr-reid check` lists the images), or delete those images"
            )
        return None

    def close(self) -> None:
        self._batcher.close()
        if self._gallery is not None:
            self._gallery.close()

    def operating_point(
        self, far: str | float | None = None, threshold: float | None = None
    ) -> OperatingPoint:
        return resolve_operating_point(
            self.calibration,
            far=far,
            threshold=threshold,
            default_far=self.default_far,
            default_threshold=self.default_threshold,
        )

    def posterior(self, score: float, point: OperatingPoint, prior: float | None = None) -> Posterior:
        """P(same patient | score) at ``prior``, or (None) at the prior under which ``point`` is the
        Bayes decision, so the probability agrees with the decision; a bad prior is InvalidInputError."""
        try:
            return posterior(self.calibration, score, point, prior)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None

    # ---------------------------------------------------------------- embedding
    def embed_uploads(self, uploads: Sequence[Upload]) -> tuple[list[DecodedImage], np.ndarray]:
        """Decode (within the decode budget), prepare, then embed in one forward pass at a time."""
        decoded = decode_uploads(
            uploads,
            max_pixels=self.max_pixels,
            config=self.embedder.preprocess_config,
            budget=self.decode_budget,
        )
        if not decoded:
            return decoded, np.zeros((0, self.embedder.dim), dtype=np.float32)
        vectors = self._batcher.embed([d.prepared for d in decoded])
        if self._on_embedded is not None:
            self._on_embedded(len(decoded))
        return decoded, vectors

    def query_images(self, sides: Sequence[Upload | int]) -> list[QueryImage]:
        """Vectors for a mix of uploads (embedded in one batch) and gallery image ids, in order."""
        uploads = [side for side in sides if isinstance(side, Upload)]
        decoded, vectors = self.embed_uploads(uploads) if uploads else ([], None)
        out, next_upload = [], 0
        for side in sides:
            if isinstance(side, Upload):
                image = decoded[next_upload]
                out.append(QueryImage(vector=vectors[next_upload], key="", filename=image.filename))
                next_upload += 1
            else:
                record, vector = self.stored_vector(int(side))
                out.append(QueryImage(vector=vector, key=record_key(record), record=record))
        return out

    # ---------------------------------------------------------------- gallery reads
    def record(self, image_id: int) -> ImageRecord:
        record = self.gallery.get(image_id)
        if record is None:
            raise NotFoundError(f"image {image_id} not found")
        return record

    def stored_vector(self, image_id: int) -> tuple[ImageRecord, np.ndarray]:
        record = self.gallery.get(image_id)
        vector = self.gallery.get_vector(image_id) if record is not None else None
        if record is None or vector is None:
            raise NotFoundError(f"image {image_id} not found")
        return record, vector

    def list_images(
        self, *, patient_id: str | None, collection: str | None, offset: int, limit: int
    ) -> tuple[list[ImageRecord], int]:
        """A page of gallery images (filters None: any) and the total matching."""
        return self.gallery.list_images(
            patient_id=patient_id, collection=collection, offset=offset, limit=limit
        )

    def find_by_sop_instance_uid(self, uid: str, *, collection: str | None) -> ImageRecord | None:
        """The image stored with this DICOM SOPInstanceUID in ``collection`` (None: any), if any."""
        return self.gallery.find_by_sop_instance_uid(uid, collection=collection)

    def _vectors(self, image_ids: Sequence[int]) -> dict[int, np.ndarray]:
        """Stored vectors by id, for exact re-scoring (ids deleted meanwhile are left out)."""
        return self.gallery.get_vectors(image_ids)

    # ---------------------------------------------------------------- verify
    def verify_patient(
        self,
        vector: np.ndarray,
        patient_id: str,
        *,
        collection: str | None,
        point: OperatingPoint,
        exclude_image_id: int | None = None,
        prior: float | None = None,
    ) -> PatientVerdict:
        """Score an image against every gallery image of one patient; decide on the best score
        (``prior``: see :meth:`posterior`)."""
        records, vectors = self.gallery.patient_images(patient_id, collection=collection)
        keep = [i for i, r in enumerate(records) if r.image_id != exclude_image_id]
        if not keep:
            where = "any collection" if collection is None else f"collection '{collection}'"
            raise NotFoundError(f"patient '{patient_id}' has no other images in {where}")
        records = [records[i] for i in keep]
        raw, scores = self.scorer.scores(
            vector,
            image_key(patient_id, collection),
            np.asarray(vectors)[keep],
            [record_key(r) for r in records],
        )
        best = int(np.argmax(scores))
        best_score = float(scores[best])
        chance = self.posterior(best_score, point, prior)
        return PatientVerdict(
            patient_id=patient_id,
            collection=collection,
            best_score=best_score,
            mean_score=float(scores.mean()),
            best_image_id=records[best].image_id,
            compared_with=len(records),
            same_patient=is_same_patient(best_score, point),
            probability=chance.probability,
            prior=chance.prior,
            prior_source=chance.prior_source,
            best_cosine=float(raw[best]),
        )

    def verify_pair(
        self,
        a: np.ndarray,
        key_a: str,
        b: np.ndarray,
        key_b: str,
        *,
        point: OperatingPoint,
        prior: float | None = None,
    ) -> PairVerdict:
        """Two images (keys: ``record_key`` of a gallery image, "" for an upload); ``prior``: see
        :meth:`posterior`."""
        raw, score = self.scorer.pair(a, key_a, b, key_b)
        chance = self.posterior(score, point, prior)
        return PairVerdict(
            score=score,
            cosine=raw,
            probability=chance.probability,
            same_patient=is_same_patient(score, point),
            prior=chance.prior,
            prior_source=chance.prior_source,
        )

    # ---------------------------------------------------------------- search
    def search(
        self,
        vector: np.ndarray,
        *,
        k: int,
        collection: str | None,
        point: OperatingPoint,
        exclude_ids: Sequence[int] = (),
        patient_id: str | None = None,
        split: str | None = None,
        only_matches: bool = False,
        query_key: str = "",
    ) -> list[ScoredRecord]:
        """Best matches first, scored exactly from stored vectors; filters apply before the cut to k.

        ``query_key``: the query's patient key (``image_key``) where known, so AS-norm leaves the
        patient out of its statistics."""
        gallery = self.gallery
        scorer = self.scorer
        excluded = set(exclude_ids)
        threshold = None
        if only_matches:  # the lowest cosine that can decide "same"
            threshold = min(
                scorer.query_floor(point.threshold, vector),
                scorer.gallery_floor(point.threshold, gallery, collection),
            )
            threshold -= SCORE_SLACK

        def wanted(record: ImageRecord) -> bool:
            return (
                record.image_id not in excluded
                and (patient_id is None or record.patient_id == patient_id)
                and (split is None or record.split == split)
            )

        if patient_id is not None:
            # every image of one patient: exact, no index needed
            records, vectors = gallery.patient_images(patient_id, collection=collection)
            candidates = list(records)
            vector_of = {r.image_id: v for r, v in zip(records, np.asarray(vectors), strict=True)}
        else:
            total = len(gallery)
            # spare candidates: exact re-scoring may reorder near-ties at the cut; AS-norm reorders more
            fetch = k + 8 if split is None and scorer.norm is None else 4 * k + 8
            while True:
                fetch = min(fetch, max(total, 1))
                hits = gallery.search(
                    vector, k=fetch, collection=collection, threshold=threshold, exclude_ids=tuple(excluded)
                )
                candidates = [m.record for m in hits]
                if len(hits) < fetch or fetch >= total or sum(map(wanted, candidates)) >= k:
                    break
                fetch *= 4
            vector_of = self._vectors([r.image_id for r in candidates])

        kept = [r for r in candidates if wanted(r) and r.image_id in vector_of]
        if not kept:
            return []
        raw, scores = scorer.scores(
            vector,
            query_key,
            np.stack([vector_of[r.image_id] for r in kept]),
            [record_key(r) for r in kept],
        )
        results = []
        for record, cos, score in zip(kept, raw, scores, strict=True):
            same = is_same_patient(float(score), point)
            if only_matches and not same:
                continue
            results.append(ScoredRecord(record, float(score), same, float(cos)))
        results.sort(key=lambda r: (-r.score, r.record.image_id))
        return results[:k]

    # ---------------------------------------------------------------- enrol
    def _store_new(
        self, images: list[NewImage], vectors: np.ndarray, point: OperatingPoint
    ) -> tuple[list[ImageRecord], list, list[AlertRecord | None], dict[int, ImageRecord]]:
        """``enrol``'s check-then-write under the enrolment lock: (records stored, (matches, alert,
        duplicate of) of each, the stored alerts, upload index -> the image it is already filed as)."""
        with self._enrol_lock:
            gallery = self.gallery
            pending = []
            filed: dict[int, ImageRecord] = {}  # upload index -> the image it is already filed as
            for i, (image, vector) in enumerate(zip(images, vectors, strict=True)):
                earlier = _filed_as(gallery, image)
                if earlier is not None:
                    filed[i] = earlier
                    continue
                existing = gallery.find_by_sha256(image.sha256, collection=image.collection)
                matches = self.search(
                    vector,
                    k=ENROL_MATCHES,
                    collection=image.collection,
                    point=point,
                    query_key=image_key(image.patient_id, image.collection),
                )
                alert = self._alert(vector, image.patient_id, image.collection, point)
                pending.append((matches, alert, existing.image_id if existing is not None else None))
            fresh = [i for i in range(len(images)) if i not in filed]
            records, stored = (
                gallery.add_with_alerts(
                    np.asarray(vectors, dtype=np.float32)[fresh],
                    [images[i] for i in fresh],
                    [alert for _, alert, _ in pending],
                )
                if fresh
                else ([], [])
            )
        return records, pending, stored, filed

    def enrol(
        self,
        decoded: Sequence[DecodedImage],
        vectors: np.ndarray,
        meta: ImageMetadata,
        *,
        point: OperatingPoint,
    ) -> list[EnrolResult]:
        """File images in the gallery, all or none, with their matches and a wrong-patient alert each.

        Matches and alerts are computed against the gallery as it stood before this request (images of
        one request are not compared with each other), under the enrolment lock so that no other
        enrolment slips in between the check and the write. Idempotent: a file already filed in the
        collection under the same patient (the same bytes: a retried request whose answer was lost)
        is not stored again; its result is the stored image, ``already_enrolled``.
        """
        images = [
            labelled_image(
                new_image(
                    d.identifiers,
                    meta,
                    sha256=d.sha256,
                    blob=stored_original(d.data, d.source_format),
                ),
                meta,
                name=f"'{d.filename}'",
            )
            for d in decoded
        ]
        try:
            records, pending, stored, filed = self._store_new(images, vectors, point)
        except GalleryDuplicateError:  # another replica stored some of them first: found as filed now
            records, pending, stored, filed = self._store_new(images, vectors, point)
        first_by_sha: dict[str, int] = {}
        new_results = []
        for record, (matches, _, duplicate_of), alert in zip(records, pending, stored, strict=True):
            if alert is not None:
                self._alert_event("raised", alert)
            if duplicate_of is None and record.sha256 in first_by_sha:
                duplicate_of = first_by_sha[record.sha256]  # same bytes twice in one request
            first_by_sha.setdefault(record.sha256 or "", record.image_id)
            new_results.append(EnrolResult(record, matches, alert, duplicate_of))
            if alert is not None and self._on_alert is not None:
                self._on_alert(alert.kind)
        log.info("enrolled %d image(s): ids %s", len(records), [r.image_id for r in records])
        if filed:
            log.info(
                "%d image(s) were enrolled already: ids %s", len(filed), [r.image_id for r in filed.values()]
            )
        made = iter(new_results)
        return [
            EnrolResult(filed[i], [], None, None, already_enrolled=True) if i in filed else next(made)
            for i in range(len(images))
        ]

    def _alert(
        self, vector: np.ndarray, patient_id: str | None, collection: str, point: OperatingPoint
    ) -> NewAlert | None:
        """Wrong-patient check for an image filed under ``patient_id`` (None: nothing to check); the
        alert as the gallery stores it, with the operating point it was decided at."""
        if patient_id is None:
            return None
        gallery, scorer = self.gallery, self.scorer
        key = image_key(patient_id, collection)
        own_records, own_vectors = gallery.patient_images(patient_id, collection=collection)
        own_best = None
        if own_records:
            own_best = float(scorer.scores(vector, key, own_vectors, [key] * len(own_records))[1].max())

        floor = min(
            scorer.query_floor(point.threshold, vector),
            scorer.gallery_floor(point.threshold, gallery, collection),
        )
        fetch = len(own_records) + 20
        while True:
            hits = gallery.search(vector, k=fetch, collection=collection, threshold=floor - SCORE_SLACK)
            others = [m.record for m in hits if m.record.patient_id not in (None, patient_id)]
            if others or len(hits) < fetch:
                break
            fetch *= 4
        vectors = self._vectors([r.image_id for r in others])
        others = [r for r in others if r.image_id in vectors]
        scored: list[tuple[float, ImageRecord]] = []
        if others:
            _, decided = scorer.scores(
                vector, key, np.stack([vectors[r.image_id] for r in others]), [record_key(r) for r in others]
            )
            scored = [
                (float(v), r)
                for v, r in zip(decided, others, strict=True)
                if is_same_patient(float(v), point)
            ]
        decided_at = {
            "threshold": point.threshold,
            "far": point.far,
            "source": point.source,
            "calibration": dict(point.calibration),
        }
        if scored:
            score, other = max(scored, key=lambda item: (item[0], -item[1].image_id))
            return NewAlert(
                kind="matches_other_patient",
                message=(
                    f"filed under patient '{patient_id}' but matches image {other.image_id} of patient "
                    f"'{other.patient_id}' (score {score:.3f} >= threshold {point.threshold:.3f})"
                ),
                score=score,
                other_patient_id=other.patient_id,
                other_image_id=other.image_id,
                own_best_score=own_best,
                own_images=len(own_records),
                operating_point=decided_at,
            )
        if own_best is not None and not is_same_patient(own_best, point):
            return NewAlert(
                kind="no_match_with_own_images",
                message=(
                    f"matches none of the {len(own_records)} earlier image(s) of patient '{patient_id}' "
                    f"(best score {own_best:.3f} < threshold {point.threshold:.3f})"
                ),
                score=own_best,
                own_best_score=own_best,
                own_images=len(own_records),
                operating_point=decided_at,
            )
        return None

    # ---------------------------------------------------------------- delete
    def delete_image(self, image_id: int) -> None:
        if not self.gallery.delete_image(image_id):
            raise NotFoundError(f"image {image_id} not found")
        log.info("deleted image %d", image_id)

    def delete_patient(self, patient_id: str, collection: str | None) -> int:
        count = self.gallery.delete_patient(patient_id, collection=collection)
        if count == 0:
            raise NotFoundError(
                "no images of that patient" + ("" if collection is None else " in that collection")
            )
        log.info("deleted %d image(s) of one patient", count)
        return count
