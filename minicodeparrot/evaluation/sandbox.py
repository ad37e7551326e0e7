"""Run untrusted, model-written Python programs: one confined subprocess each, with limits.

Each program runs in a fresh `python -I -B` (isolated: no user site-packages, no PYTHON* env vars,
no .pyc writes) with an empty temp directory as its working directory and a minimal environment.
The child (`sandbox_child.py`) confines itself before the program runs: rlimits, a size-capped tmpfs
over its working directory, Landlock, no capabilities, a seccomp-bpf filter, and an audit hook as a
second layer; its docstring says what each one stops. What the kernel allows differs per machine:
`isolation_in_force()` says what a child gets here (e.g. `landlock abi 7 + seccomp + tmpfs quota`, or
`audit hook only`), and `check_isolation` prints it once and refuses to go on without Landlock and
seccomp when asked to. Even with both, run evaluations of untrusted models in a throw-away container
or VM with no network and no credentials mounted: this is one kernel's attack surface away from the
machine.

The verdict: a program passes only if it runs to the end, as in OpenAI's harness (`sys.exit(0)` or
`os._exit(0)` halfway through fail). The child reports on a pipe of its own, each line prefixed with
a per-run token that reaches it through another pipe, read and closed before the program starts; so
neither the program's output nor anything it can find in argv, the environment, stdin or files can
forge a pass (its own interpreter's memory can: see evaluation/sandbox_child.py). Failure reasons are the
exception's type and a short message, or the last line the program printed.

We set the limits in the child rather than in Popen's `preexec_fn`: the programs are started from a
thread pool, and `preexec_fn` is documented as unsafe (it can deadlock) in a process with threads.
The parent also kills the child's whole process group when the timeout plus a start-up grace has
passed, in case the program swallows the alarm.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

from minicodeparrot.errors import UserError
from minicodeparrot.evaluation import sandbox_child

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"

# Interpreter start-up is not the program's time: the parent's hard kill comes this much later than
# the child's own alarm (start-up is ~60 ms, but the machine may be busy with other work).
_STARTUP_GRACE = 2.0
_OUTPUT_TAIL = 4096  # bytes of the child's output read back for the error reason
_RESULT_LIMIT = 1 << 16  # bytes read from the result pipe (a program can write junk to it, never a verdict)
# The child loads sandbox_child.py as a module, not as a script: a script is compiled at every start
# (~5 ms for this one), a module comes from the .pyc that importing it above left in __pycache__ (-B
# only stops writing them). By file location, so the package directory never goes on the child's path.
_CHILD = ["-c", "import importlib.util as u, sys; s = u.spec_from_file_location('sandbox_child', "
          "sys.argv.pop(1)); m = u.module_from_spec(s); s.loader.exec_module(m); m.main()",
          sandbox_child.__file__]


@dataclass(frozen=True)
class ExecResult:
    status: str  # PASSED, FAILED or TIMED_OUT
    reason: str  # empty when passed; else the exception, signal or limit, in one short line
    seconds: float  # wall-clock time of the subprocess, start-up included
    isolation: str = ""  # what confined it, as the child reported before the program ran

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def run_program(
    program: str,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    max_file_mb: int = 16,
    require_isolation: bool = False,
) -> ExecResult:
    """Run one untrusted program in its own confined subprocess; see the module docstring.

    With `require_isolation`, a child that cannot apply Landlock and seccomp does not run the program
    and the result is a failure saying so.
    """
    token = secrets.token_hex(16)
    env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    token_read, token_write = os.pipe()
    with os.fdopen(token_write, "w") as f:
        f.write(token)  # 32 bytes: never blocks on a pipe
    result_read, result_write = os.pipe()
    cmd = [sys.executable, "-I", "-B", *_CHILD, str(token_read), str(result_write), repr(float(timeout)),
           str(memory_mb), str(max_file_mb), "1" if require_isolation else "0"]
    try:
        with tempfile.TemporaryDirectory(prefix="minicodeparrot-sandbox-", ignore_cleanup_errors=True) as tmp:
            work = os.path.join(tmp, "work")  # the program's cwd; its output file lives outside it
            os.mkdir(work)
            env["HOME"] = env["TMPDIR"] = work
            out_path = os.path.join(tmp, "output")
            start = time.perf_counter()
            with open(out_path, "wb") as out:
                try:
                    proc = subprocess.Popen(
                        cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=work, env=env,
                        pass_fds=(token_read, result_write),
                        start_new_session=True,  # its own process group, so we can kill all it started
                    )
                finally:
                    os.close(token_read)
                    os.close(result_write)  # so the pipe ends (EOF) when the child does
                killed = False
                try:
                    stdin = program.encode("utf-8", "surrogatepass")
                    proc.communicate(stdin, timeout=timeout + _STARTUP_GRACE)
                except subprocess.TimeoutExpired:
                    killed = True
                finally:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    proc.wait()
            seconds = time.perf_counter() - start
            report = _read_available(result_read)
            with open(out_path, "rb") as f:
                f.seek(max(0, os.path.getsize(out_path) - _OUTPUT_TAIL))
                tail = f.read().decode("utf-8", "replace")
    finally:
        os.close(result_read)
    return _classify(report, tail, token, proc.returncode, seconds, killed, timeout)


def _read_available(fd: int) -> str:
    # Non-blocking: without kernel isolation a program could leave a grandchild holding the pipe open.
    os.set_blocking(fd, False)
    chunks, size = [], 0
    while size < _RESULT_LIMIT:
        try:
            chunk = os.read(fd, _RESULT_LIMIT - size)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _classify(
    report: str, tail: str, token: str, returncode: int, seconds: float, killed: bool, timeout: float
) -> ExecResult:
    isolation, verdict = "", None
    for line in report.splitlines():  # only lines with the token count: the program cannot know it
        if not line.startswith(token + " "):
            continue
        rest = line[len(token) + 1:]
        if rest.startswith("isolation "):
            isolation = isolation or rest[len("isolation "):]
        elif verdict is None and rest.partition("|")[0] in (PASSED, FAILED, TIMED_OUT):
            verdict = rest.partition("|")
    if killed:
        reason = f"killed after {timeout + _STARTUP_GRACE:g} s wall clock"
        return ExecResult(TIMED_OUT, reason, seconds, isolation)
    if verdict is not None:
        return ExecResult(verdict[0], verdict[2], seconds, isolation)
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return ExecResult(TIMED_OUT, "CPU time limit exceeded", seconds, isolation)
    if returncode < 0:
        return ExecResult(FAILED, f"killed by {signal.Signals(-returncode).name}", seconds, isolation)
    last = tail.strip().splitlines()[-1][:200] if tail.strip() else ""  # what the program printed last
    reason = f"exited with status {returncode} before finishing" + (f" ({last})" if last else "")
    return ExecResult(FAILED, reason, seconds, isolation)


@functools.cache
def isolation_in_force() -> str:
    """What confines a child on this machine, e.g. `landlock abi 7 + seccomp + tmpfs quota`.

    Found by running an empty program once (per process) through the real path, so it reports what a
    child actually got, not what the kernel advertises.
    """
    probe = run_program("", timeout=10.0)
    if not probe.passed or not probe.isolation:
        raise RuntimeError(f"the sandbox cannot run even an empty program: {probe.reason}")
    return probe.isolation


def has_kernel_isolation(isolation: str) -> bool:
    return "landlock" in isolation and "seccomp" in isolation


_announced: set[str] = set()


def check_isolation(require: bool = False) -> str:
    """Print the isolation in force (once per process); without Landlock and seccomp, warn loudly, or
    refuse if required. Callers may check early (before generating) and again before running."""
    isolation = isolation_in_force()
    if has_kernel_isolation(isolation):
        if isolation not in _announced:
            print(f"sandbox: {isolation}")
    elif require:
        raise UserError(
            f"kernel isolation is required but the sandbox gets only '{isolation}' here (Landlock and "
            "seccomp need Linux >= 5.13 with Landlock enabled); run where both are available, or without "
            "--require-isolation inside a throw-away VM or container"
        )
    elif isolation not in _announced:
        bar = "!" * 100
        print(f"{bar}\nWARNING: the sandbox gets only '{isolation}' on this machine: model-written code "
              "can reach your files, processes and network.\nRun this inside a throw-away VM or container "
              f"(or use --require-isolation to refuse).\n{bar}", file=sys.stderr)
    _announced.add(isolation)
    return isolation


def run_programs(
    programs: list[str],
    timeout: float = 3.0,
    num_workers: int | None = None,
    memory_mb: int = 1024,
    show_progress: bool = True,
    require_isolation: bool = False,
) -> list[ExecResult]:
    """Run many programs, `num_workers` subprocesses at a time; results in input order.

    Threads are enough to drive the pool: each one only waits on its subprocess.
    """
    num_workers = num_workers or os.cpu_count() or 1

    def run(program: str) -> ExecResult:
        return run_program(program, timeout=timeout, memory_mb=memory_mb, require_isolation=require_isolation)

    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        bar = tqdm(pool.map(run, programs), total=len(programs), desc="executing", unit="prog",
                   disable=not show_progress)
        return list(bar)
