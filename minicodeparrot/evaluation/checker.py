"""Score HumanEval completions so that no program can forge a pass: the tests run here, not in the sandbox.

OpenAI's harness runs `prompt + completion + test + check(entry_point)` as one program and counts a
pass when it ends without an exception. Judged inside the program's own interpreter, that verdict is
the program's to fake: it can walk the frames for whatever token the harness reports with, patch
`os.write`, return an object whose `__eq__` always says yes, or exit 0 halfway. Here the program
(`prompt + completion`) runs in the sandbox and only *defines* things; the problem's `check` runs in
this process, with a `candidate` that forwards each call to the sandboxed function. Arguments and
results cross as plain data (`sandbox_child.to_wire`: numbers, strings, lists, tuples, dicts, sets,
bytes, None), so what `check` compares is data the program computed, never an object it made; the
assertions, and the verdict, are ours. A program that rewrites its own interpreter can only answer
wrongly.

`check` and the prompt's helpers (e.g. `encode_cyclic`, which HumanEval/38's test calls) run here
from the problems file, which we trust as the official harness does. What plain data cannot carry: a
function returning an object of its own class, a generator or a numpy array fails here where the
official harness could pass it if `==` happened to work; no HumanEval problem expects one (all 164
canonical solutions pass), and none passes the candidate anything but plain data or reads back an
argument it mutated. The time limit covers the whole check, both sides, as in the official harness.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from minicodeparrot.evaluation.sandbox import (
    FAILED,
    PASSED,
    TIMED_OUT,
    CandidateError,
    ChildGone,
    ChildTimeout,
    ExecResult,
    Sandbox,
)


@functools.lru_cache(maxsize=1024)
def _compiled(prompt: str, test: str, task_id: str):
    # Compiled once per problem; executed afresh per sample, so no sample sees another's state.
    return compile(prompt, f"<{task_id} prompt>", "exec"), compile(test, f"<{task_id} test>", "exec")


def _run_check(box: Sandbox, problem: dict) -> tuple[str, str] | None:
    """Run the problem's `check` here against the sandboxed function: (status, reason), or None when
    the child died (the caller then asks the child's exit status why)."""
    prompt_code, test_code = _compiled(problem["prompt"], problem["test"], problem["task_id"])
    namespace: dict = {"__name__": "__check__"}
    entry_point = problem["entry_point"]

    def candidate(*args):
        return box.call(entry_point, *args)

    exec(prompt_code, namespace)  # the problem's helpers, and a stub of the function...
    namespace[entry_point] = candidate  # ...which tests may call by name (HumanEval/33 does)
    exec(test_code, namespace)
    try:
        namespace["check"](candidate)
    except ChildTimeout as e:
        return TIMED_OUT, str(e)
    except ChildGone as e:
        box.outcome, box.reason = "gone", str(e)
        return None
    except CandidateError as e:
        return FAILED, f"{e} (raised by {entry_point})"
    except Exception as e:  # the test's own assertion, or what it did with a wrong answer
        message = " ".join(str(e).split())[:200]
        return FAILED, type(e).__name__ + (f": {message}" if message else "")
    return PASSED, ""


def check_completion(problem: dict, completion: str, timeout: float = 3.0, memory_mb: int = 1024,
                     require_isolation: bool = False) -> ExecResult:
    """Run one completion's function in the sandbox and the problem's tests here; see the docstring."""
    with Sandbox(problem["prompt"] + completion, timeout, memory_mb,
                 require_isolation=require_isolation) as box:
        verdict = _run_check(box, problem) if box.outcome == "defined" else None
    if verdict is not None:
        return box.ended(*verdict)
    return box.result()  # it never defined the function, or it died or broke the protocol meanwhile


def check_completions(
    tasks: list[tuple[dict, str]],
    timeout: float = 3.0,
    num_workers: int | None = None,
    memory_mb: int = 1024,
    show_progress: bool = True,
    require_isolation: bool = False,
) -> list[ExecResult]:
    """`check_completion` for many (problem, completion) pairs, `num_workers` at a time, in input order.

    Threads are enough to drive the pool: each one waits on its subprocess, and the tests it runs
    here are small.
    """
    num_workers = num_workers or os.cpu_count() or 1

    def run(task: tuple[dict, str]) -> ExecResult:
        return check_completion(*task, timeout=timeout, memory_mb=memory_mb,
                                require_isolation=require_isolation)

    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        bar = tqdm(pool.map(run, tasks), total=len(tasks), desc="executing", unit="prog",
                   disable=not show_progress)
        return list(bar)
