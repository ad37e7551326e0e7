"""The sandbox contains what model-written code does, by accident or on purpose.

Every program runs in one `run_programs` call (2 workers) so the suite pays the slowest one, not
the sum. Where a program would leave a trace (a file, a connection, a dead process), the test looks
for it. The escape attempts per class (filesystem, processes, signals, network, disk) first switch
the audit hook off, as the issue's attack did through its closure cells, so they test the kernel
layers (Landlock, seccomp, the tmpfs quota) alone; they are skipped, with the reason, where the
kernel does not give the sandbox those layers. Each attempt is written to succeed quietly if it gets
out, so "contained" means: it failed, and it failed because the kernel said no.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from minicodeparrot import cli
from minicodeparrot.errors import UserError
from minicodeparrot.evaluation.sandbox import (
    FAILED,
    PASSED,
    TIMED_OUT,
    check_isolation,
    has_kernel_isolation,
    isolation_in_force,
    run_program,
    run_programs,
)

TIMEOUT = 1.0
ISOLATION = isolation_in_force()
kernel_only = pytest.mark.skipif(
    not has_kernel_isolation(ISOLATION), reason=f"no kernel isolation on this machine: {ISOLATION}"
)

# Switch the audit hook off the way a hostile program can: find it with gc and empty the sets, flags
# and helpers in its closure cells. The checks at the end fail if any of its refusals survived.
DISARM = """\
import gc, os, socket, sys, types
for f in gc.get_objects():
    if type(f) is types.FunctionType and f.__code__.co_name == "guard" and f.__closure__:
        for cell in f.__closure__:
            v = cell.cell_contents
            if isinstance(v, frozenset):
                cell.cell_contents = frozenset()
            elif isinstance(v, int):
                cell.cell_contents = 0
            elif callable(v):
                cell.cell_contents = lambda *a: True
sys.audit("os.system", b"true")
sys.audit("open", "/etc/x", "w", os.O_WRONLY | os.O_CREAT)
sys.audit("socket.__new__", None, 2, 1, 0)
sys.audit("import", "ctypes", None, sys.path, sys.meta_path, sys.path_hooks)
"""


def _escapes(tmp: str, tcp: int, udp: int, unix: str, abstract: str, victim: int) -> dict[str, str]:
    """Attempts that succeed silently if they get out; each starts with DISARM."""
    attempts = {
        # filesystem
        "fs_write_path": f"open('{tmp}/escaped.txt', 'w').write('x')\n",
        "fs_write_after_chdir": f"os.chdir('{tmp}')\nopen('escaped_chdir.txt', 'w').write('x')\n",
        "fs_dir_fd": f"fd = os.open('{tmp}', os.O_PATH)\n"
                     "os.write(os.open('escaped_dirfd.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd), b'x')\n",
        "fs_read_outside": f"raise ValueError(open('{tmp}/secret.txt').read())\n",
        "fs_list_outside": f"assert 'secret.txt' in os.listdir('{tmp}')\n",
        "fs_rename_in": f"os.rename('{tmp}/keep.txt', 'stolen.txt')\n",
        "fs_rename_out": f"open('x', 'w').write('x')\nos.rename('x', '{tmp}/escaped_rename.txt')\n",
        "fs_hard_link": f"os.link('{tmp}/keep.txt', 'hard.txt')\nopen('hard.txt', 'w').write('pwned')\n",
        "fs_symlink": f"os.symlink('{tmp}/keep.txt', 'sym.txt')\nopen('sym.txt', 'w').write('pwned')\n",
        "fs_remove": f"os.remove('{tmp}/keep.txt')\n",
        "fs_rmtree": f"import shutil\nshutil.rmtree('{tmp}/keep_dir')\n",
        "fs_truncate": f"os.truncate('{tmp}/keep.txt', 0)\n",
        # metadata: Landlock has no right for these, seccomp refuses them
        "fs_chmod": f"os.chmod('{tmp}/keep.txt', 0o777)\n",
        "fs_chmod_readable": "import sys\nos.chmod(sys.executable, os.stat(sys.executable).st_mode)\n",
        "fs_utime": f"os.utime('{tmp}/keep.txt', (0, 0))\n",
        "fs_xattr": f"os.setxattr('{tmp}/keep.txt', 'user.x', b'1')\n",
        "fs_proc_of_parent": "raise ValueError(open(f'/proc/{os.getppid()}/environ').read())\n",
        "fs_proc_of_victim": f"os.listdir('/proc/{victim}/root')\n",
        # processes
        "proc_os_system": "if os.system('exit 0') != 0:  # glibc says 127 when it cannot start the shell\n"
                          "    raise PermissionError('no shell ran')\n",
        "proc_subprocess": f"import subprocess\nsubprocess.run(['touch', '{tmp}/sub_marker'], check=True)\n",
        "proc_fork": "if os.fork() == 0:\n    os._exit(0)\n",
        "proc_posix_spawn": f"os.posix_spawn('/usr/bin/touch', ['touch', '{tmp}/spawn_marker'], {{}})\n",
        "proc_exec": "os.execv('/bin/true', ['true'])\n",
        "proc_ctypes_fork": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\npid = libc.fork()\n"
                            "if pid == 0:\n    os._exit(0)\n"
                            "if pid < 0:\n    raise PermissionError(os.strerror(ctypes.get_errno()))\n",
        "proc_renice_other": f"os.setpriority(os.PRIO_PROCESS, {victim}, 19)\n",
        # signals: SIGKILL to a process the test started (which must survive), 0 to the parent
        "sig_kill": f"os.kill({victim}, 9)\n",
        "sig_killpg": f"os.killpg({victim}, 9)\n",
        "sig_pidfd": f"import signal\nsignal.pidfd_send_signal(os.pidfd_open({victim}), 9)\n",
        "sig_parent": "os.kill(os.getppid(), 0)\n",
        # network
        "net_tcp_connect": f"socket.create_connection(('127.0.0.1', {tcp}), timeout=1)\n",
        "net_tcp_listen": "s = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n",
        "net_udp": f"socket.socket(type=socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {udp}))\n",
        "net_unix_path": f"socket.socket(socket.AF_UNIX).connect('{unix}')\n",
        "net_unix_abstract": f"socket.socket(socket.AF_UNIX).connect({abstract!r})\n",
        "net_raw_icmp": "socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n",
        "net_packet": "socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n",
        "net_netlink": "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\n",
        # disk: small files until something says no (the one-file cap never does)
        "disk_many_files": "for i in range(100_000):\n    open(f'f{i}', 'wb').write(bytes(1 << 16))\n",
        # the limits themselves
        "raise_rlimit": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
    }
    return {name: DISARM + body for name, body in attempts.items()}


def _programs(tmp: str) -> dict[str, str]:
    """Programs with the audit hook in place: ordinary failures, limits, verdict forging."""
    forge = (  # write a pass line with every string it can see, to every file descriptor it has
        "import os, sys\n"
        "seen = sys.argv + list(os.environ.values()) + [os.read(0, 100).decode(errors='replace')]\n"
        "for fd in range(3, 64):\n"
        "    try:\n        seen.append(os.read(fd, 100).decode(errors='replace'))\n"
        "    except OSError:\n        pass\n"
        "lines = ''.join(f'\\n{w} passed|\\n{w}\\n' for s in seen for w in s.split()).encode()\n"
        "for fd in range(1, 64):\n"
        "    try:\n        os.write(fd, lines)\n"
        "    except OSError:\n        pass\n"
        "os._exit(0)\n"
    )
    return {
        "ok": "def f(x):\n    return x + 1\nassert f(1) == 2\nimport math, hashlib, collections\n",
        "wrong": "assert 1 + 1 == 3, 'arithmetic'\n",
        "syntax": "def f(:\n",
        "long_message": "raise ValueError('x' * 100_000)\n",
        "infinite_loop": "while True:\n    pass\n",
        "sleep": "import time\ntime.sleep(60)\n",
        # Swallows our alarm: only the parent's process-group kill ends it.
        "ignores_alarm": "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True: pass\n",
        "huge_allocation": "x = bytearray(16 * 1024 ** 3)\n",
        # bytes(n) is calloc'd: pages stay untouched, so only the limit stops it (and fast).
        "growing_list": "x = []\nwhile True:\n    x.append(bytes(10 ** 8))\n",
        "big_file": "open('big', 'wb').write(bytes(17 << 20))\n",
        "many_files": "for i in range(100_000):\n    open(f'f{i}', 'wb').write(bytes(1 << 16))\n",
        "hooked_os_system": f"import os\nos.system('touch {tmp}/hooked_marker')\n",
        "hooked_ctypes": "import ctypes\n",
        "hooked_write": f"open('{tmp}/escaped_hooked.txt', 'w')\n",
        "write_inside": "import os\nopen('a.txt', 'w').write('x')\nos.mkdir('d')\nos.remove('a.txt')\n",
        "threads": "import threading\nt = threading.Thread(target=print)\nt.start()\nt.join()\n",
        "tamper_hook": DISARM,
        "forge": forge,
        # junk without a newline on every descriptor, the result pipe included: still judged, and passed
        "scribble": "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'junk')\n"
                    "    except OSError:\n        pass\n",
        "sys_exit_0": "import sys\nsys.exit(0)\n",
        "os_exit_0": "import os\nos._exit(0)\n",
    }


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outside")
    (tmp / "keep.txt").write_text("keep")
    keep_mode = (tmp / "keep.txt").stat().st_mode
    (tmp / "secret.txt").write_text("s3cr3t-content")
    (tmp / "keep_dir").mkdir()
    (tmp / "keep_dir" / "a.txt").write_text("keep")
    listeners = [socket.socket(), socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)]
    tcp, unix, abstract = listeners
    tcp.bind(("127.0.0.1", 0))
    unix.bind(str(tmp / "unix.sock"))
    abstract_name = f"\0minicodeparrot-test-{os.getpid()}"
    abstract.bind(abstract_name)
    for s in listeners:
        s.listen(8)
        s.settimeout(0.05)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.05)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    programs = _programs(str(tmp)) | _escapes(str(tmp), tcp.getsockname()[1], udp.getsockname()[1],
                                              str(tmp / "unix.sock"), abstract_name, victim.pid)
    try:
        results = run_programs(list(programs.values()), timeout=TIMEOUT, num_workers=2, show_progress=False)
        reached = []
        for s in listeners:
            try:
                s.accept()
                reached.append(s)
            except TimeoutError:
                pass
        try:
            udp.recv(10)
            reached.append(udp)
        except TimeoutError:
            pass
        victim_alive = victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
        for s in [*listeners, udp]:
            s.close()
    return {"results": dict(zip(programs, results, strict=True)), "tmp": tmp, "reached": reached,
            "victim_alive": victim_alive, "keep_mode": keep_mode}


def _contained(r, errors=("PermissionError", "Errno 1]", "Errno 13]", "Errno 18]")) -> bool:
    # EPERM / EACCES from Landlock or seccomp, EXDEV from Landlock on links across its rules.
    return r.status == FAILED and any(e in r.reason for e in errors)


def test_correct_program_passes_and_wrong_ones_fail(outcome):
    r = outcome["results"]
    assert r["ok"].status == PASSED and r["ok"].reason == ""
    assert r["wrong"].status == FAILED and r["wrong"].reason == "AssertionError: arithmetic"
    assert r["syntax"].status == FAILED and r["syntax"].reason.startswith("SyntaxError")
    assert r["scribble"].status == PASSED, r["scribble"]


def test_every_child_reports_the_isolation_in_force(outcome):
    assert {r.isolation for r in outcome["results"].values()} == {ISOLATION}


def test_failure_reasons_are_one_short_line(outcome):
    r = outcome["results"]["long_message"]
    assert r.status == FAILED and r.reason == "ValueError: " + "x" * 200


@pytest.mark.parametrize("name", ["infinite_loop", "sleep", "ignores_alarm"])
def test_runaway_programs_time_out(outcome, name):
    r = outcome["results"][name]
    assert r.status == TIMED_OUT
    assert r.seconds < TIMEOUT + 4  # alarm at 1 s, or the group kill 2 s later, plus a busy machine


@pytest.mark.parametrize("name", ["huge_allocation", "growing_list"])
def test_memory_is_limited(outcome, name):
    r = outcome["results"][name]
    assert r.status == FAILED and "MemoryError" in r.reason


def test_one_file_is_limited(outcome):
    r = outcome["results"]["big_file"]
    assert r.status == FAILED and "File too large" in r.reason, r


def test_the_total_written_is_limited(outcome):
    # By the tmpfs quota (no space left) or, without it, by the audit hook's count of files.
    r = outcome["results"]["many_files"]
    assert r.status == FAILED and ("No space left" in r.reason or "files is not allowed" in r.reason), r


def test_the_audit_hook_refuses_first(outcome):
    r = outcome["results"]
    assert r["hooked_os_system"].reason == "PermissionError: sandbox: os.system is not allowed"
    assert r["hooked_ctypes"].reason == "ImportError: sandbox: importing ctypes is not allowed"
    assert "not allowed" in r["hooked_write"].reason
    assert not list(outcome["tmp"].glob("hooked_marker")) and not list(outcome["tmp"].glob("escaped*"))


def test_writes_inside_the_temp_dir_and_threads_are_fine(outcome):
    assert outcome["results"]["write_inside"].status == PASSED
    # seccomp lets clone with CLONE_THREAD through; RLIMIT_NPROC = 0 still stops threads for non-root.
    r = outcome["results"]["threads"]
    assert r.status == PASSED or (os.geteuid() != 0 and "can't start new thread" in r.reason), r


def test_a_program_can_switch_the_audit_hook_off(outcome):
    # What makes the escape tests below meaningful: DISARM works, so only the kernel stops them.
    assert outcome["results"]["tamper_hook"].status == PASSED, outcome["results"]["tamper_hook"]


@pytest.mark.parametrize("name", ["forge", "sys_exit_0", "os_exit_0"])
def test_a_pass_cannot_be_forged_or_exited_into(outcome, name):
    assert outcome["results"][name].status == FAILED, outcome["results"][name]


def _escape_names(prefix):
    names = _escapes("t", 1, 1, "u", "a", 1)
    return [n for n in names if n.startswith(prefix)]


@kernel_only
@pytest.mark.parametrize("name", _escape_names("fs_"))
def test_filesystem_escapes_are_contained(outcome, name):
    r = outcome["results"][name]
    assert _contained(r), r
    tmp = outcome["tmp"]
    assert not list(tmp.glob("escaped*"))
    assert (tmp / "keep.txt").read_text() == "keep" and (tmp / "keep_dir" / "a.txt").exists()
    keep = (tmp / "keep.txt").stat()
    assert keep.st_mode == outcome["keep_mode"] and keep.st_mtime > 0
    assert "PATH=" not in r.reason and "s3cr3t" not in r.reason  # nothing of the parent's leaks back


@kernel_only
@pytest.mark.parametrize("name", _escape_names("proc_"))
def test_process_escapes_are_contained(outcome, name):
    # EPERM from seccomp on clone/execve: no process was made (Landlock's EACCES on exec would come later)
    r = outcome["results"][name]
    assert r.status == FAILED and ("Operation not permitted" in r.reason or "no shell ran" in r.reason), r
    assert not list(outcome["tmp"].glob("*_marker"))


@kernel_only
@pytest.mark.parametrize("name", _escape_names("sig_"))
def test_signal_escapes_are_contained(outcome, name):
    assert _contained(outcome["results"][name]), outcome["results"][name]
    assert outcome["victim_alive"]


@kernel_only
@pytest.mark.parametrize("name", _escape_names("net_"))
def test_network_escapes_are_contained(outcome, name):
    assert _contained(outcome["results"][name]), outcome["results"][name]
    assert not outcome["reached"]


@kernel_only
def test_limits_cannot_be_raised(outcome):
    r = outcome["results"]["raise_rlimit"]
    assert r.status == FAILED and "not allowed to raise maximum limit" in r.reason, r


@pytest.mark.skipif("tmpfs quota" not in ISOLATION, reason=f"no tmpfs quota on this machine: {ISOLATION}")
def test_disk_filling_is_contained_without_the_audit_hook(outcome):
    r = outcome["results"]["disk_many_files"]
    assert r.status == FAILED and "No space left" in r.reason, r


def test_pool_runs_in_parallel():
    # Sleeping programs: wall time, not CPU, so 4 workers beat 1 even on a busy 2-core machine.
    programs = ["import time\ntime.sleep(0.4)\n"] * 4
    start = time.perf_counter()
    assert all(r.passed for r in run_programs(programs, num_workers=1, show_progress=False))
    serial = time.perf_counter() - start
    start = time.perf_counter()
    assert all(r.passed for r in run_programs(programs, num_workers=4, show_progress=False))
    parallel = time.perf_counter() - start
    assert parallel < 0.6 * serial, (parallel, serial)


def test_program_sees_a_fresh_empty_cwd_and_minimal_env():
    program = (
        "import os\n"
        "assert os.listdir('.') == [], os.listdir('.')\n"
        "assert 'minicodeparrot-sandbox-' in os.getcwd()\n"
        "assert set(os.environ) <= {'PATH', 'LANG', 'LC_ALL', 'HOME', 'TMPDIR', 'LC_CTYPE'}, os.environ\n"
    )
    assert run_program(program).status == PASSED


def test_isolation_is_printed_once_and_required_on_demand(monkeypatch, capsys):
    import minicodeparrot.evaluation.sandbox as sandbox

    assert check_isolation() == ISOLATION
    monkeypatch.setattr(sandbox, "isolation_in_force", lambda: "audit hook only")
    monkeypatch.setattr(sandbox, "_announced", set())
    capsys.readouterr()
    assert check_isolation() == "audit hook only"
    assert "WARNING: the sandbox gets only 'audit hook only'" in capsys.readouterr().err
    assert check_isolation() == "audit hook only"
    assert capsys.readouterr().err == ""  # once per process
    with pytest.raises(UserError, match="kernel isolation is required"):
        check_isolation(require=True)


@kernel_only
def test_humaneval_writes_the_isolation_into_results_json(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return False\n"}) + "\n")
    cli.main(["humaneval", "--samples", str(samples), "--limit", "1", "--allow-code-execution",
              "--require-isolation", "--no-progress", "--output-dir", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["isolation"] == ISOLATION


def _header_numbers(path: str) -> dict[str, int]:
    import re

    text = open(path).read()
    return {m[1]: int(m[2]) for m in re.finditer(r"#define __NR(?:3264)?_(\w+)\s+(\d+)\b", text)}


@pytest.mark.parametrize("arch, header", [("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
                                          ("aarch64", "/usr/include/asm-generic/unistd.h")])
def test_seccomp_syscall_numbers_match_the_kernel_headers(arch, header):
    # aarch64 uses the generic table. A name missing from a table would be skipped silently, so every
    # refused name must be there, bar the legacy calls aarch64 never had.
    from minicodeparrot.evaluation.sandbox_child import _ARCHES, _DENIED

    numbers = _ARCHES[arch][1]
    legacy = {"fork", "vfork", "chmod", "chown", "lchown", "utime", "utimes", "futimesat"}
    missing = set(_DENIED) - set(numbers)
    assert missing == (set() if arch == "x86_64" else legacy)
    if not os.path.exists(header):
        pytest.skip(f"no kernel headers at {header}")
    reference = _header_numbers(header)
    checked = {name: nr for name, nr in numbers.items() if name in reference}
    assert checked == {name: reference[name] for name in checked}
    assert len(checked) >= len(numbers) - 3  # only syscalls newer than the headers go unchecked


@pytest.mark.skipif("landlock" not in ISOLATION, reason=f"no Landlock on this machine: {ISOLATION}")
@pytest.mark.parametrize("abi", range(1, 8))
def test_the_ruleset_of_each_landlock_abi_confines_and_keeps_python_working(tmp_path, abi):
    # The ruleset an older kernel would get (fewer rights, a shorter attr): reads outside refused,
    # writes inside and late extension-module loads fine. This kernel accepts newer rights in it too,
    # so whether an old kernel would accept them is only as sure as the table of rights per ABI.
    kernel_abi = int(ISOLATION.split("landlock abi ")[1].split()[0])
    if abi > kernel_abi:
        pytest.skip(f"the kernel speaks Landlock ABI {kernel_abi}")
    import minicodeparrot.evaluation.sandbox_child as child

    outside = tmp_path / "outside.txt"
    outside.write_text("outside")
    work = tmp_path / "work"
    work.mkdir()
    program = (
        "import importlib.util as u, sys\n"
        f"s = u.spec_from_file_location('c', {child.__file__!r})\n"
        "c = u.module_from_spec(s)\ns.loader.exec_module(c)\n"
        f"ctypes, libc = c._libc()\nc.apply_landlock(ctypes, libc, {abi}, {str(work)!r})\n"
        f"open({str(work / 'inside.txt')!r}, 'w').write('x')\n"
        "import hashlib, json, decimal\n"  # extension modules load after the rules are in force
        f"try:\n    open({str(outside)!r}).read()\nexcept PermissionError:\n    print('denied')\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", program], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "denied\n", out.stderr
    assert (work / "inside.txt").read_text() == "x"


def test_require_isolation_refuses_before_generating(monkeypatch, capsys, tmp_path):
    import minicodeparrot.evaluation.sandbox as sandbox

    monkeypatch.setattr(sandbox, "isolation_in_force", lambda: "audit hook only")
    # No model at that path: the refusal must come first, not a model-loading error minutes later.
    with pytest.raises(SystemExit) as e:
        cli.main(["humaneval", "--model", str(tmp_path / "no-model"), "--allow-code-execution",
                  "--require-isolation"])
    assert e.value.code == 2
    assert "kernel isolation is required but the sandbox gets only 'audit hook" in capsys.readouterr().err
