"""Run untrusted, model-written Python programs: one subprocess each, with limits.

This is a BEST-EFFORT sandbox, NOT A SECURITY BOUNDARY. It stops the accidents a language model
produces (infinite loops, runaway memory, `os.system("rm -rf ...")`, stray files, network calls),
the way OpenAI's `reliability_guard` does for HumanEval. Code written to escape it can: Python
code can reach into the interpreter's own state. Run evaluations of untrusted models inside a
throw-away container or VM with no network and no credentials mounted.

Each program runs in a fresh `python -I -B` (isolated: no user site-packages, no PYTHON* env vars,
no .pyc writes) with a temp directory as its working directory and a minimal environment. Before
the program runs, a prelude in the child

- sets resource limits: CPU seconds, address space (memory), file size, open files, processes
  (RLIMIT_NPROC does not bind root; the audit hook below is what stops forks there), no core dumps;
  hard limits equal soft ones so the program cannot raise them back;
- installs a `sys.addaudithook` hook (hooks cannot be removed from Python code) that refuses:
  creating processes (fork, exec, spawn, system, subprocess), signalling other processes,
  creating sockets or resolving names (so: network-free), loading native code (ctypes), changing
  the limits, and any write/create/delete/rename/chmod of a path outside the temp directory;
- arms a wall-clock alarm for `timeout` seconds.

We set the limits in the child's prelude rather than in Popen's `preexec_fn`: the programs are
started from a thread pool, and `preexec_fn` is documented as unsafe (it can deadlock) in a process
with threads. The parent also kills the child's whole process group when the timeout plus a start-up
grace has passed, in case the program swallows the alarm.

A program passes only if it runs to the end and the prelude prints a per-run random token after it;
`sys.exit(0)` or `os._exit(0)` halfway through is a failure, as in OpenAI's harness.
"""

from __future__ import annotations

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

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"

# Interpreter start-up is not the program's time: the parent's hard kill comes this much later than
# the child's own alarm (start-up is ~20 ms, but the machine may be busy with other work).
_STARTUP_GRACE = 2.0
_OUTPUT_TAIL = 4096  # bytes of the child's output read back for the result line and error reason

# The child's prelude. It runs as `python -I -B -c _CHILD <token> <timeout> <memory_mb> <max_file_mb>`,
# reads the program from stdin and runs it in a fresh `__main__` namespace.
_CHILD = r'''
import os, resource, signal, sys

def _main(token, timeout, memory_mb, max_file_mb):
    program = sys.stdin.buffer.read().decode("utf-8")
    sys.stdin.close()
    root = os.path.realpath(os.getcwd())
    write = os.write

    def limit(name, value):
        resource.setrlimit(getattr(resource, name), (value, value))

    limit("RLIMIT_CPU", int(timeout) + 2)          # SIGXCPU if the alarm below is swallowed
    limit("RLIMIT_AS", memory_mb << 20)             # big allocations raise MemoryError
    limit("RLIMIT_FSIZE", max_file_mb << 20)        # no disk filling (Python ignores SIGXFSZ: OSError)
    limit("RLIMIT_NOFILE", 64)
    limit("RLIMIT_CORE", 0)
    limit("RLIMIT_NPROC", 0)                        # no new processes or threads (not binding for root)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    refused = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.startfile",
        "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.gethostbyaddr", "socket.sendto", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
        "resource.setrlimit", "resource.prlimit", "os.setuid", "os.chroot",
    ))
    path_events = frozenset((
        "os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown", "os.link",
        "os.symlink", "os.mkdir", "os.utime", "shutil.rmtree", "os.chflags", "os.lchflags",
        "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod",
    ))
    # _posixsubprocess.fork_exec starts processes without an audit event of its own.
    blocked_modules = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "_multiprocessing"))
    realpath, fspath, sep = os.path.realpath, os.fspath, os.sep

    def inside(path):
        if isinstance(path, int):  # an already open file descriptor
            return True
        path = fspath(path)
        path = path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path
        resolved = realpath(path)
        return resolved == root or resolved.startswith(root + sep)

    def guard(event, args):
        if event in refused:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0] in blocked_modules:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open" and isinstance(args[2], int) and args[2] & write_flags and not inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} (outside the temp dir) is not allowed")
        if event in path_events:
            paths = args[:2] if event in ("os.rename", "os.link", "os.symlink") else args[:1]
            if not all(isinstance(p, (str, bytes, os.PathLike)) and inside(p) for p in paths):
                raise PermissionError(f"sandbox: {event} outside the temp dir is not allowed")

    sys.addaudithook(guard)

    class Timeout(BaseException):
        pass

    expired = []

    def on_alarm(signum, frame):
        expired.append(True)
        raise Timeout(f"timed out after {timeout:g} s")

    signal.signal(signal.SIGALRM, on_alarm)
    status, reason = "passed", ""
    try:
        code = compile(program, "<candidate>", "exec")
        signal.setitimer(signal.ITIMER_REAL, timeout)
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as e:  # noqa: B036 -- SystemExit and KeyboardInterrupt are failures too
        status, reason = "failed", f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if expired:
        status, reason = "timed out", f"timed out after {timeout:g} s"
    reason = " ".join(reason.split())[:300]
    write(1, f"\n{token} {status}|{reason}\n".encode("utf-8", "backslashreplace"))

_main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
'''


@dataclass(frozen=True)
class ExecResult:
    status: str  # PASSED, FAILED or TIMED_OUT
    reason: str  # empty when passed; else the exception, signal or limit, in one short line
    seconds: float  # wall-clock time of the subprocess, start-up included

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def run_program(
    program: str, timeout: float = 3.0, memory_mb: int = 1024, max_file_mb: int = 16
) -> ExecResult:
    """Run one untrusted program in its own sandboxed subprocess; see the module docstring."""
    token = secrets.token_hex(16)
    env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    cmd = [sys.executable, "-I", "-B", "-c", _CHILD, token, repr(float(timeout)), str(memory_mb),
           str(max_file_mb)]
    with tempfile.TemporaryDirectory(prefix="minicodeparrot-sandbox-", ignore_cleanup_errors=True) as outer:
        work = os.path.join(outer, "work")  # the program's cwd; its output file lives outside it
        os.mkdir(work)
        env["HOME"] = env["TMPDIR"] = work
        out_path = os.path.join(outer, "output")
        start = time.perf_counter()
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=work, env=env,
                start_new_session=True,  # its own process group, so we can kill everything it started
            )
            killed = False
            try:
                proc.communicate(program.encode("utf-8", "surrogatepass"), timeout=timeout + _STARTUP_GRACE)
            except subprocess.TimeoutExpired:
                killed = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        seconds = time.perf_counter() - start
        with open(out_path, "rb") as f:
            f.seek(max(0, os.path.getsize(out_path) - _OUTPUT_TAIL))
            tail = f.read().decode("utf-8", "replace")
    if killed:
        return ExecResult(TIMED_OUT, f"killed after {timeout + _STARTUP_GRACE:g} s wall clock", seconds)
    return _classify(tail, token, proc.returncode, seconds)


def _classify(tail: str, token: str, returncode: int, seconds: float) -> ExecResult:
    for line in reversed(tail.splitlines()):
        if line.startswith(token + " "):
            status, _, reason = line[len(token) + 1:].partition("|")
            return ExecResult(status, reason, seconds)
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return ExecResult(TIMED_OUT, "CPU time limit exceeded", seconds)
    if returncode < 0:
        return ExecResult(FAILED, f"killed by {signal.Signals(-returncode).name}", seconds)
    last = tail.strip().splitlines()[-1][:200] if tail.strip() else ""
    reason = f"exited with status {returncode} before finishing" + (f" ({last})" if last else "")
    return ExecResult(FAILED, reason, seconds)


def run_programs(
    programs: list[str],
    timeout: float = 3.0,
    num_workers: int | None = None,
    memory_mb: int = 1024,
    show_progress: bool = True,
) -> list[ExecResult]:
    """Run many programs, `num_workers` subprocesses at a time; results in input order.

    Threads are enough to drive the pool: each one only waits on its subprocess.
    """
    num_workers = num_workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        results = pool.map(lambda p: run_program(p, timeout=timeout, memory_mb=memory_mb), programs)
        bar = tqdm(results, total=len(programs), desc="executing", unit="prog", disable=not show_progress)
        return list(bar)
