"""Training configuration: defaults, TOML round trips, validation before any work."""

from __future__ import annotations

import math
import tomllib

import pytest

from pslm.errors import ConfigError
from pslm.train.config import TrainConfig, dump_toml, load_config


def test_defaults_resolve_to_explicit_values_and_round_trip_through_toml() -> None:
    cfg = TrainConfig().resolved()
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (
        4,
        4,
        128,
        128,
    )
    assert cfg.optim.warmup_steps == 100 and cfg.optim.decay_steps == cfg.train.steps
    again = TrainConfig.from_dict(tomllib.loads(dump_toml(cfg.to_dict())))
    assert again == cfg and again.resolved() == cfg


def test_the_shipped_shakespeare_config_loads() -> None:
    cfg = load_config("configs/shakespeare-char.toml")
    shape = cfg.model.gpt(vocab_size=66)
    assert (shape.n_layer, shape.block_size, shape.bias) == (4, 64, False)
    opt = cfg.optim.optimizer(cfg.train.steps)
    assert opt.lr_at(0) == pytest.approx(1e-5) and opt.lr_at(2000) == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"model": {"n_head": 3}}, "multiple of n_head"),
        ({"model": {"block_size": -1}}, "model.block_size"),
        ({"train": {"seed": -1}}, "seed"),
        ({"train": {"sample_tokens": -3}}, "sample_tokens"),
        ({"train": {"batch_size": 1}, "cluster": {"workers": 2}}, "every worker needs a row"),
        ({"cluster": {"timeout": -1.0}}, "timeout > 0"),
        ({"cluster": {"heartbeat_interval": 0.0}}, "heartbeat_interval"),
        ({"cluster": {"consistency": "gossip"}}, "consistency must be one of"),
        ({"cluster": {"consistency": "ssp"}}, "ssp needs a number"),
        ({"optim": {"weight_decay": math.nan}}, "finite"),
        ({"optim": {"min_lr": math.inf}}, "min_lr"),
        ({"optim": {"warmup_steps": 5000}}, "decay_steps"),
        ({"data": {"tokenizer": "words"}}, "tokenizer"),
    ],
)
def test_bad_settings_are_refused(changes, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment):
        TrainConfig().override(**changes)


def test_unknown_keys_and_wrong_types_are_named(tmp_path) -> None:
    for text, fragment in [
        ("[train]\nstepz = 3\n", "unknown settings in [train]: ['stepz']"),
        ("[trian]\n", "unknown config sections"),
        ("[train]\nsteps = '3'\n", "train.steps must be an integer"),
        ("[optim]\nbetas = [0.9]\n", "pair of numbers"),
        ("[train\n", "not valid TOML"),
    ]:
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            load_config(path)


def test_fine_tuning_runs_from_before_windows_keep_their_last_token_head() -> None:
    ft = {"task": "classify", "pretrained": "/p", "labels": ["a", "b"]}
    old = TrainConfig.from_dict({"finetune": ft})
    assert (old.finetune.pooling, old.finetune.windows) == ("last", 1)
    assert old.finetune.model_meta()["pooling"] == "last"
    new = TrainConfig.from_dict({"finetune": {**ft, "pooling": "mean", "windows": 8}})
    assert (new.finetune.pooling, new.finetune.windows) == ("mean", 8)
    assert TrainConfig.from_dict({}).finetune.model_meta() == {}
    with pytest.raises(ConfigError, match="windows"):
        TrainConfig.from_dict({"finetune": {**ft, "pooling": "mean", "windows": 0}})
