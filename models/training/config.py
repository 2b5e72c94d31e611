"""Experiment configs: a base TOML plus small experiment files that override it.

As in insightface's ``arcface_torch`` (``configs/base.py`` and one small file per experiment), an
experiment file names its parent with a top-level ``base = "default.toml"`` and sets only what
differs; tables merge key by key, any other value (lists included) replaces the parent's. Input
paths (``data.manifests``, ``optim.init_from``) resolve relative to the file that sets them, so a
config works from any working directory; output paths (``output_dir``, ``data.cache_dir``) stay
relative to the working directory. ``--set section.key=value`` overrides come last, as TOML values
(a bare word is a string), and are type-checked like everything else: a typo or a wrong type is a
:class:`ConfigError` naming the key, never a traceback from deep inside training.
"""

from __future__ import annotations

import json
import os
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from models.data import AugmentConfig
from models.imaging.preprocess import PreprocessConfig
from models.net.backbones import BackboneConfig
from models.net.heads import HEAD_PRESETS, head_margins

BASE_KEY = "base"
#: (section, key) of input paths, resolved against the folder of the config file that sets them.
INPUT_PATHS = (("data", "manifests"), ("optim", "init_from"))


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


@dataclass
class DataConfig:
    manifests: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    holdout_sets: list[str] = field(default_factory=list)  # whole sets kept out of training (unseen site)
    # Sets that come from one hospital, by a name for the site: holding one out holds out all of them,
    # so a leave-one-out fold never trains on the hospital it is measured on.
    sites: dict[str, list[str]] = field(default_factory=dict)
    # Sets of children's radiographs: reports give the mean over the adult sets beside the mean over
    # all (an adult hospital weighs a paediatric fold less).
    children: list[str] = field(default_factory=list)
    balance_sets: bool = False  # equal share of each set's patients per epoch (PKSampler groups)
    merge_duplicates: bool = False  # label cleaning: one patient for ids sharing a near-identical image
    cache_dir: str = ".cache/cxr-reid"

    def site_names(self, sets: Sequence[str]) -> list[str]:
        """One name per hospital among ``sets``: a ``sites`` name where several sets share one, else
        the set's own name (what ``holdout_sets`` takes to leave that hospital out)."""
        names, covered = [], set()
        for site, members in sorted(self.sites.items()):
            if set(members) & set(sets):
                names.append(site)
                covered.update(members)
        return names + [s for s in sets if s not in covered]

    def held_out(self) -> list[str]:
        """The sets kept out of training: ``holdout_sets`` (set or site names) with every set of
        their sites."""
        out: set[str] = set()
        for name in self.holdout_sets:
            out.update(self.sites.get(name, [name]))
            out.update(*(group for group in self.sites.values() if name in group))
        return sorted(out)


@dataclass
class HeadConfig:
    """The margin head. ``margins`` holds each head's own margin under its name (``arcface = 0.3``,
    ``cosface = 0.35``, ``sphereface = 4``, ``combined = [1.0, 0.3, 0.2]``); only the entry of
    ``name`` is used, so switching ``name`` never carries another head's margin along. A head
    without an entry uses its published preset (models/net/heads.py)."""

    name: str = "arcface"
    s: float = 30.0
    margins: dict[str, float | list[float]] = field(default_factory=dict)
    sub_centers: int = 1
    weight: float = 1.0  # weight of the margin loss in the objective

    def __post_init__(self) -> None:
        unknown = sorted({self.name, *self.margins} - set(HEAD_PRESETS))
        if unknown:
            raise ConfigError(f"unknown head(s) {unknown} in [head]; choose from {sorted(HEAD_PRESETS)}")
        for name, margin in self.margins.items():  # a malformed margin fails here, at load time
            try:
                head_margins(name, margin)
            except ValueError as exc:
                raise ConfigError(f"[head.margins] {exc}") from None

    def build_kwargs(self) -> dict[str, float]:
        """Keyword arguments of ``build_head`` beyond the name: scale, sub-centres, this head's margin."""
        margins = head_margins(self.name, self.margins.get(self.name))
        return {"s": self.s, "sub_centers": self.sub_centers, **margins}


@dataclass
class LossConfig:
    supcon_weight: float = 1.0
    supcon_temperature: float = 0.1


@dataclass
class OptimConfig:
    """Optimiser and schedule. The learning rate follows steps (warm-up, then cosine to zero over
    ``epochs`` x steps per epoch), so one config follows the same schedule on any machine;
    ``max_minutes`` is only a hard stop, and a run it cuts short records that it was cut."""

    epochs: int = 20
    steps_per_epoch: int = 0  # 0 = one draw per training patient; > 0 fixes the epoch length in steps
    patients_per_batch: int = 32
    images_per_patient: int = 2
    lr: float = 2e-3
    head_lr_scale: float = 10.0  # the head's class centres start random: let them move faster
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    amp: bool = True  # bf16 autocast on CUDA, and on CPUs that do bf16 in hardware (AMX, AVX512-BF16)
    channels_last: bool = False  # NHWC memory format (faster convolutions on GPUs)
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads; 0 = torch's default
    max_minutes: float = 0.0  # hard stop on wall time (0 = none); the schedule does not depend on it
    # > 0: size the schedule to this many minutes on a machine whose pace is not known beforehand (a
    # lent accelerator). The first epochs are timed and ``epochs`` is set to what fits; the checkpoint
    # records the epochs planned, so the run can be repeated as a fixed schedule anywhere.
    fit_minutes: float = 0.0
    eval_max_impostor_pairs: int = 200_000
    init_from: str = ""  # a checkpoint whose backbone weights start this run (e.g. pre-training)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "backbone": BackboneConfig,
    "preprocess": PreprocessConfig,
    "head": HeadConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "augment": AugmentConfig,
}


@dataclass
class TrainConfig:
    name: str = "cxr-reid"
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from plain values (a parsed TOML), checking every key and type."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; sections are {sorted(SECTIONS)}")
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in SECTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(f"[{key}] must be a table of settings, got {value!r}")
                kwargs[key] = build_section(SECTIONS[key], value, key)
            else:
                kwargs[key] = _check(value, str, key)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def portable_dict(self) -> dict[str, Any]:
        """``to_dict`` with input paths relative to the working directory, for checkpoints and cards:
        no absolute path of the training machine travels with a model."""
        out = self.to_dict()
        for section, key in INPUT_PATHS:
            value = out[section][key]
            if isinstance(value, list):
                out[section][key] = [_relative(v) for v in value]
            elif value:
                out[section][key] = _relative(value)
        return out


def _relative(path: str) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def build_section(section: type, values: dict[str, Any], name: str) -> Any:
    """One config table -> its dataclass; unknown keys and wrong types are a :class:`ConfigError`."""
    hints = typing.get_type_hints(section)
    allowed = {f.name for f in fields(section)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{name}]; known keys are {sorted(allowed)}")
    checked = {key: _check(value, hints[key], f"{name}.{key}") for key, value in values.items()}
    try:
        return section(**checked)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"[{name}] {exc}") from None


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} numbers" if Ellipsis not in args else "a list"
    if origin is dict:
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _check(value: Any, hint: Any, where: str) -> Any:
    """``value`` if it fits the annotation ``hint`` (ints widen to floats, lists to tuples), else raise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None):
                continue
            try:
                return _check(value, option, where)
            except ConfigError:
                continue
    elif origin is list and isinstance(value, list | tuple):
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple and isinstance(value, list | tuple):
        kinds = [args[0]] * len(value) if Ellipsis in args else list(args)
        if len(kinds) == len(value):
            pairs = enumerate(zip(value, kinds, strict=True))
            return tuple(_check(v, kind, f"{where}[{i}]") for i, (v, kind) in pairs)
    elif origin is dict and isinstance(value, dict):
        return {str(k): _check(v, args[1], f"{where}.{k}") for k, v in value.items()}
    elif (hint is bool and isinstance(value, bool)) or (
        hint is int and isinstance(value, int) and not isinstance(value, bool)
    ):
        return value
    elif hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif hint is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where} must be {_describe(hint)}, got {value!r}")


# --- reading files and overrides -------------------------------------------------------------------


def read_config_file(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file merged over its ``base`` chain, with its input paths made absolute."""
    source = Path(path).resolve()
    if source in _seen:
        raise ConfigError(f"config inheritance loops: {' -> '.join(str(p) for p in (*_seen, source))}")
    if not source.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with source.open("rb") as handle:
            values = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = values.pop(BASE_KEY, None)
    _resolve_input_paths(values, source.parent, str(path))
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a file name, got {base!r}")
    return merge(read_config_file(source.parent / base, (*_seen, source)), values)


def _resolve_input_paths(values: dict[str, Any], folder: Path, where: str) -> None:
    for section, key in INPUT_PATHS:
        table = values.get(section)
        if not isinstance(table, dict) or key not in table:
            continue
        value = table[key]
        if isinstance(value, str):
            table[key] = str((folder / value).resolve()) if value else value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            table[key] = [str((folder / v).resolve()) for v in value]
        else:
            raise ConfigError(f"{where}: {section}.{key} must be a path or a list of paths, got {value!r}")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; any other value in ``override`` replaces the base's."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(override: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value); the value is TOML, a bare word a string."""
    key, sep, raw = override.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    if not sep or not all(parts):
        raise ConfigError(f"--set expects section.key=value, got {override!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_override(values: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    """Set ``values[parts[0]][parts[1]]... = value`` in place; input paths resolve against the cwd."""
    target = values
    for depth, part in enumerate(parts[:-1]):
        nxt = target.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {text}: {'.'.join(parts[: depth + 1])} is not a table")
        target = nxt
    if len(parts) == 2 and tuple(parts) in INPUT_PATHS:
        probe = {parts[0]: {parts[1]: value}}
        _resolve_input_paths(probe, Path.cwd(), f"--set {text}")
        value = probe[parts[0]][parts[1]]
    target[parts[-1]] = value


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read an experiment config (with its base chain) and apply ``section.key=value`` overrides."""
    values: dict[str, Any] = read_config_file(path) if path is not None else {}
    for override in overrides or []:
        parts, value = parse_override(override)
        apply_override(values, parts, value, override)
    return TrainConfig.from_dict(values)


def to_toml(values: dict[str, Any]) -> str:
    """A small TOML writer for the resolved config (sections of scalars, lists and inline tables)."""

    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, list | tuple):
            return "[" + ", ".join(literal(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{json.dumps(str(k))} = {literal(v)}" for k, v in value.items()) + "}"
        return json.dumps(str(value))

    top = [f"{k} = {literal(v)}" for k, v in values.items() if not isinstance(v, dict)]
    blocks = []
    for key, section in values.items():
        if isinstance(section, dict):
            lines = [f"{k} = {literal(v)}" for k, v in section.items() if v is not None]
            blocks.append(f"[{key}]\n" + "\n".join(lines))
    return "\n".join(top) + "\n\n" + "\n\n".join(blocks) + "\n"
