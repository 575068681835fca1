from dataclasses import dataclass, field
from typing import Literal

import pytest

from lmforge import config
from lmforge.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "wsd"] = "cosine"


@dataclass
class Outer:
    name: str = "x"
    n_layers: int = 2
    window: int | None = None
    compile: bool = False
    layers: list[int] = field(default_factory=list)
    train: Inner = field(default_factory=Inner)


def test_overrides_are_typed_by_field():
    cfg = config.load(Outer, overrides=["--train.lr=3e-4", "n_layers=4", "compile=true",
                                        "window=128", "layers=1,2,3", "train.betas=[0.8, 0.99]"])
    assert cfg.train.lr == 3e-4 and cfg.n_layers == 4 and cfg.compile is True
    assert cfg.window == 128 and cfg.layers == [1, 2, 3] and cfg.train.betas == (0.8, 0.99)


def test_preset_then_overrides_precedence(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('name = "preset"\nn_layers = 6\n[train]\nlr = 0.01\nschedule = "wsd"\n')
    cfg = config.load(Outer, preset=preset, overrides=["n_layers=8"])
    assert (cfg.name, cfg.n_layers, cfg.train.lr, cfg.train.schedule) == ("preset", 8, 0.01, "wsd")


def test_unknown_key_names_file_and_key(tmp_path):
    preset = tmp_path / "bad.toml"
    preset.write_text("[train]\nlrr = 1.0\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*'train\.lrr'"):
        config.load(Outer, preset=preset)


def test_bad_values_rejected():
    with pytest.raises(ConfigError, match="n_layers"):
        config.load(Outer, overrides=["n_layers=2.5"])
    with pytest.raises(ConfigError, match="one of"):
        config.load(Outer, overrides=["train.schedule=linear"])
    with pytest.raises(ConfigError, match="bool"):
        config.load(Outer, overrides=["compile=maybe"])
    with pytest.raises(ConfigError, match="--section.key=value"):
        config.load(Outer, overrides=["n_layers"])


def test_save_and_reload_roundtrip(tmp_path):
    cfg = config.load(Outer, overrides=["train.lr=0.5", "layers=4,5"])
    config.save_toml(cfg, tmp_path / "config.toml")
    again = config.load(Outer, preset=tmp_path / "config.toml")
    assert again == cfg
