"""Train on one lent GPU, in one call: every recipe's full model and its leave-one-site-out folds at
once, then pack what they made for the trip back.

A GPU machine is lent for minutes, so one call does all the training: each recipe (a config, e.g.
``configs/gpu.toml``) trains its full model and, with ``--folds``, one fold per site of its data
(the site held out; ``data.sites`` groups the sets of one hospital), every run in its own process on
the same GPU (an H100/H200 has memory for all of them; concurrent processes keep it busy where one
small network alone would leave it waiting on the host). Each run's schedule is fitted to
``--minutes`` (``optim.fit_minutes``: the first epochs are timed, the epochs planned are recorded in
the checkpoint). The images are decoded once per input size before the runs start.

Afterwards the runs' checkpoints, metrics and logs go into one tar, cut into parts of at most
15 MiB under ``BUNDLE`` (default ``runs/gpu-bundle``, kept on the machine); the parts that fit the
return limit (``--send`` of them) are copied to OUT_DIR with the index and ``summary.json``. A second
call fetches the rest: ``cp runs/gpu-bundle/bundle.tar.part* "$OUT"`` for the parts not yet sent.

    python scripts/pack_sets.py ../shared/data .data --max-side 256 --jpeg-quality 90   # here
    python scripts/train_gpu.py .data "$OUT" --config configs/gpu.toml configs/gpu-160.toml --folds
    python scripts/train_gpu.py unpack OUT_DIR runs/gpu                                  # back here

The data path and a step of every run are rehearsed on the CPU by tests/test_gpu_recipe.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python scripts/train_gpu.py` puts scripts/, not the root, on the path
    sys.path.insert(0, str(REPO_ROOT))

log = logging.getLogger("train_gpu")

PART_BYTES = 15 * 2**20
BUNDLE_NAME = "bundle.tar"


@dataclass
class RunSpec:
    """One training run: a recipe, the overrides that make it this run, and where it writes."""

    name: str
    config: str
    overrides: list[str]
    out_dir: Path


def ensure_metric_learning(wheels: Path) -> None:
    """Install pytorch-metric-learning from the carried wheel where the GPU image lacks it."""
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        found = sorted(wheels.glob("pytorch_metric_learning-*.whl"))
        if not found:
            raise SystemExit(f"pytorch-metric-learning is missing and no wheel is in {wheels}") from None
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(found[-1])],
            check=True,
        )


def plan_runs(
    configs: list[str], manifests: list[str], overrides: list[str], run_root: Path, *, folds: bool
) -> list[RunSpec]:
    """The full run of each recipe (``<recipe>/full``), then (``folds``) one run per held-out site
    (``<recipe>/holdout-<site>``, the layout ``bench/generalisation.py --no-train`` evaluates)."""
    from models.data import dataset_name
    from models.training.config import load_config

    common = [f"data.manifests={json.dumps(manifests)}", *overrides]
    sets = [dataset_name(m) for m in manifests]
    runs = []
    for path in configs:
        config = load_config(path, common)
        runs.append(RunSpec(f"{config.name}/full", path, common, run_root / config.name / "full"))
        if folds:  # laid out as bench/generalisation.py reads folds: <recipe>/holdout-<site>/
            for site in config.data.site_names(sets):
                name = f"{config.name}/holdout-{site}"
                extra = [f"data.holdout_sets={json.dumps([site])}", f"name={json.dumps(f'holdout-{site}')}"]
                runs.append(RunSpec(name, path, [*common, *extra], run_root / name))
    return runs


def _decode(config_path: str, overrides: list[str]) -> str:
    """Decode and cache one recipe's images (the cache key is the preprocessing and the paths)."""
    from models.data import load_images, read_manifests
    from models.training.config import load_config

    config = load_config(config_path, overrides)
    samples = read_manifests(config.data.manifests)
    load_images(samples, config.preprocess, cache_dir=config.data.cache_dir or None, progress=False)
    return f"{config.name}: {len(samples)} images at {config.preprocess.size} px"


def _train_one(spec: RunSpec) -> None:
    """Worker process: one ``cxr-reid train`` run, its log in its run folder."""
    from models.training.config import load_config
    from models.training.train import train

    spec.out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.FileHandler(spec.out_dir / "train.log")],
        force=True,
    )
    config = load_config(spec.config, [*spec.overrides, f"output_dir={json.dumps(str(spec.out_dir))}"])
    train(config, progress=False)


def train_all(runs: list[RunSpec], deadline_s: float) -> dict[str, int | None]:
    """Start every run as its own process and wait for all, stopping any past the deadline."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    processes = {}
    for spec in runs:
        process = context.Process(target=_train_one, args=(spec,), name=spec.name)
        process.start()
        processes[spec.name] = process
    started = time.monotonic()
    while any(p.is_alive() for p in processes.values()):
        if time.monotonic() - started > deadline_s:
            for name, process in processes.items():
                if process.is_alive():
                    log.error("%s: past the deadline of %.0f s, stopped", name, deadline_s)
                    process.terminate()
            break
        time.sleep(2)
    for process in processes.values():
        process.join(timeout=30)
    return {name: p.exitcode for name, p in processes.items()}


def run_summary(spec: RunSpec, exitcode: int | None) -> dict[str, Any]:
    """What a run made: its model id, epochs and best validation figures (from its checkpoint)."""
    from models.net.checkpoint import load_checkpoint

    out: dict[str, Any] = {"name": spec.name, "config": spec.config, "exitcode": exitcode}
    model = spec.out_dir / "model.pt"
    if model.is_file():
        payload = load_checkpoint(model)
        training = payload.get("training", {})
        out.update(
            model_id=payload["model_id"],
            held_out=training.get("split", {}).get("holdout_sets", []),
            epochs_run=training.get("epochs_run"),
            epochs_planned=training.get("epochs_planned"),
            train_minutes=training.get("train_minutes"),
            val=payload.get("metrics", {}).get("val", {}),
        )
    return out


def bundle(
    runs: list[RunSpec], summary: list[dict[str, Any]], bundle_dir: Path, part_bytes: int = PART_BYTES
) -> Path:
    """One tar of every run's checkpoint, metrics, config and log (full models first), cut into
    parts; returns the parts index."""
    from models.net.checkpoint import split_file

    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    bundle_dir.mkdir(parents=True)
    tar_path = bundle_dir / BUNDLE_NAME
    with tarfile.open(tar_path, "w") as tar:
        tar.addfile(*_json_member("summary.json", summary))
        for spec in runs:
            for name in ("model.pt", "metrics.jsonl", "config.toml", "train.log"):
                path = spec.out_dir / name
                if path.is_file():
                    tar.add(path, arcname=f"{spec.name}/{name}")
    index = split_file(tar_path, bundle_dir, part_bytes=part_bytes)
    tar_path.unlink()
    return index


def _json_member(name: str, value: Any) -> tuple[tarfile.TarInfo, Any]:
    import io

    data = json.dumps(value, indent=2).encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    return info, io.BytesIO(data)


def send(index: Path, out_dir: Path, parts: int) -> list[str]:
    """Copy the index and the first ``parts`` parts to ``out_dir``; returns the parts left behind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = json.loads(index.read_text())
    shutil.copy2(index, out_dir / index.name)
    for name in spec["parts"][:parts]:
        shutil.copy2(index.parent / name, out_dir / name)
    return spec["parts"][parts:]


def unpack(sources: list[Path], run_root: Path) -> int:
    """Back here: rejoin the parts (from one or more fetched folders) and unpack the runs."""
    from models.net.checkpoint import join_parts

    index = next(
        (s / f"{BUNDLE_NAME}.parts.json" for s in sources if (s / f"{BUNDLE_NAME}.parts.json").is_file()),
        None,
    )
    if index is None:
        log.error("no %s.parts.json in %s", BUNDLE_NAME, ", ".join(map(str, sources)))
        return 2
    staging = run_root / ".parts"
    staging.mkdir(parents=True, exist_ok=True)
    shutil.copy2(index, staging / index.name)
    for name in json.loads(index.read_text())["parts"]:
        found = next((s / name for s in sources if (s / name).is_file()), None)
        if found is None:
            log.error("part %s is in none of %s: fetch it first", name, ", ".join(map(str, sources)))
            return 2
        shutil.copy2(found, staging / name)
    tar_path = join_parts(staging / index.name, run_root / BUNDLE_NAME)
    with tarfile.open(tar_path) as tar:
        tar.extractall(run_root, filter="data")
    tar_path.unlink()
    shutil.rmtree(staging)
    log.info(
        "unpacked into %s: %s", run_root, ", ".join(sorted(p.name for p in run_root.iterdir() if p.is_dir()))
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if argv[:1] == ["unpack"]:
        parser = argparse.ArgumentParser(prog="train_gpu.py unpack", description="rejoin and unpack a bundle")
        parser.add_argument("sources", type=Path, nargs="+", help="fetched folders holding the parts")
        parser.add_argument("run_root", type=Path, help="where the run folders go (e.g. runs/gpu)")
        args = parser.parse_args(argv[1:])
        return unpack(args.sources, args.run_root)

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", type=Path, help="folder of packed sets, each <set>/manifest.csv")
    parser.add_argument("out", type=Path, help="where the returned files go ($OUT)")
    parser.add_argument(
        "--config", nargs="+", default=["configs/gpu.toml"], help="recipes (default configs/gpu.toml)"
    )
    parser.add_argument("--folds", action="store_true", help="also one leave-one-site-out run per site")
    parser.add_argument("--minutes", type=float, default=7.0, help="training budget of every run (default 7)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run"
    )
    parser.add_argument("--runs", type=Path, default=Path("runs/gpu"), help="run folders (default runs/gpu)")
    parser.add_argument("--bundle", type=Path, default=Path("runs/gpu-bundle"), help="parts folder")
    parser.add_argument("--send", type=int, default=4, help="parts copied to OUT now (default 4: 60 MiB)")
    parser.add_argument(
        "--part-mib", type=float, default=PART_BYTES / 2**20, help="part size (default 15 MiB)"
    )
    parser.add_argument("--wheels", type=Path, default=Path(".whl"), help="where the carried wheel lies")
    args = parser.parse_args(argv)

    manifests = sorted(str(p.resolve()) for p in args.data.glob("*/manifest.csv"))
    if not manifests:
        log.error("no <set>/manifest.csv under %s", args.data)
        return 2
    ensure_metric_learning(args.wheels)
    budget = [f"optim.fit_minutes={args.minutes}", f"optim.max_minutes={args.minutes * 1.15 + 0.5}"]
    runs = plan_runs(args.config, manifests, [*budget, *args.set], args.runs, folds=args.folds)
    log.info("data: %s", ", ".join(Path(m).parent.name for m in manifests))
    log.info("runs: %s", ", ".join(r.name for r in runs))

    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=len(args.config)) as pool:
        for line in pool.map(_decode, args.config, [runs[0].overrides] * len(args.config)):
            log.info("decoded %s", line)
    log.info("decoding took %.0f s", time.monotonic() - started)

    exitcodes = train_all(runs, deadline_s=args.minutes * 60 * 1.3 + 120)
    summary = [run_summary(spec, exitcodes[spec.name]) for spec in runs]
    for row in summary:
        log.info("%s", json.dumps(row))
    index = bundle(runs, summary, args.bundle, int(args.part_mib * 2**20))
    left = send(index, args.out, args.send)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    if left:
        log.info("parts left on this machine for a second call: %s (in %s)", " ".join(left), args.bundle)
    log.info("done in %.0f s", time.monotonic() - started)
    return 0 if all(code == 0 for code in exitcodes.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
