"""The quickstart: the whole CodeParrot pipeline in a few minutes, offline, on any machine.

    minicodeparrot demo [--minutes 3] [--output-dir minicodeparrot-demo]

1. corpus: this interpreter's standard library as codeparrot-format shards (train + validation);
2. tokenizer: byte-level BPE trained on the training shards, 2048 tokens (see below);
3. model: the `tiny` preset trained for the time budget (CPU, or the GPU if there is one);
4. report: validation loss and perplexity against the unigram baseline, then the book's prompts completed.

Why 2048 tokens: a few CPU minutes train the tiny model on about 1M tokens. With 8000 tokens the embedding
table was half of its 1.9M parameters and the 8000-way output layer half of each step's work, and most
tokens occurred too rarely in that budget to be learned: after ~500 steps (3 minutes on a busy 2-core
machine) its completions at the book's temperature 0.4 fell into runs of newlines or of one frequent word.
With 2048 tokens a step is ~1.6x cheaper, so the same minutes buy more steps, and a token is seen ~4x as
often. At about equal time (700 against 460 steps) the loss per character came out the same (1.35 nats),
but the completions were Python-shaped code instead of blank lines and repeated words.

The unigram baseline is the entropy of the validation split's token frequencies: the loss of the best model
that ignores context (and one that has peeked at the validation counts). A model that learned anything about
Python must go well below it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

# The book's prompts, and one the standard library knows. No trailing newline: the tokenizer merges "\n" with
# the next line's indentation ("\n    " is one token), so a prompt cut after "\n" is one the model never saw.
PROMPTS = [
    'def area_of_rectangle(a: float, b: float):\n    """Return the area of the rectangle."""',
    'def get_urls_from_html(html):\n    """Get all embedded URLs in a HTML string."""',
    "import os\n\n\ndef list_python_files(directory):",
]


# `minicodeparrot generate --examples`: prompts in the spirit of the book's demo -- a docstring to implement,
# HTML scraping, the numpy version of a plain-Python function, and a scikit-learn snippet.
EXAMPLES = {
    "area_of_rectangle": (
        "def area_of_rectangle(width: float, height: float) -> float:\n"
        '    """Return the area of a rectangle with the given width and height."""\n'
    ),
    "get_urls_from_html": (
        "import re\n\n"
        "def get_urls_from_html(html: str) -> list:\n"
        '    """Return every URL found in an href="..." attribute of the HTML text."""\n'
    ),
    "numpy_mean": (
        "# average of a list, plain python\n"
        "def mean(values):\n"
        "    return sum(values) / len(values)\n\n"
        "# average of a list, with numpy\n"
        "import numpy as np\n\n"
        "def mean(values):\n"
    ),
    "sklearn_random_forest": (
        "import numpy as np\n"
        "from sklearn.ensemble import RandomForestClassifier\n\n"
        "X = np.random.rand(200, 8)\n"
        "y = np.random.randint(0, 2, size=200)\n\n"
        "# fit a random forest with 20 trees on X and y\n"
    ),
}


def unigram_entropy(token_lists: list[list[int]]) -> float:
    """Entropy in nats of the token frequency distribution: the loss of the best context-free predictor."""
    counts = Counter(t for ids in token_lists for t in ids)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def _seconds_per_step(model, opt, batch, device) -> float:
    """The median time of a training step of `model` on `batch` (first step excluded: it warms up)."""
    import torch

    from minicodeparrot.training.train import accumulate_gradients

    off = torch.autocast(device.type, enabled=False)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        accumulate_gradients(model, [batch], off, scaler)
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times) // 2]  # the median: other jobs may share the machine


def _steps_for_budget(seconds: float, vocab_size: int, batch_size: int, seq_length: int,
                      device) -> tuple[int, int | None]:
    """How many optimizer steps fit in `seconds`, and the CPU threads to train on (None: torch's default).

    Timed on the tiny model and random tokens. On a CPU that other jobs share, torch's threads wait for
    each other at every one of the tiny model's many small operations: one thread then runs several times
    faster than two (0.2 against 1.4 s a step, measured at load 6 on 2 cores). So both are timed.
    """
    import torch

    from minicodeparrot.training.train import build_model, make_optimizer

    model = build_model("tiny", vocab_size, seq_length).to(device)
    opt = make_optimizer(model, 1e-3, 0.1)
    batch = torch.randint(0, vocab_size, (batch_size, seq_length), device=device)
    per_step, threads = _seconds_per_step(model, opt, batch, device), None
    default = torch.get_num_threads()
    if device.type == "cpu" and default > 1:
        torch.set_num_threads(1)
        try:
            one_thread = _seconds_per_step(model, opt, batch, device)
        finally:
            torch.set_num_threads(default)
        if one_thread < per_step:
            per_step, threads = one_thread, 1
    # Keep ~25% of the budget for data tokenization, evaluation and checkpointing.
    return max(20, int(0.75 * seconds / per_step)), threads


def _final_metrics(metrics_file: Path) -> dict:
    """The last step and the last evaluation that `minicodeparrot train` wrote to metrics.jsonl."""
    result: dict = {}
    for line in metrics_file.read_text().splitlines():
        entry = json.loads(line)
        result["step"] = entry["step"]
        if "eval_loss" in entry:
            result.update(eval_loss=entry["eval_loss"], perplexity=entry["perplexity"])
    return result


def _corpus_and_tokenizer(out: Path, vocab_size: int, show_progress: bool):
    """Steps 1 and 2: the standard library as shards, and a BPE trained on them (both kept for a rerun)."""
    from minicodeparrot.sources.corpus import make_corpus
    from minicodeparrot.sources.shards import iter_texts
    from minicodeparrot.tokenizer.bpe import Tokenizer
    from minicodeparrot.tokenizer.trainer import BYTE_LEVEL_ALPHABET, train_bpe

    corpus, tok_dir = out / "corpus", out / "tokenizer"
    print(f"[1/4] corpus: the standard library -> {corpus}", file=sys.stderr)
    if not any(corpus.glob("train/*.json.gz")):
        make_corpus(corpus, show_progress=show_progress)
    print(f"[2/4] tokenizer: byte-level BPE, vocab {vocab_size} -> {tok_dir}", file=sys.stderr)
    if (tok_dir / "tokenizer.json").is_file() and len(Tokenizer.from_pretrained(tok_dir)) == vocab_size:
        return corpus, tok_dir, Tokenizer.from_pretrained(tok_dir)
    tokenizer = train_bpe(iter_texts(corpus / "train"), vocab_size, initial_alphabet=BYTE_LEVEL_ALPHABET,
                          show_progress=show_progress)
    tokenizer.save_pretrained(tok_dir)
    return corpus, tok_dir, tokenizer


def _validation_split(corpus: Path, tokenizer) -> dict:
    """Size of the validation split and its unigram baseline, tokenized as training packs it."""
    from minicodeparrot.sources.shards import iter_texts

    texts = list(iter_texts(corpus / "valid"))
    encoded = tokenizer.encode_batch(texts, parse_special=False)
    ids = [e + [tokenizer.eos_token_id] for e in encoded]  # packing puts EOS after each file
    return {"files": len(texts), "chars": sum(map(len, texts)), "tokens": sum(map(len, ids)),
            "baseline": unigram_entropy(ids)}


def _train(corpus: Path, tok_dir: Path, model_dir: Path, steps: int, threads: int | None,
           show_progress: bool) -> dict:
    """Step 3: the very `minicodeparrot train` command a user would type, in a child process."""
    from minicodeparrot.errors import UserError

    if model_dir.exists():
        shutil.rmtree(model_dir)  # a fresh run each time; `minicodeparrot train --resume...` continues one
    argv = [sys.executable, "-m", "minicodeparrot", "train", "--preset", "tiny", "--tokenizer", str(tok_dir),
            "--dataset-name-train", str(corpus / "train"), "--dataset-name-valid", str(corpus / "valid"),
            "--output-dir", str(model_dir),
            "--max-train-steps", str(steps), "--num-warmup-steps", str(min(30, steps // 10)),
            "--save-checkpoint-steps", str(steps), "--keep-last", "1", "--max-eval-steps", "20"]
    if not show_progress:
        argv.append("--no-progress")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None  # torch reads it at start
    t_train = time.perf_counter()
    if subprocess.run(argv, env=env).returncode != 0:
        raise UserError("the training step failed (its error is above)")
    return {**_final_metrics(model_dir / "metrics.jsonl"), "train_seconds": time.perf_counter() - t_train}


def _print_summary(valid: dict, result: dict, completions: dict[str, str]) -> None:
    baseline, loss = valid["baseline"], result["eval_loss"]
    print()
    print(f"validation split: {valid['files']} files, {valid['chars']:,} characters, "
          f"{valid['tokens']:,} tokens")
    print(f"unigram baseline: {baseline:.3f} nats/token (perplexity {math.exp(baseline):.1f})")
    print(f"tiny model after {result['step']} steps ({result['train_seconds'] / 60:.1f} min training): "
          f"validation loss {loss:.3f} (perplexity {result['perplexity']:.1f}), {baseline - loss:.2f} nats "
          "below the baseline")
    for prompt, completion in completions.items():
        print("\n" + "-" * 60 + "\n" + prompt + completion)
    print("-" * 60)


def run_demo(output_dir: str | Path = "minicodeparrot-demo", minutes: float = 3.0, vocab_size: int = 2048,
             show_progress: bool = True) -> dict:
    """Corpus, tokenizer, `minutes` of training and the book's prompts completed; returns the numbers."""
    import torch

    from minicodeparrot.errors import UserError
    from minicodeparrot.model.generate import complete_code
    from minicodeparrot.model.gpt import GPT
    from minicodeparrot.training.config import PRESETS

    if minutes <= 0 or vocab_size < 300:
        raise UserError("--minutes must be > 0 and --vocab-size at least 300")
    t_start = time.perf_counter()
    out = Path(output_dir)
    model_dir = out / "model"
    corpus, tok_dir, tokenizer = _corpus_and_tokenizer(out, vocab_size, show_progress)
    valid = _validation_split(corpus, tokenizer)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = PRESETS["tiny"]
    steps, threads = _steps_for_budget(minutes * 60, len(tokenizer), tiny["train_batch_size"],
                                       tiny["seq_length"], device)
    where = str(device)
    if threads:
        where += f", 1 thread (faster than {torch.get_num_threads()} on this busy machine)"
    print(f"[3/4] model: tiny preset on {where}, {steps} steps (~{minutes:g} min) -> {model_dir}",
          file=sys.stderr)
    result = _train(corpus, tok_dir, model_dir, steps, threads, show_progress)

    print("[4/4] completions (sampled as in the book: temperature 0.4, top-p 0.95, seed 42)", file=sys.stderr)
    model = GPT.from_pretrained(model_dir).to(device).eval()
    completions = {p: complete_code(model, tokenizer, p, max_new_tokens=48)[0] for p in PROMPTS}
    _print_summary(valid, result, completions)
    print(f"\ntotal {(time.perf_counter() - t_start) / 60:.1f} min; model in {model_dir} "
          f"(try: minicodeparrot generate --model {model_dir} --prompt 'def add(a, b):')")
    return {"unigram_baseline": valid["baseline"], "eval_loss": result["eval_loss"],
            "perplexity": result["perplexity"], "steps": result["step"],
            "train_seconds": result["train_seconds"], "completions": completions}
