"""Every setting of a training run, in one dataclass: its type, its default and its help text.

`TrainConfig` is the single place a training setting lives. The command line is generated from it
(`add_arguments`: one flag per field, the flag's name, type and help taken from the field), a preset
is a named set of overrides of it (`PRESETS`), and the run's `train_args.json` is its dump, so a
setting cannot exist in one of these places and be missing from another. minGPT's
`get_default_config` and torchtitan's job config work the same way.

How a value is chosen, in order: what the user typed, else the preset's value, else the field's
default (the CodeParrot research scripts' defaults). `resolve_config` does that and rejects
impossible values with one line each.

This module imports nothing heavy (no torch), so `minicodeparrot --help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from minicodeparrot.errors import UserError


def _setting(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field with its help text (and argparse extras such as `choices`) in its metadata."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    """A training run's settings. Defaults are the CodeParrot scripts' (`codeparrot_training.py`)."""

    # --- data ---
    dataset_name_train: str | None = _setting(None, "training data: shard dir/glob or hub repo (owner/name)")
    dataset_name_valid: str | None = _setting(None, "validation data, same forms")
    tokenized: bool = _setting(False, "the datasets are pretokenized shards written by `minicodeparrot "
                                      "pretokenize`")
    tokenizer: str | None = _setting(None, "tokenizer directory (from train-tokenizer) or Hub repo id")
    seq_length: int = _setting(1024, "tokens per sequence")
    packing: str = _setting("concat", "concat: files joined with <|endoftext|> and cut into blocks (the "
                                      "book's); per-file: each file cut alone into full seq_length chunks, "
                                      "its tail dropped (the course's)", choices=["concat", "per-file"])
    record_shuffle_buffer: int = _setting(10_000, "files (records) in the streaming shuffle buffer before "
                                                  "packing (the CodeParrot script's 10000)")
    sequence_shuffle_buffer: int = _setting(10_000, "packed sequences in the shuffle buffer after packing, "
                                                    "so a batch holds no neighbouring pieces of one file")
    data_workers: int | None = _setting(
        None, "background processes per rank that read, tokenize, pack and shuffle. Default: 2 with a GPU "
              "(one worker tokenizes ~0.6-1M tokens/s of code, a GPU eats ~0.5M for codeparrot-small; two "
              "leave headroom and fit 8 ranks in a 16-core node), 0 on a CPU (the model needs the cores; 0 "
              "runs the pipeline in the training process)")
    prefetch: int = _setting(4, "batches each data worker keeps ready")
    data_streams: int | None = _setting(
        None, "virtual data streams, fixed when the run starts (default: the global batch, one sequence per "
              "stream and step); a resumed run may use any number of ranks that divides it (data/streams.py)")
    # --- model ---
    model_config: str = _setting("gpt2", "architecture (tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl), a "
                                         "config.json, or a model directory to continue from")
    scale_attn_by_inverse_layer_idx: bool = _setting(
        False, "scale attention scores by 1/layer (Mistral's stability tweak, used by the 1.5B run)")
    reorder_and_upcast_attn: bool = _setting(
        False, "attention softmax in fp32 under mixed precision (Mistral's other tweak, the 1.5B run's)")
    gradient_checkpointing: bool = _setting(
        False, "recompute each block's activations in backward (less memory, ~30%% more compute)")
    # --- optimization ---
    train_batch_size: int = _setting(8, "sequences per GPU per micro-step")
    gradient_accumulation_steps: int = _setting(16, "micro-steps per optimizer step")
    learning_rate: float = _setting(2e-4, "peak learning rate")
    weight_decay: float = _setting(0.1, "AdamW weight decay (never on biases and LayerNorm gains)")
    max_grad_norm: float = _setting(1.0, "clip the global gradient norm to this (the reference scripts' 1.0)")
    lr_scheduler_type: str = _setting("cosine", "LR curve after warmup",
                                      choices=["cosine", "linear", "constant"])
    num_warmup_steps: int = _setting(750, "linear warmup steps")
    max_train_steps: int = _setting(50_000, "optimizer steps; the schedule reaches 0 here")
    num_train_epochs: int | None = _setting(
        None, "train for N passes over the training data instead of --max-train-steps (the steps are "
              "counted from the data: token shards' headers, or one counting pass over the files)")
    mixed_precision: str = _setting("no", "autocast dtype (fp16 adds a GradScaler); auto: bf16 where the GPU "
                                          "has it, else fp16, no on a CPU",
                                    choices=["no", "bf16", "fp16", "auto"])
    keytoken_loss: bool = _setting(False, "the course's key-token weighted loss: each sequence's mean loss "
                                          "weighted by alpha * (1 + key tokens in it)")
    keytokens: str = _setting("plt,pd,sk,fit,predict", "comma-separated key words for --keytoken-loss; each, "
                                                        "with and without a leading space, counts if it is "
                                                        "one token")
    keytoken_alpha: float = _setting(1.0, "alpha of --keytoken-loss")
    zero: bool = _setting(False, "shard AdamW's state across ranks (ZeRO-1)")
    compile: bool = _setting(False, "torch.compile the model (after DDP wrapping)")
    seed: int = _setting(1, "seed of the weights, the data order and dropout")
    max_bad_steps: int = _setting(0, "skip up to N steps with a non-finite loss before stopping")
    dist_timeout: float = _setting(
        30.0, "minutes a rank waits in a collective for the others before the run fails. NCCL's default, 10, "
              "can pass while rank 0 writes a gpt2-xl checkpoint (~25 GB) to a slow shared filesystem and "
              "the other ranks wait at its barrier; a hung run is reported after this long")
    # --- evaluation, checkpoints, logs ---
    valid_batch_size: int = _setting(8, "sequences per GPU in evaluation")
    max_eval_steps: int = _setting(-1, "validation batches per rank (-1: all)")
    save_checkpoint_steps: int = _setting(1024, "evaluate and checkpoint every N optimizer steps")
    keep_last: int = _setting(3, "checkpoints kept")
    output_dir: str = _setting(".", "checkpoints step_N/ and the final model go here (multi-node: on a "
                                    "filesystem every node shares)", required=True)
    log_dir: str | None = _setting(None, "per-rank debug_{rank}.log and TensorBoard (default OUTPUT_DIR/log)")
    resume_from_checkpoint: str | None = _setting(None, "'latest' (in OUTPUT_DIR) or a step_N directory")
    progress: bool = _setting(True, "show a progress bar")
    push_to_hub: str | None = _setting(None, "Hub model repo (owner/name): every checkpoint is uploaded "
                                             "there beside training as a 'step N' commit, then the final "
                                             "model")
    hub_private: bool = _setting(False, "create the --push-to-hub repo private")


# The book's two runs (NLP with Transformers, ch. 10), per GPU, the Hugging Face course's run (chapter 7.6,
# codeparrot-ds), and a model that learns in CPU minutes. The 1.5B run used Mistral's stability tweaks
# (scale attention by 1/layer, softmax in fp32), without which its bf16 training diverged.
# The course's model is GPT-2 small with the tokenizer's vocabulary: it passes n_ctx=128, which GPT2Config
# keeps as a plain attribute, so the model still has 1024 positions (124.2M parameters with its 50,000
# tokens) and only the sequences are 128 long. It trained in fp16 (its GPUs had no bf16): "auto" takes
# bf16 where the GPU has it.
PRESETS: dict[str, dict[str, Any]] = {
    "codeparrot-small": dict(
        model_config="gpt2", train_batch_size=12, valid_batch_size=12, learning_rate=5e-4,
        num_warmup_steps=2000, max_train_steps=150_000, gradient_accumulation_steps=1,
        gradient_checkpointing=False, mixed_precision="bf16", save_checkpoint_steps=15_000),
    "codeparrot": dict(
        model_config="gpt2-xl", train_batch_size=2, valid_batch_size=2, learning_rate=2e-4,
        num_warmup_steps=750, max_train_steps=50_000, gradient_accumulation_steps=16,
        gradient_checkpointing=True, mixed_precision="bf16", save_checkpoint_steps=5_000, zero=True,
        scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    "codeparrot-ds": dict(
        model_config="gpt2", seq_length=128, packing="per-file", train_batch_size=32, valid_batch_size=32,
        gradient_accumulation_steps=8, learning_rate=5e-4, weight_decay=0.1, num_warmup_steps=1000,
        lr_scheduler_type="cosine", save_checkpoint_steps=5000, mixed_precision="auto", keytoken_loss=True,
        num_train_epochs=1),
    "tiny": dict(
        model_config="tiny", train_batch_size=8, valid_batch_size=16, learning_rate=3e-3,
        num_warmup_steps=30, max_train_steps=400, gradient_accumulation_steps=1, seq_length=128,
        record_shuffle_buffer=5000, sequence_shuffle_buffer=5000, save_checkpoint_steps=200,
        mixed_precision="no"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (`--train-batch-size` for `train_batch_size`), plus `--preset`.

    Every flag defaults to None ("not given"), so `resolve_config` can tell a typed value from a default
    and let a preset fill only what the user left out.
    """
    parser.add_argument("--preset", choices=list(PRESETS),
                        help="the book's runs (per-GPU batch), the course's (codeparrot-ds), or tiny: a "
                             "small model that learns in CPU minutes")
    for f in dataclasses.fields(TrainConfig):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        default = f" (default {f.default})" if f.default not in (None, "", ".") else ""
        kwargs: dict[str, Any] = dict(default=None, help=meta["help"] + default, dest=f.name)
        if meta.get("required"):
            kwargs["required"] = True
        if f.type == "bool":  # --compile / --no-compile; --no-progress keeps its old spelling
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {"int": int, "float": float}.get(f.type.replace(" | None", ""), str)
            kwargs["choices"] = meta.get("choices")
        parser.add_argument(flag, **kwargs)


def given_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user typed on the command line (argparse leaves the others None)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "num_train_epochs" in given and "max_train_steps" in given:
        raise UserError("give either --num-train-epochs or --max-train-steps, not both")
    return given


def resolve_config(given: dict[str, Any], preset: str | None = None) -> tuple[TrainConfig, list[str]]:
    """The run's config: typed values, then the preset's, then defaults; and notes to log about it.

    Raises a one-line UserError for an unknown preset or an impossible value.
    """
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = set(given) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"not TrainConfig fields: {sorted(unknown)}")
    values = {**PRESETS.get(preset or "", {}), **given}
    if "max_train_steps" in given and given.get("num_train_epochs") is None:
        values["num_train_epochs"] = None  # typed steps replace a preset's epochs
    # With both (a run's dump), the epochs win: the steps are counted from the data again.
    cfg = TrainConfig(**values)
    notes: list[str] = []
    if cfg.log_dir is None:
        cfg.log_dir = f"{cfg.output_dir}/log"
    if cfg.num_train_epochs is None:
        shorten_warmup(cfg, "num_warmup_steps" in given, notes)
    check_config(cfg)
    return cfg, notes


def shorten_warmup(cfg: TrainConfig, warmup_typed: bool, notes: list[str]) -> None:
    """A run shortened below the preset's warmup, warmup never typed: the warmup shrinks with the run."""
    if cfg.num_warmup_steps > cfg.max_train_steps and not warmup_typed:
        notes.append(f"warmup {cfg.num_warmup_steps} steps (from the preset) is longer than "
                     f"the run's {cfg.max_train_steps} steps: warming up over all "
                     f"{cfg.max_train_steps} steps instead")
        cfg.num_warmup_steps = cfg.max_train_steps


def check_config(cfg: TrainConfig) -> None:
    """One line per impossible value, naming the flag and what it must be."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name in ("train_batch_size", "valid_batch_size", "gradient_accumulation_steps", "max_train_steps",
                 "seq_length", "save_checkpoint_steps", "keep_last", "prefetch"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{flag(name)} must be at least 1, got {getattr(cfg, name)}")
    for name in ("record_shuffle_buffer", "sequence_shuffle_buffer", "max_bad_steps", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise UserError(f"{flag(name)} must be >= 0, got {getattr(cfg, name)}")
    if cfg.data_workers is not None and cfg.data_workers < 0:
        raise UserError(f"--data-workers must be >= 0, got {cfg.data_workers}")
    if not cfg.learning_rate > 0:
        raise UserError(f"--learning-rate must be positive, got {cfg.learning_rate}")
    if not cfg.dist_timeout > 0:
        raise UserError(f"--dist-timeout must be a positive number of minutes, got {cfg.dist_timeout}")
    if not cfg.max_grad_norm > 0:
        raise UserError(f"--max-grad-norm must be positive, got {cfg.max_grad_norm}")
    if cfg.num_train_epochs is not None and cfg.num_train_epochs < 1:
        raise UserError(f"--num-train-epochs must be at least 1, got {cfg.num_train_epochs}")
    if not cfg.keytoken_alpha > 0 or not [w for w in cfg.keytokens.split(",") if w.strip()]:
        raise UserError("--keytoken-alpha must be positive and --keytokens name at least one word")
    if cfg.push_to_hub is not None and cfg.push_to_hub.count("/") != 1:
        raise UserError(f"--push-to-hub takes a repo id owner/name, got {cfg.push_to_hub!r}")
    if cfg.num_train_epochs is None and not 0 <= cfg.num_warmup_steps <= cfg.max_train_steps:
        raise UserError(f"--num-warmup-steps must be in [0, --max-train-steps={cfg.max_train_steps}], "
                        f"got {cfg.num_warmup_steps}")
    if cfg.max_eval_steps == 0 or cfg.max_eval_steps < -1:
        raise UserError(f"--max-eval-steps must be -1 (all data) or >= 1, got {cfg.max_eval_steps}")
    if not cfg.dataset_name_train or not cfg.dataset_name_valid:
        raise UserError("give the data: --dataset-name-train SRC --dataset-name-valid SRC (path or hub repo)")
    if not cfg.tokenizer:
        raise UserError("give --tokenizer DIR (a directory written by `minicodeparrot train-tokenizer`)")


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain JSON values: what train_args.json and every checkpoint record."""
    return dataclasses.asdict(cfg)
