"""mmfm.config: YAML round trip, typed dotted overrides, unknown-key errors."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from mmfm.config import add_config_args, config_from_args, config_to_dict, load_config, save_config


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    name: str = "adamw"


@dataclass
class Teacher:
    name: str = "clip"
    weight: float = 1.0


@dataclass
class Cfg:
    steps: int = 10
    use_ema: bool = False
    tag: str = "run"
    mode: Literal["fast", "slow"] = "fast"
    limit: int | None = None
    dims: list[int] = field(default_factory=lambda: [1, 2])
    sizes: tuple[int, ...] = (224,)
    weights: dict[str, float] = field(default_factory=lambda: {"clip": 1.0})
    optim: Inner = field(default_factory=Inner)
    teachers: list[Teacher] = field(default_factory=list)
    maybe: Inner | None = None


def test_round_trip(tmp_path):
    cfg = Cfg(
        steps=5,
        use_ema=True,
        tag="x",
        mode="slow",
        limit=3,
        dims=[4],
        sizes=(256, 432),
        weights={"clip": 0.5, "dino": 2.0},
        optim=Inner(lr=3e-4, betas=(0.8, 0.95)),
        teachers=[Teacher("siglip", 0.3), Teacher("sam", 2.0)],
        maybe=Inner(name="sgd"),
    )
    path = save_config(cfg, tmp_path / "c.yaml")
    back = load_config(Cfg, path)
    assert back == cfg
    assert isinstance(back.sizes, tuple) and isinstance(back.optim.betas, tuple)
    assert isinstance(back.teachers[0], Teacher)
    # the YAML is plain data (no python tags)
    assert yaml.safe_load(path.read_text())["sizes"] == [256, 432]
    assert config_to_dict(back) == config_to_dict(cfg)


def test_overrides_are_coerced_by_annotation(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 3\noptim:\n  lr: 1e-4\n")  # PyYAML reads 1e-4 as a string
    cfg = load_config(
        Cfg,
        tmp_path / "c.yaml",
        [
            "use_ema=true",
            "tag=007",
            "mode=slow",
            "limit=none",
            "dims=[5, 6]",
            "sizes=[256,432]",
            "weights.dino=0.25",
            "optim.betas=[0.5, 0.6]",
            "teachers=[{name: a, weight: 2}]",
            "maybe.lr=2",
        ],
    )
    assert cfg.steps == 3 and type(cfg.steps) is int
    assert cfg.optim.lr == pytest.approx(1e-4) and type(cfg.optim.lr) is float
    assert cfg.use_ema is True
    assert cfg.tag == "007"  # a str field keeps the text, not int 7
    assert cfg.mode == "slow"
    assert cfg.limit is None
    assert cfg.dims == [5, 6]
    assert cfg.sizes == (256, 432)
    assert cfg.weights == {"clip": 1.0, "dino": 0.25}  # a dict override adds to the default dict
    assert cfg.optim.betas == (0.5, 0.6)
    assert cfg.teachers == [Teacher("a", 2.0)]
    assert cfg.maybe == Inner(lr=2.0)  # Optional[dataclass] built from its defaults + the override
    assert load_config(Cfg, None, ["limit=12"]).limit == 12


def test_unknown_key_names_key_and_valid_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.lrr'.*valid keys: betas, lr, name"):
        load_config(Cfg, None, ["optim.lrr=1"])
    (tmp_path / "c.yaml").write_text("stepz: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'stepz'.*steps"):
        load_config(Cfg, tmp_path / "c.yaml")


def test_bad_values_and_files(tmp_path):
    with pytest.raises(TypeError, match="'steps'"):
        load_config(Cfg, None, ["steps=abc"])
    with pytest.raises(ValueError, match=r"'mode'.*\['fast', 'slow'\]"):
        load_config(Cfg, None, ["mode=medium"])
    with pytest.raises(TypeError, match="'use_ema'"):
        load_config(Cfg, None, ["use_ema=maybe"])
    with pytest.raises(ValueError, match="optim.betas"):
        load_config(Cfg, None, ["optim.betas=[1, 2, 3]"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(Cfg, None, ["steps"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(Cfg, tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(Cfg, tmp_path / "list.yaml")


def test_argparse_integration(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 7\n")
    parser = add_config_args(argparse.ArgumentParser())
    parser.add_argument("--out")
    args = parser.parse_args(
        ["--local_rank=1", "--config", str(tmp_path / "c.yaml"), "--out", "o", "optim.lr=0.5", "tag=t"]
    )
    cfg = config_from_args(Cfg, args)
    assert (cfg.steps, cfg.optim.lr, cfg.tag, args.out) == (7, 0.5, "t", "o")


@dataclass
class Parent:
    # The parent's default for a nested config differs from the nested class's own defaults.
    optim: Inner = field(default_factory=lambda: Inner(lr=0.1, name="sgd"))


def test_nested_override_keeps_parent_default(tmp_path):
    cfg = load_config(Parent, None, ["optim.betas=[0.1, 0.2]"])
    assert cfg.optim == Inner(lr=0.1, betas=(0.1, 0.2), name="sgd")
    (tmp_path / "p.yaml").write_text("optim:\n  name: adam\n")
    assert load_config(Parent, tmp_path / "p.yaml").optim == Inner(lr=0.1, name="adam")
    assert load_config(Parent).optim == Inner(lr=0.1, name="sgd")


@dataclass
class WithTeachers:
    teachers: list[Teacher] = field(default_factory=lambda: [Teacher("clip", 1.0), Teacher("dino", 1.0)])


def test_list_index_overrides():
    cfg = load_config(WithTeachers, None, ["teachers.1.weight=0.25", "teachers.0.name=siglip"])
    assert cfg.teachers == [Teacher("siglip", 1.0), Teacher("dino", 0.25)]
    with pytest.raises(ValueError, match="'5' is not an index of the 2-item list at 'teachers'"):
        load_config(WithTeachers, None, ["teachers.5.weight=1"])
    with pytest.raises(ValueError, match=r"unknown config key 'teachers\[0\]\.wieght'"):
        load_config(WithTeachers, None, ["teachers.0.wieght=1"])


def test_mapping_override_without_space_after_colon_is_an_error_with_the_fix():
    """YAML reads `{clip:2}` as the key 'clip:2' with no value; that must not pass silently."""
    with pytest.raises(ValueError, match=r"weights=\{clip: 2\}.*weights\.clip=2"):
        load_config(Cfg, None, ["weights={clip:2}"])
    assert load_config(Cfg, None, ["weights={clip: 2}"]).weights == {"clip": 2.0}
