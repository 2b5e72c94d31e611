"""Experiment configs: inheritance, paths relative to the file, typed overrides, per-head margins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.training.config import ConfigError, load_config, to_toml

REPO_ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_every_shipped_config_loads() -> None:
    for path in sorted((REPO_ROOT / "configs").rglob("*.toml")):
        config = load_config(path)
        assert config.data.manifests, path
        assert all(os.path.isabs(m) for m in config.data.manifests), path


def test_holdout_configs_are_the_default_plus_one_override() -> None:
    default = load_config(REPO_ROOT / "configs" / "default.toml").to_dict()
    for name in ("covid", "kermany", "nih"):
        held = load_config(REPO_ROOT / "configs" / f"holdout-{name}.toml").to_dict()
        differing = {
            (section, key)
            for section, values in held.items()
            if isinstance(values, dict)
            for key, value in values.items()
            if default[section][key] != value
        }
        assert differing == {("data", "holdout_sets")}, (name, differing)


def test_base_chain_merges_tables_and_resolves_paths_per_file(tmp_path: Path) -> None:
    write(
        tmp_path / "a" / "base.toml",
        'name = "base"\n[data]\nmanifests = ["sets/x.csv"]\nval_fraction = 0.2\n'
        "[optim]\nepochs = 3\nlr = 0.01\n",
    )
    child = write(
        tmp_path / "b" / "child.toml",
        'base = "../a/base.toml"\nname = "child"\n[optim]\nepochs = 5\n[data]\nholdout_sets = ["x"]\n',
    )
    config = load_config(child)
    assert config.name == "child"
    assert config.optim.epochs == 5 and config.optim.lr == 0.01  # table merged key by key
    assert config.data.val_fraction == 0.2 and config.data.holdout_sets == ["x"]
    # the manifest is relative to the file that named it, not to the child or the working directory
    assert config.data.manifests == [str((tmp_path / "a" / "sets" / "x.csv").resolve())]
    # --set paths are relative to the working directory
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        overridden = load_config(child, ['data.manifests=["here.csv"]'])
    finally:
        os.chdir(cwd)
    assert overridden.data.manifests == [str((tmp_path / "here.csv").resolve())]
    # no absolute path travels into a checkpoint: portable_dict is relative to the working directory
    portable = config.portable_dict()["data"]["manifests"][0]
    assert not os.path.isabs(portable) and portable.endswith(os.path.join("a", "sets", "x.csv"))


def test_inheritance_loops_and_missing_bases_are_clear_errors(tmp_path: Path) -> None:
    write(tmp_path / "one.toml", 'base = "two.toml"\n')
    write(tmp_path / "two.toml", 'base = "one.toml"\n')
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "one.toml")
    write(tmp_path / "orphan.toml", 'base = "nowhere.toml"\n')
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "orphan.toml")
    write(tmp_path / "broken.toml", "[optim\nepochs = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.epochs=abc", "optim.epochs must be an integer, got 'abc'"),
        ("optim.epochs=2.5", "optim.epochs must be an integer"),
        ("optim.lr=true", "optim.lr must be a number"),
        ("optim.lr", "expects section.key=value"),
        ("=3", "expects section.key=value"),
        ("optim=3", r"\[optim\] must be a table"),
        ("optim.epochs.x=3", "optim.epochs is not a table"),
        ("nosuch.key=1", r"unknown config key\(s\) \['nosuch'\]"),
        ("optim.nosuch=1", r"unknown key\(s\) \['nosuch'\] in \[optim\]"),
        ("augment.gamma=[1.0]", "augment.gamma must be a list of 2 numbers"),
        ("data.manifests=3", "must be a path or a list of paths"),
        ("head.m2=0.3", r"unknown key\(s\) \['m2'\] in \[head\]"),
        ("head.name=nosuch", "unknown head"),
        ("head.margins.combined=0.3", r"combined takes its margins as \[m1, m2, m3\]"),
        ("backbone.depth=19", "has no depth 19"),
    ],
)
def test_malformed_overrides_are_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(REPO_ROOT / "configs" / "default.toml", [override])


def test_choosing_a_head_uses_that_heads_own_margin() -> None:
    default = REPO_ROOT / "configs" / "default.toml"
    arc = load_config(default).head.build_kwargs()
    assert (arc["m1"], arc["m2"], arc["m3"]) == (1.0, 0.3, 0.0)  # the default's ArcFace margin
    cos = load_config(default, ["head.name=cosface"]).head.build_kwargs()
    assert (cos["m1"], cos["m2"], cos["m3"]) == (1.0, 0.0, 0.35)  # CosFace's preset, no ArcFace m2
    tuned = load_config(default, ["head.name=cosface", "head.margins.cosface=0.4"]).head.build_kwargs()
    assert (tuned["m2"], tuned["m3"]) == (0.0, 0.4)
    combined = load_config(default, ["head.name=combined", "head.margins.combined=[1.0, 0.2, 0.1]"])
    assert [combined.head.build_kwargs()[k] for k in ("m1", "m2", "m3")] == [1.0, 0.2, 0.1]


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = load_config(
        REPO_ROOT / "configs" / "default.toml", ["head.margins.cosface=0.4", "augment.gamma=[0.8, 1.2]"]
    )
    saved = write(tmp_path / "config.toml", to_toml(config.to_dict()))
    assert load_config(saved).to_dict() == config.to_dict()
