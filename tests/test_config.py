from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pairtune.config import ConfigError, load_settings

from .conftest import ROOT, compose_config


def test_defaults_reproduce_the_seed_card():
    settings = load_settings(compose_config())
    assert (settings.train.batch_size, settings.train.epochs, settings.train.lr, settings.train.seed) == (32, 10, 5e-5, 42)
    assert settings.train.scheduler == "linear" and settings.train.warmup_steps == 0
    assert settings.loss.scale == 20.0 and settings.loss.similarity == "cosine"
    assert settings.loss.mini_batch_size is None and settings.loss.gather_across_devices is False
    assert settings.model.name == "sentence-transformers/all-MiniLM-L6-v2" and settings.model.max_seq_length == 256
    assert (settings.data.train_size, settings.data.eval_size) == (263, 45)


def test_public_keys_are_overridable():
    overrides = ["train.lr=1e-5", "train.max_steps=7", "loss.mini_batch_size=8", "paths.model=/tmp/m", "data.source=x.csv"]
    settings = load_settings(compose_config(overrides))
    assert settings.train.lr == 1e-5 and settings.train.max_steps == 7 and settings.loss.mini_batch_size == 8
    assert settings.paths.model == "/tmp/m" and settings.data.source == "x.csv"


def test_unknown_key_fails_at_composition_naming_it():
    with pytest.raises(ConfigCompositionException, match="learning_rate"):
        compose_config(["train.learning_rate=1e-5"])


def test_unknown_key_in_a_preset_fails_naming_it(tmp_path):
    raw = OmegaConf.to_container(compose_config(), resolve=True)
    raw["loss"]["temperature"] = 0.05
    with pytest.raises(ConfigError, match="config key 'loss.temperature'"):
        load_settings(raw)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigError, match="config key 'train.epochs'"):
        load_settings(compose_config(["train.epochs=ten"]))


@pytest.mark.parametrize(
    ("override", "key"),
    [("train.lr=-1e-5", "train.lr"), ("train.batch_size=0", "train.batch_size"), ("train.epochs=0", "train.epochs"),
     ("loss.scale=0", "loss.scale"), ("data.train_size=1.5", "data.train_size")],
)
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_settings(compose_config([override]))


def test_schema_also_guards_configs_composed_elsewhere():
    """params.yaml from DVC arrives without the schema: load_settings applies it."""
    raw = OmegaConf.to_container(compose_config(), resolve=True)
    raw["train"]["warmup"] = 3
    with pytest.raises(ConfigError, match="warmup"):
        load_settings(raw)


def test_cli_prints_the_composed_config():
    out = subprocess.run([sys.executable, "pipelines/train.py", "--cfg", "job"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "batch_size: 32" in out.stdout and "scale: 20.0" in out.stdout


def test_cli_rejects_bad_value_before_work():
    out = subprocess.run([sys.executable, "pipelines/train.py", "train.lr=-1"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "pairtune: error: config key 'train.lr': must be > 0, got -1.0"
