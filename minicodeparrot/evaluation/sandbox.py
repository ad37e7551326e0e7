"""Run untrusted, model-written Python programs: one confined subprocess each, with limits.

Each program runs in a fresh `python -I -B` (isolated: no user site-packages, no PYTHON* env vars,
no .pyc writes) with an empty temp directory as its working directory and a minimal environment.
The child (`sandbox_child.py`) confines itself before the program runs: rlimits, a task cap, namespaces
of its own (IPC among them), a size-capped tmpfs over its working directory, Landlock, no capabilities,
a seccomp-bpf filter, and an audit hook as a second layer; its docstring says what each one stops. What
the kernel allows differs per machine: `isolation_in_force()` says what a child gets here, and
`check_isolation` prints it once and refuses to go on without every layer of `REQUIRED` when asked to.
Even with all of them, run evaluations of untrusted models in a throw-away container or VM with no
network and no credentials mounted: this is one kernel's attack surface away from the machine.

A `Sandbox` runs the program's top level, then calls the functions it defined through a unix socket,
with arguments and results as plain data (`sandbox_child.to_wire`): whoever judges the results (the
HumanEval tests, in `checker.py`) runs here, in the parent, where the program cannot reach. The
program's own account of how its top level went (`run_program`) is only that: a hostile program can
make it say anything, so nothing is scored on it.

We set the limits in the child rather than in Popen's `preexec_fn`: the programs are started from a
thread pool, and `preexec_fn` is documented as unsafe (it can deadlock) in a process with threads.
The parent also kills the child's whole process group when the timeout plus a start-up grace has
passed, in case the program swallows the alarm.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
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
REQUIRED = sandbox_child.REQUIRED

# Interpreter start-up is not the program's time: the parent's hard kill comes this much later than
# the child's own alarm (start-up is ~60 ms, but the machine may be busy with other work).
_STARTUP_GRACE = 2.0
_OUTPUT_TAIL = 4096  # bytes of the child's output read back for the error reason
# The child loads sandbox_child.py as a module, not as a script: a script is compiled at every start
# (~5 ms for this one), a module comes from the .pyc that importing it above left in __pycache__ (-B
# only stops writing them). By file location, so the package directory never goes on the child's path.
_CHILD = ["-c", "import importlib.util as u, sys; s = u.spec_from_file_location('sandbox_child', "
          "sys.argv.pop(1)); m = u.module_from_spec(s); s.loader.exec_module(m); m.main()",
          sandbox_child.__file__]
_PIDS_V1 = "/sys/fs/cgroup/pids"  # cgroup v1's pids hierarchy; v2 would need delegation set up first


@dataclass(frozen=True)
class ExecResult:
    status: str  # PASSED, FAILED or TIMED_OUT
    reason: str  # empty when passed; else the exception, signal or limit, in one short line
    seconds: float  # wall-clock time of the subprocess, start-up included
    isolation: str = ""  # what confined it, as the child reported before the program ran

    @property
    def passed(self) -> bool:
        return self.status == PASSED


class CandidateError(Exception):
    """The program's function raised (its type and message, as plain text)."""


class ChildTimeout(Exception):
    """The program ran out of time (its own alarm, or the parent's hard deadline)."""


class ChildGone(Exception):
    """The child died, or said something that is not a message of the protocol."""


def _make_task_cgroup(name: str) -> str:
    """A `pids` cgroup with pids.max = TASK_CAP for one root child (root ignores RLIMIT_NPROC), or ""
    where we cannot make one (not root, no v1 pids hierarchy): the child then uses RLIMIT_NPROC."""
    if os.geteuid() != 0 or not os.access(_PIDS_V1, os.W_OK):
        return ""
    path = os.path.join(_PIDS_V1, name)
    try:
        os.mkdir(path)
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(sandbox_child.TASK_CAP))
    except OSError:
        _remove_task_cgroup(path)
        return ""
    return path


def _remove_task_cgroup(path: str) -> None:
    # Empty once the child is reaped; rmdir is how a cgroup is removed (its files cannot be unlinked).
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY: the last task is still being released
            time.sleep(0.001)


class Sandbox:
    """One confined child running one program; `call` runs a function the program defined.

    Use as a context manager: leaving it kills the child's process group, removes its temp dir and
    cgroup, and `result` says how the program ended. `outcome` is the child's account of the top level
    (`defined`, `failed`, `timed out`, `refused`) with `reason`.
    """

    def __init__(self, program: str, timeout: float = 3.0, memory_mb: int = 1024, max_file_mb: int = 16,
                 require_isolation: bool = False) -> None:
        self.timeout, self.isolation, self.killed = timeout, "", False
        self._tmp = tempfile.TemporaryDirectory(prefix="minicodeparrot-sandbox-", ignore_cleanup_errors=True)
        self._cgroup = _make_task_cgroup(os.path.basename(self._tmp.name))
        work = os.path.join(self._tmp.name, "work")  # the program's cwd; its output file lives outside it
        os.mkdir(work)
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": work, "TMPDIR": work}
        self._out_path = os.path.join(self._tmp.name, "output")
        self._channel, theirs = socket.socketpair()
        cmd = [sys.executable, "-I", "-B", *_CHILD, str(theirs.fileno()), repr(float(timeout)),
               str(memory_mb), str(max_file_mb), "1" if require_isolation else "0", self._cgroup or "-"]
        self.start = time.perf_counter()
        self.deadline = self.start + timeout + _STARTUP_GRACE
        try:
            with theirs, open(self._out_path, "wb") as out:
                self._proc = subprocess.Popen(
                    cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=work, env=env,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,  # its own process group, so we can kill all it started
                )
        except BaseException:
            self._channel.close()
            if self._cgroup:
                _remove_task_cgroup(self._cgroup)
            self._tmp.cleanup()
            raise
        try:
            self._start(program)
        except BaseException:  # no child, cgroup or temp dir outlives an interrupted start
            self.__exit__()
            raise

    def _start(self, program: str) -> None:
        """Hand the program over; read what confines the child, then how the program's top level went."""
        try:
            self._proc.stdin.write(program.encode("utf-8", "surrogatepass"))
            self._proc.stdin.close()
            first = self._receive()
            if len(first) == 2 and first[0] == "isolation" and type(first[1]) is str:
                self.isolation = first[1]
            self.outcome, self.reason = self._outcome(self._receive())
        except (OSError, ChildGone, ChildTimeout) as e:  # BrokenPipeError: it died before reading
            self.outcome, self.reason = ("timed out" if isinstance(e, ChildTimeout) else "gone"), str(e)

    def _receive(self) -> list:
        """One message from the child, within the run's deadline."""
        import json

        def exactly(n: int) -> bytes:
            data = bytearray()
            while len(data) < n:
                remaining = self.deadline - time.perf_counter()
                if remaining <= 0:
                    self.killed = True
                    raise ChildTimeout(f"killed after {self.timeout + _STARTUP_GRACE:g} s wall clock")
                self._channel.settimeout(remaining)
                try:
                    chunk = self._channel.recv(n - len(data))
                except TimeoutError:
                    continue
                if not chunk:
                    raise ChildGone("the program ended before answering")
                data += chunk
            return bytes(data)

        size = int.from_bytes(exactly(4), "big")
        if size > sandbox_child._MESSAGE_LIMIT:
            raise ChildGone("the program wrote something else than a message on the channel")
        try:
            message = json.loads(exactly(size))
        except (ValueError, RecursionError) as e:
            raise ChildGone("the program wrote something else than a message on the channel") from e
        if type(message) is not list or not message or type(message[0]) is not str:
            raise ChildGone("the program wrote something else than a message on the channel")
        return message

    @staticmethod
    def _outcome(message: list) -> tuple[str, str]:
        if message == ["defined"]:
            return "defined", ""
        if message[0] in ("failed", "timed out", "refused") and len(message) == 2 and type(message[1]) is str:
            return message[0], message[1][:300]
        raise ChildGone("the program wrote something else than a message on the channel")

    def call(self, name: str, *args):
        """Call the program's function `name` with plain-data `args`; its result, as plain data.

        Raises CandidateError (it raised), ChildTimeout, or ChildGone (it died or broke the protocol).
        """
        import json

        if self.outcome != "defined":
            raise ChildGone(self.reason or self.outcome)
        data = json.dumps(["call", name, [sandbox_child.to_wire(a) for a in args]]).encode()
        self._channel.settimeout(max(0.001, self.deadline - time.perf_counter()))
        try:
            self._channel.sendall(len(data).to_bytes(4, "big") + data)
        except TimeoutError as e:  # it stopped reading until the deadline
            self.killed = True
            raise ChildTimeout(f"killed after {self.timeout + _STARTUP_GRACE:g} s wall clock") from e
        except OSError as e:  # it closed its end
            raise ChildGone("the program ended before answering") from e
        reply = self._receive()
        if reply[0] == "ok" and len(reply) == 2:
            try:
                return sandbox_child.from_wire(reply[1])
            except (ValueError, TypeError, RecursionError) as e:
                raise ChildGone("the program wrote something else than a message on the channel") from e
        if reply[0] == "raise" and len(reply) == 3 and type(reply[2]) is str:
            raise CandidateError(reply[2][:300])
        if reply[0] == "timed out" and len(reply) == 2 and type(reply[1]) is str:
            raise ChildTimeout(reply[1][:300])
        raise ChildGone("the program wrote something else than a message on the channel")

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        """Kill what is left of the child's process group, then remove its cgroup and temp dir."""
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._proc.wait()
        self.seconds = time.perf_counter() - self.start
        self._channel.close()
        if self._cgroup:
            _remove_task_cgroup(self._cgroup)
        with open(self._out_path, "rb") as f:
            f.seek(max(0, os.path.getsize(self._out_path) - _OUTPUT_TAIL))
            self.tail = f.read().decode("utf-8", "replace")
        self._tmp.cleanup()

    def ended(self, status: str, reason: str) -> ExecResult:
        """The result of a run that ended on the parent's side (after __exit__)."""
        return ExecResult(status, reason, self.seconds, self.isolation)

    def result(self) -> ExecResult:
        """How the program ended, from the child's own account (after __exit__)."""
        if self.outcome == "defined":
            return self.ended(PASSED, "")
        if self.outcome == "timed out" and not self.killed:
            return self.ended(TIMED_OUT, self.reason)
        if self.outcome in ("failed", "refused") or self.reason.startswith("the program wrote"):
            return self.ended(FAILED, self.reason)
        return self.died()

    def died(self) -> ExecResult:
        """The result of a child that did not answer: killed, out of CPU time, or exited on its own."""
        returncode = self._proc.returncode
        if self.killed:
            return self.ended(TIMED_OUT, f"killed after {self.timeout + _STARTUP_GRACE:g} s wall clock")
        if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return self.ended(TIMED_OUT, "CPU time limit exceeded")
        if returncode < 0:
            return self.ended(FAILED, f"killed by {signal.Signals(-returncode).name}")
        last = self.tail.strip().splitlines()[-1][:200] if self.tail.strip() else ""  # what it printed last
        reason = f"exited with status {returncode} before finishing" + (f" ({last})" if last else "")
        return self.ended(FAILED, reason)


def run_program(
    program: str,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    max_file_mb: int = 16,
    require_isolation: bool = False,
) -> ExecResult:
    """Run one untrusted program in its own confined subprocess: passed if it ran to its end.

    That verdict is the child's account, which a hostile program can forge: it is for trying the
    sandbox, never for scoring (see `checker.py`). With `require_isolation`, a child without every
    layer of REQUIRED does not run the program and the result is a failure saying so.
    """
    with Sandbox(program, timeout, memory_mb, max_file_mb, require_isolation) as box:
        pass
    return box.result()


@functools.cache
def isolation_in_force() -> str:
    """What confines a child on this machine, e.g. `landlock abi 7 + seccomp + tmpfs quota + ...`.

    Found by running an empty program once (per process) through the real path, so it reports what a
    child actually got, not what the kernel advertises.
    """
    probe = run_program("", timeout=10.0)
    if not probe.passed or not probe.isolation:
        raise RuntimeError(f"the sandbox cannot run even an empty program: {probe.reason}")
    return probe.isolation


def missing_layers(isolation: str) -> list[str]:
    """The layers of REQUIRED that `isolation` lacks: each one leaves a class of attack open."""
    return [layer for layer in REQUIRED if layer not in isolation]


_announced: set[str] = set()


def check_isolation(require: bool = False) -> str:
    """Print the isolation in force (once per process); without every layer of REQUIRED, warn loudly,
    or refuse if required. Callers may check early (before generating) and again before running."""
    isolation = isolation_in_force()
    missing = missing_layers(isolation)
    if not missing:
        if isolation not in _announced:
            print(f"sandbox: {isolation}")
    elif require:
        raise UserError(
            f"kernel isolation is required but the sandbox gets only '{isolation}' here (no "
            f"{', '.join(missing)}: Landlock and seccomp need Linux >= 5.13 with Landlock enabled, the IPC "
            "namespace and task cap need root or user namespaces); run where all are available, or "
            "without --require-isolation inside a throw-away VM or container"
        )
    elif isolation not in _announced:
        bar = "!" * 100
        print(f"{bar}\nWARNING: the sandbox gets only '{isolation}' on this machine (no "
              f"{', '.join(missing)}): model-written code can reach your files, processes, IPC or network.\n"
              "Run this inside a "
              f"throw-away VM or container (or use --require-isolation to refuse).\n{bar}", file=sys.stderr)
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
