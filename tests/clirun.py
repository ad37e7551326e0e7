"""Helpers shared by the evaluation tests: a tiny saved model, and the CLI run under torchrun or alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from minicodeparrot import cli


def save_tiny_model(out: Path, gpt2_dir: Path) -> Path:
    """A random 1-layer GPT with the GPT-2 tokenizer, saved the way training saves models."""
    from minicodeparrot.model.gpt import GPT, GPTConfig
    from minicodeparrot.tokenizer.bpe import Tokenizer

    torch.manual_seed(0)
    config = GPTConfig(n_positions=256, n_embd=32, n_layer=1, n_head=2, embd_pdrop=0.0, attn_pdrop=0.0,
                       resid_pdrop=0.0)
    GPT(config).save_pretrained(out)
    Tokenizer.from_pretrained(gpt2_dir).save_pretrained(out)
    return out


def torchrun_cli(*argv: str, cwd) -> str:
    """`python -m torch.distributed.run --nproc_per_node=2 -m minicodeparrot ...`; returns stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # what torchrun sets anyway; the 1-process runs use 1 thread too
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "minicodeparrot", *argv]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def one_thread_cli(argv: list[str]) -> None:
    """cli.main in this process with 1 intra-op thread, as each torchrun rank has: same float sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli.main(argv)
    finally:
        torch.set_num_threads(threads)
