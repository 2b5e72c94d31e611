"""Fitting the model to a site's own labelled images: ``calibrate`` fits thresholds (into a copy of the
checkpoint, or into a gallery), ``adapt`` fine-tunes the network and keeps it only when it proves
better on held-back patients.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from app.cli.common import (
    Subparsers,
    add_device_arg,
    add_settings_args,
    log,
    open_model_and_gallery,
    settings_from,
)

if TYPE_CHECKING:
    from app.settings import Settings
    from models.training.adapt import AdaptResult, SiteData


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from app.service.errors import ServiceError
    from models.scoring.calibration import Calibration

    fars = _fars(args.far)
    if fars is None:
        return 2
    settings = settings_from(args)
    if args.manifest:
        from models.training.site import CalibrationRefusedError, calibrate_checkpoint

        if args.data_dir:
            log.error("give --manifest (a site's labelled images) or --data-dir (a gallery), not both")
            return 2
        if not args.out:
            log.error("--manifest needs --out SITE.pt: the calibrated copy of the checkpoint to write")
            return 2
        try:
            calibration: Calibration = calibrate_checkpoint(
                args.manifest,
                args.out,
                model=settings.model_path,
                fars=fars,
                default_far=settings.far,
                bootstrap=args.bootstrap,
                score_norm=args.score_norm == "as-norm",
                progress=not (args.no_progress or args.json),
            )
        except CalibrationRefusedError as exc:
            log.error("%s; nothing written", exc)
            return 1
        where = f"wrote {args.out}: serve it with `cxr-reid serve --model {args.out}`"
    else:
        from app.service.clientargs import collection_arg
        from app.service.wiring import service_for
        from index import GalleryError

        if args.out:
            log.error("--out is for --manifest; the gallery form keeps the calibration in the gallery")
            return 2
        try:  # fits on a gallery's labelled images: one must exist; nothing is made when it does not
            embedder, gallery = open_model_and_gallery(settings, create=False)
        except GalleryError as exc:
            log.error("%s", exc)
            if not args.data_dir:
                log.error(
                    "calibrate needs labelled images: --manifest SITE.csv --out SITE.pt (a copy of the "
                    "checkpoint calibrated on them), or --data-dir GALLERY (calibrated in the gallery)"
                )
            return 2
        try:
            service = service_for(settings, embedder, gallery)
            calibration = service.calibrate(
                fars=fars,
                collection=collection_arg(args.collection),
                bootstrap=args.bootstrap,
                score_norm=args.score_norm == "as-norm",
            )
        except ServiceError as exc:
            log.error("%s", exc.detail)
            return 1
        finally:
            gallery.close()
        where = f"kept in the gallery {settings.data_dir}; `cxr-reid serve` uses it from its next start"
    # the prior each threshold is the Bayes decision at: what a probability is given at by default
    priors = {far: calibration.bayes_prior(t) for far, t in calibration.thresholds.items()}
    report = {
        **calibration.summary(),
        "thresholds": calibration.thresholds,
        "bayes_priors": priors,
        "threshold_unit": threshold_unit(calibration.score_norm is not None),
        **calibration.provenance,
    }
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        lines = [
            f"site calibration ({report['score_norm'] or 'raw cosines'}) on {report['images']} images of "
            f"{report['patients']} patients "
            f"({report['genuine_pairs']:,} same-patient / {report['impostor_pairs']:,} "
            "different-patient pairs)"
        ]
        described = threshold_lines(
            calibration.thresholds,
            unit=report["threshold_unit"],
            intervals=report.get("threshold_ci", {}),
            catch_rates=report.get("catch_rate", {}),
        )
        for far, line in zip(calibration.thresholds, described, strict=True):
            lines.append(f"{line}; Bayes prior {100 * priors[far]:.3g}%")
        lines.append(
            "P(same patient) is given at the Bayes prior of the threshold in force (so it is >= 50% exactly "
            "when the pair is accepted) unless a request names its own prior"
        )
        lines.append(where)
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


def threshold_unit(score_norm: bool) -> str:
    """What a threshold is measured in: a site calibration with AS-norm compares normalised scores
    (roughly standard deviations above the cohort's impostor scores), not cosines."""
    return "AS-norm units" if score_norm else "cosine"


def threshold_lines(
    thresholds: dict[str, float],
    *,
    unit: str,
    intervals: dict[str, Any] | None = None,
    catch_rates: dict[str, float] | None = None,
) -> list[str]:
    """One line per FAR, in the words a PACS team reads: the threshold with its unit (and interval),
    the catch rate where the fit measured it, and what the FAR means for correct filings."""
    lines = []
    for far, threshold in thresholds.items():
        line = f"  FAR {far}: threshold {threshold:.4f} {unit}"
        low, high = (intervals or {}).get(far, (None, None))
        if low is not None and high is not None:
            line += f" [95% CI {low:.4f}, {high:.4f}]"
        rate = (catch_rates or {}).get(far)
        if rate is not None:
            line += f"; catch rate {rate:.0%}: of 100 misfiled images about {100 * rate:.0f} flagged"
        line += f"; of 1,000 correct filings about {1000 * float(far):g} flagged wrongly"
        lines.append(line)
    return lines


def _site_data(args: argparse.Namespace, settings: Settings) -> SiteData:
    """The site's labelled images for ``adapt``: a manifest CSV, a DICOM folder, or a gallery."""
    from pathlib import Path

    from models.data import check_files_exist, read_dicom_folder, read_manifest
    from models.training.adapt import SiteData

    if args.manifest:
        source = Path(args.manifest)
        if source.is_dir():
            samples, skipped = read_dicom_folder(source)
            if skipped:
                log.warning(
                    "%d file(s) under %s are not DICOM or carry no PatientID: left out", skipped, source
                )
            return SiteData(samples, f"DICOM folder {source.name}")
        samples = read_manifest(source)
        check_files_exist(samples, source)
        return SiteData(samples, f"manifest {source.name}")
    from index import GalleryError
    from models.data import Sample

    data_dir = Path(settings.data_dir)
    try:  # reads a gallery that exists; nothing is made when there is none
        _, gallery = open_model_and_gallery(settings, allow_model_mismatch=True, create=False)
    except GalleryError as exc:
        raise ValueError(str(exc)) from None
    samples, unlabelled, offset = [], 0, 0
    try:
        while True:
            records, total = gallery.list_images(collection=None, offset=offset, limit=1000)
            for record in records:
                path = record.stored_path or record.source_path
                if record.patient_id is None or path is None:
                    unlabelled += 1
                    continue
                key = f"{record.collection}:{record.patient_id}"
                samples.append(Sample(path=path, patient_id=key, dataset=record.collection))
            offset += len(records)
            if not records or offset >= total:
                break
    finally:
        gallery.close()
    if unlabelled:
        log.info("%d gallery image(s) without a patient id or an original: left out", unlabelled)
    return SiteData(samples, f"gallery {data_dir.name}")


def _cmd_adapt(args: argparse.Namespace) -> int:
    from models.data import ManifestError
    from models.training.adapt import AdaptRefusedError, AdaptSettings, adapt

    if bool(args.manifest) == bool(args.data_dir):
        log.error("give --manifest (a CSV or a DICOM folder) or --data-dir (a gallery, server stopped)")
        return 2
    fars = _fars(args.far)
    if fars is None:
        return 2
    settings = settings_from(args)
    try:
        site = _site_data(args, settings)
        result = adapt(
            site,
            args.out,
            model=settings.model_path,
            settings=AdaptSettings(
                steps=args.steps,
                minutes=args.minutes,
                lr=args.lr if args.lr is not None else AdaptSettings.lr,
                fars=tuple(fars),
                default_far=settings.far,
                holdout_fraction=args.holdout,
                seed=args.seed,
                save_every_s=args.save_every,
                device=_embedder_device(settings),
            ),
            work_dir=args.work,
            name=args.name,
            progress=not (args.no_progress or args.json),
        )
    except (AdaptRefusedError, ManifestError) as exc:
        log.error("%s; nothing written", exc)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    else:
        sys.stdout.write(_format_adaptation(result) + "\n")
    if not result.written:
        log.error("%s; nothing written", result.reason)
        return 1
    return 0


def _embedder_device(settings: Settings) -> str:
    from models.net.embedder import resolve_device

    return str(resolve_device(settings.device))


def _format_adaptation(result: AdaptResult) -> str:
    """The held-back figures before and after, as a site would read them."""
    split = result.split
    lines = [
        f"held back to prove the change: {split['proof_images']} images of {split['proof_patients']} "
        f"patients ({split['proof_genuine_pairs']:,} same-patient / {split['proof_impostor_pairs']:,} "
        f"different-patient pairs); trained on {split['train_images']} images of "
        f"{split['train_patients']} patients, "
        f"{result.steps_run} steps in {result.minutes:.1f} min"
        + (" (stopped by --minutes)" if result.stopped_by_budget else ""),
        f"{'':24}{'base':>24}{'adapted':>24}",
    ]
    keys = ["auc", *[f"tar_at_far_{f}" for f in result.resolvable_fars], "precision_at_1"]
    for key in keys:
        cells = []
        for figures in (result.before, result.after):
            value, ci = figures.get(key), figures.get("ci", {}).get(key)
            cell = "-" if value is None else f"{value:.3f}"
            if ci:
                cell += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
            cells.append(cell)
        lines.append(f"  {key:<22}{cells[0]:>24}{cells[1]:>24}")
    low, high = result.delta_auc_ci
    lines.append(
        f"AUC difference {result.delta_auc:+.4f} [95% CI {low:+.4f}, {high:+.4f}] (paired patient bootstrap)"
    )
    if result.written:
        calibration = result.calibration
        lines += threshold_lines(
            calibration.get("thresholds", {}),
            unit=threshold_unit(bool(calibration.get("score_norm"))),
            intervals=calibration.get("threshold_ci", {}),
            catch_rates=calibration.get("catch_rate", {}),
        )
        lines.append(
            f"wrote {result.out} ({result.model_id}), calibrated on the held-back patients "
            f"({'AS-norm' if result.calibration.get('score_norm') else 'raw cosines'}). A gallery holds the "
            f"base network's vectors: `cxr-reid reindex --model {result.out}` before "
            f"`cxr-reid serve --model {result.out}`"
        )
    return "\n".join(lines)


def _fars(text: str) -> list[str] | None:
    """The FARs of ``--far``, or None (logged) when they cannot be read."""
    from models.scoring.decide import parse_fars

    try:
        return parse_fars(text)
    except ValueError as exc:
        log.error("--far: %s", exc)
        return None


def register(subparsers: Subparsers) -> None:
    """Add calibrate and adapt to ``cxr-reid``."""
    p = subparsers.add_parser(
        "calibrate",
        help="fit thresholds on a site's own labelled images (the FAR promised is the FAR delivered)",
        description="A model's thresholds come from its validation patients and do not hold at a site unlike "
        "them. --manifest: embed the site's labelled images (CSV path,patient_id) and write a copy of the "
        "checkpoint carrying the site calibration to --out, for `evaluate`/`serve --model`. --data-dir (the "
        "server stopped; POST /calibration while it runs): fit on the gallery's labelled images and keep the "
        "calibration in the gallery. Refused, changing nothing, when the images cannot resolve a FAR asked "
        "for; the message says how many more are needed. Exit 0 done, 1 refused, 2 could not run.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--manifest", help="a site's labelled images: CSV path,patient_id (paths relative to it)"
    )
    p.add_argument("--out", help="with --manifest: the calibrated checkpoint to write")
    p.add_argument(
        "--far", default="1e-2,1e-3,1e-4", help="comma-separated FARs to calibrate (default 1e-2,1e-3,1e-4)"
    )
    p.add_argument(
        "--collection", default="*", help='gallery form: collection to use ("*" = all, the default)'
    )
    p.add_argument("--bootstrap", type=int, default=200, help="patient bootstrap resamples for threshold CIs")
    p.add_argument(
        "--score-norm",
        choices=("as-norm", "none"),
        default="as-norm",
        help="normalise scores against a cohort of the site's images (AS-norm, the default: higher TAR at "
        "unseen sites, MODEL_CARD.md) or decide on raw cosines",
    )
    p.add_argument("--json", action="store_true", help="print the calibration summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_settings_args(p)
    p.set_defaults(func=_cmd_calibrate)

    p = subparsers.add_parser(
        "adapt",
        help="fine-tune the network on a site's own labelled images, prove it on held-back patients, "
        "calibrate",
        description="Learns the site: fine-tunes the model (default: the shipped one) on the site's "
        "labelled images, holding back about 30% of its patients (by a hash of the id) that it never trains "
        "on; the base and the adapted network are measured on them, and the adapted checkpoint, calibrated "
        "on them, is written to --out only when it beats the base (AUC difference above 0 by a paired "
        "patient bootstrap, TAR at the largest FAR they resolve not lower). Guards against forgetting the "
        "training sets: a low learning rate, a short schedule and a pull of every weight towards the base. "
        "Budget: about 12 passes over the site's training images, 150 to 4,000 steps (on a 2-core CPU with "
        "bf16 about 0.8 s a step at 224 px: 500 site images take a few minutes, 50,000 under an hour), cut "
        "to fit --minutes. Resumable: run the same command again after an interruption. Then `cxr-reid "
        "reindex --model OUT` (a gallery holds the base network's vectors) and `cxr-reid serve --model OUT`. "
        "Exit 0 written, 1 no better than the base (nothing written), 2 could not run (too few patients or "
        "pairs: says how many more).",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--manifest", help="the site's labelled images: a CSV path,patient_id or a DICOM folder"
    )
    p.add_argument("--out", required=True, help="the adapted checkpoint to write")
    p.add_argument("--minutes", type=float, default=60.0, help="hard stop on the training (default 60)")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: scaled with the data)")
    p.add_argument(
        "--lr",
        type=float,
        help="peak learning rate (default: AdaptSettings.lr, low to keep what the base knows)",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.3,
        help="share of patients held back to prove the change (default 0.3)",
    )
    p.add_argument(
        "--far", default="1e-2,1e-3,1e-4", help="comma-separated FARs to calibrate (default 1e-2,1e-3,1e-4)"
    )
    p.add_argument("--work", help="folder of the resumable state (default OUT.adapt; removed at the end)")
    p.add_argument("--name", help="model name of the adapted checkpoint (default: the base's name + -site)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split and the sampling")
    p.add_argument(
        "--save-every",
        type=float,
        default=30.0,
        help="seconds between saves of the resumable state (default 30)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_arg(p)
    add_settings_args(p)
    p.set_defaults(func=_cmd_adapt)
