"""training/config.py: one dataclass holds every training setting; the CLI, presets and train_args.json
all come from it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from minicodeparrot.cli import build_parser
from minicodeparrot.errors import UserError
from minicodeparrot.training.config import PRESETS, TrainConfig, config_dict, given_values, resolve_config

BASE = ["train", "--output-dir", "out", "--tokenizer", "tok", "--dataset-name-train", "a",
        "--dataset-name-valid", "b"]


def _train_flags() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    return {a.dest for a in sub._actions if a.dest not in ("help", "func")}


def test_every_setting_is_one_flag_and_every_flag_one_setting():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert _train_flags() == fields | {"preset"}
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"], f.name


def test_presets_override_only_existing_settings():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, overrides in PRESETS.items():
        assert set(overrides) <= fields, name


def test_typed_value_beats_preset_beats_default():
    args = build_parser().parse_args([*BASE, "--preset", "codeparrot-small", "--learning-rate", "1e-3"])
    cfg, _ = resolve_config(given_values(args), args.preset)
    assert cfg.learning_rate == 1e-3  # typed
    assert cfg.train_batch_size == 12 and cfg.mixed_precision == "bf16"  # the book's small run
    assert cfg.weight_decay == 0.1 and cfg.max_grad_norm == 1.0  # the CodeParrot scripts' defaults
    cfg, _ = resolve_config(given_values(build_parser().parse_args([*BASE, "--preset", "codeparrot"])),
                            "codeparrot")
    assert cfg.model_config == "gpt2-xl" and cfg.zero and cfg.reorder_and_upcast_attn
    assert cfg.scale_attn_by_inverse_layer_idx and cfg.gradient_checkpointing


def test_boolean_flags_can_be_turned_off_against_a_preset():
    args = build_parser().parse_args([*BASE, "--preset", "codeparrot", "--no-zero", "--no-progress"])
    cfg, _ = resolve_config(given_values(args), args.preset)
    assert cfg.zero is False and cfg.progress is False and cfg.gradient_checkpointing is True


@pytest.mark.parametrize("flag,value,message", [
    ("--max-grad-norm", "0", "--max-grad-norm must be positive"),
    ("--train-batch-size", "0", "--train-batch-size must be at least 1"),
    ("--weight-decay", "-1", "--weight-decay must be >= 0"),
    ("--max-eval-steps", "0", "--max-eval-steps must be -1"),
    ("--dist-timeout", "0", "--dist-timeout must be a positive number of minutes"),
])
def test_impossible_values_are_one_line_errors(flag, value, message):
    args = build_parser().parse_args([*BASE, flag, value])
    with pytest.raises(UserError, match=message):
        resolve_config(given_values(args), args.preset)


def test_config_dump_round_trips():
    cfg, _ = resolve_config(given_values(build_parser().parse_args([*BASE, "--preset", "tiny"])), "tiny")
    again, _ = resolve_config(json.loads(json.dumps(config_dict(cfg))))
    assert again == cfg
