"""The sandbox contains what model-written code does, by accident or on purpose.

Every program runs in one `run_programs` call (2 workers) so the suite pays the slowest one, not
the sum. Where a program would leave a trace (a file, a connection, a dead process, an IPC object),
the test looks for it. The escape attempts per class (filesystem, metadata, processes, signals,
network, unix sockets, IPC, descriptors, tasks, disk) first switch the audit hook off, as a hostile
program can through its closure cells, so they test the kernel layers alone. Which layers must be in
force is decided by probing the kernel here (`KERNEL`), never from what the sandbox reports: where the
kernel offers a layer and the child did not apply it, the tests fail rather than skip. Each attempt is
written to succeed quietly if it gets out, so "contained" means: it failed, because the kernel said no.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minicodeparrot import cli
from minicodeparrot.errors import UserError
from minicodeparrot.evaluation.sandbox import (
    FAILED,
    PASSED,
    TIMED_OUT,
    check_isolation,
    isolation_in_force,
    run_program,
    run_programs,
)

REPO = Path(__file__).resolve().parents[2]
_NEWUSER, _NEWNS, _NEWIPC = 0x10000000, 0x00020000, 0x08000000
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.syscall.restype = ctypes.c_long


def _in_fork(flags: int) -> bool:
    """Whether unshare(flags) works, tried in a throw-away child of this process."""
    pid = os.fork()
    if pid == 0:
        os._exit(0 if _LIBC.unshare(flags) == 0 else 1)
    return os.waitpid(pid, 0)[1] == 0


def _probe_kernel() -> dict:
    """What this kernel offers a sandbox, found without the sandbox's code."""
    root = os.geteuid() == 0
    userns = _in_fork(_NEWUSER | _NEWNS)
    return {
        # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION): the ABI, or -1 without it
        "landlock": max(0, _LIBC.syscall(444, None, 0, 1)),
        "seccomp": _LIBC.prctl(21, 0, 0, 0, 0) >= 0,  # PR_GET_SECCOMP fails (EINVAL) without seccomp
        "userns": userns,
        "ipc": _in_fork(_NEWUSER | _NEWNS | _NEWIPC) or (root and _in_fork(_NEWIPC)),
        # root ignores RLIMIT_NPROC: a pids cgroup caps it; anyone else is capped by the rlimit
        "task cap": (not root) or os.access("/sys/fs/cgroup/pids", os.W_OK),
    }


KERNEL = _probe_kernel()


def needs(*layers: str):
    """Skip only where the *kernel* lacks a layer; a sandbox that does not apply it fails the test."""
    lacking = [layer for layer in layers if not KERNEL[layer]]
    return pytest.mark.skipif(bool(lacking), reason=f"this kernel offers no {', '.join(lacking)}")


TIMEOUT = 1.0
ISOLATION = isolation_in_force()
SHM_KEY, MSG_KEY = 0x6D637000 + os.getpid() % 4096, 0x6D638000 + os.getpid() % 4096
MQ_HOST, MQ_LEFT = f"/minicodeparrot-test-{os.getpid()}", f"/minicodeparrot-left-{os.getpid()}"
SHM_HOST = f"/minicodeparrot-test-{os.getpid()}"  # /dev/shm/minicodeparrot-test-PID
LEFT_SHM_BYTES = (256 << 20) + 4096  # a size no one else uses, to find a leftover by


def test_the_child_applies_every_layer_the_kernel_offers():
    expected = [f"landlock abi {KERNEL['landlock']}"] if KERNEL["landlock"] else []
    expected += ["seccomp"] if KERNEL["seccomp"] else []
    expected += ["tmpfs quota", "user", "mnt"] if KERNEL["userns"] else []
    expected += ["ipc"] if KERNEL["ipc"] else []
    expected += ["task cap"] if KERNEL["task cap"] else []
    assert [layer for layer in expected if layer not in ISOLATION] == [], ISOLATION

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


# ctypes for the syscalls Python has no wrapper for; fail() raises the errno, as os functions do.
LIBC = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.shmat.restype = ctypes.c_void_p\n"
        "def fail(r):\n    if r == -1:\n"
        "        e = ctypes.get_errno()\n        raise OSError(e, os.strerror(e))\n")
# The unix socket to the parent, found among the descriptors as a hostile program would.
CHANNEL = ("import stat\ndef is_socket(fd):\n    try:\n        return stat.S_ISSOCK(os.fstat(fd).st_mode)\n"
           "    except OSError:\n        return False\n"
           "s = socket.socket(fileno=next(fd for fd in range(3, 64) if is_socket(fd)))\n")


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
    return {name: DISARM + body for name, body in (attempts | _round_two(tmp)).items()}


def _round_two(tmp: str) -> dict[str, str]:
    """The classes a second attack round found open: IPC, metadata, unix sockets, descriptors, tasks."""
    return {
        # IPC: the host's System V segment (read its secret) and POSIX queue (delete it)
        "ipc_host_shm": LIBC + f"i = libc.shmget({SHM_KEY}, 0, 0)\nfail(i)\n"
                        "p = libc.shmat(i, None, 0)\nraise ValueError(ctypes.string_at(p, 12))\n",
        "ipc_host_mq": LIBC + f"fail(libc.mq_unlink({MQ_HOST.encode()!r}))\n",
        # POSIX shared memory is a file in /dev/shm: Landlock's to refuse, reading or making one
        "ipc_host_posix_shm": "import _posixshmem\n"
                              f"fd = _posixshmem.shm_open({SHM_HOST!r}, os.O_RDONLY, 0)\n"
                              "raise ValueError(os.read(fd, 12))\n",
        "ipc_make_posix_shm": "import _posixshmem\n"
                              "_posixshmem.shm_open('/minicodeparrot-made', os.O_CREAT | os.O_RDWR, 0o600)\n",
        # metadata: xattrs and symlink targets of host files, names of files appearing in host dirs
        "meta_getxattr": f"raise ValueError(os.getxattr('{tmp}/keep.txt', 'user.secret'))\n",
        "meta_listxattr": f"raise ValueError(os.listxattr('{tmp}/keep.txt'))\n",
        "meta_readlink": f"raise ValueError(os.readlink('{tmp}/link'))\n",
        "meta_readlink_fd": "raise ValueError(os.readlink('/proc/self/fd/1'))\n",
        "meta_inotify": LIBC + "fd = libc.inotify_init1(0)\nfail(fd)\n"
                        f"fail(libc.inotify_add_watch(fd, b'{tmp}', 0x100))\n",  # IN_CREATE
        "meta_fanotify": LIBC + "fail(libc.fanotify_init(0, 0))\n",
        # unix sockets by path, with a descriptor attached, from a socketpair or the channel the child holds
        "unix_socketpair_sendto": "a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                                  f"a.sendto(b'x', '{tmp}/dgram.sock')\n",
        "unix_channel_sendto": CHANNEL + f"s.sendto(b'x', '{tmp}/dgram.sock')\n",
        "unix_channel_sendmsg_fd": CHANNEL + "s.sendmsg([b'x'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, "
                                           f"__import__('array').array('i', [1]))], 0, '{tmp}/dgram.sock')\n",
        "unix_channel_connect": CHANNEL + f"s.connect('{tmp}/dgram.sock')\n",
        # tasks: a thread flood with small stacks (threads cost almost no address space)
        # descriptors: none reopens, through /proc or /dev/fd, into anything but /dev/null
        "fd_reopen": "null, got, held = os.stat('/dev/null'), [], []\nfor fd in range(64):\n"
                     "    try:\n        os.fstat(fd)\n        held.append(fd)\n"
                     "    except OSError:\n        continue\n"
                     "    for path in (f'/proc/self/fd/{fd}', f'/dev/fd/{fd}'):\n"
                     "        for mode in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):\n"
                     "            try:\n                new = os.open(path, mode)\n"
                     "            except OSError:\n                continue\n"
                     "            if not os.path.samestat(os.fstat(new), null):\n"
                     "                got.append((path, mode))\n"
                     "if got or len(held) < 4:  # stdin, stdout, stderr and the channel at least\n"
                     "    raise ValueError(f'reopened {got} of {held}')\n",
        # left behind after it ends: 256 MiB of System V memory, a message queue, a POSIX queue
        "ipc_leftovers": LIBC + f"fail(libc.shmget(0, {LEFT_SHM_BYTES}, 0o1600))\n"  # IPC_PRIVATE, IPC_CREAT
                         f"fail(libc.msgget({MSG_KEY}, 0o1600))\n"
                         # (Landlock refuses creating a POSIX queue: not checked, it would be ours anyway)
                         f"libc.mq_open({MQ_LEFT.encode()!r}, os.O_CREAT | os.O_RDWR, 0o600, None)\n",
        # a thread that would outlive the program; the pid and the cwd say where to look afterwards
        "outlive": "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\n"
                   "raise ValueError(f'{os.getpid()} {os.getcwd()}')\n",
        "task_flood": "import threading\nthreading.stack_size(1 << 15)\nstop, n = threading.Event(), 0\n"
                      "try:\n    for n in range(3000):\n"
                      "        threading.Thread(target=stop.wait, daemon=True).start()\n"
                      "except RuntimeError as e:\n"
                      "    raise RuntimeError(f'{e} after {n} threads') from None\n"
                      "raise ValueError('started 3000 threads')\n",
    }


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


def _host_files(tmp: Path) -> Path:
    (tmp / "keep.txt").write_text("keep")
    with contextlib.suppress(OSError):  # a filesystem without user xattrs: seccomp must refuse all the same
        os.setxattr(tmp / "keep.txt", "user.secret", b"xattr-s3cret")
    os.symlink("/nonexistent/link-s3cret", tmp / "link")
    (tmp / "secret.txt").write_text("s3cr3t-content")
    (tmp / "keep_dir").mkdir()
    (tmp / "keep_dir" / "a.txt").write_text("keep")
    return tmp


def _host_sockets(tmp: Path) -> tuple[list[socket.socket], str]:
    """Listening TCP, unix and abstract unix sockets, and UDP and unix datagram receivers."""
    tcp, unix, abstract = socket.socket(), socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    tcp.bind(("127.0.0.1", 0))
    unix.bind(str(tmp / "unix.sock"))
    abstract_name = f"\0minicodeparrot-test-{os.getpid()}"
    abstract.bind(abstract_name)
    for s in (tcp, unix, abstract):
        s.listen(8)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    dgram.bind(str(tmp / "dgram.sock"))
    for s in (tcp, unix, abstract, udp, dgram):
        s.settimeout(0.05)
    return [tcp, unix, abstract, udp, dgram], abstract_name


def _reached(sockets: list[socket.socket]) -> list[socket.socket]:
    reached = []
    for s in sockets:
        try:
            s.accept() if s.type == socket.SOCK_STREAM else s.recv(10)
            reached.append(s)
        except TimeoutError:
            pass
    return reached


def _make_host_ipc() -> int:
    """A System V segment holding a secret and a POSIX message queue, as a host process would have."""
    _LIBC.shmat.restype = ctypes.c_void_p
    shm = _LIBC.shmget(SHM_KEY, 4096, 0o1600)  # IPC_CREAT | 0600
    assert shm >= 0, os.strerror(ctypes.get_errno())
    address = _LIBC.shmat(shm, None, 0)
    ctypes.memmove(address, b"ipc-s3cret!!", 12)
    _LIBC.shmdt(ctypes.c_void_p(address))
    Path("/dev/shm", SHM_HOST[1:]).write_bytes(b"shm-s3cret!!")
    queue = _LIBC.mq_open(MQ_HOST.encode(), os.O_CREAT | os.O_RDWR, 0o600, None)
    assert queue >= 0, os.strerror(ctypes.get_errno())
    os.close(queue)  # on Linux a queue descriptor is a file descriptor
    return shm


def _mq_exists(name: str) -> bool:
    queue = _LIBC.mq_open(name.encode(), os.O_RDONLY)
    if queue >= 0:
        os.close(queue)
    return queue >= 0


def _host_ipc_state(shm: int) -> dict:
    """What the host's IPC looks like after the programs ran."""
    segments = [line.split() for line in open("/proc/sysvipc/shm").read().splitlines()[1:]]
    queues = [line.split() for line in open("/proc/sysvipc/msg").read().splitlines()[1:]]
    _LIBC.shmat.restype = ctypes.c_void_p
    address = _LIBC.shmat(shm, None, 0)
    secret = ctypes.string_at(address, 12) if address not in (None, 2**64 - 1) else b""
    _LIBC.shmdt(ctypes.c_void_p(address))
    return {"left_shm": [int(f[1]) for f in segments if int(f[3]) == LEFT_SHM_BYTES],
            "left_msg": [int(f[1]) for f in queues if int(f[0]) == MSG_KEY],
            "left_mq": _mq_exists(MQ_LEFT), "host_mq": _mq_exists(MQ_HOST), "host_shm": secret}


def _remove_host_ipc(shm: int, state: dict) -> None:
    for i in [shm, *state.get("left_shm", [])]:
        _LIBC.shmctl(i, 0, None)  # IPC_RMID
    for i in state.get("left_msg", []):
        _LIBC.msgctl(i, 0, None)
    _LIBC.mq_unlink(MQ_HOST.encode())
    _LIBC.mq_unlink(MQ_LEFT.encode())
    Path("/dev/shm", SHM_HOST[1:]).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    tmp = _host_files(tmp_path_factory.mktemp("outside"))
    keep_mode = (tmp / "keep.txt").stat().st_mode
    sockets, abstract_name = _host_sockets(tmp)
    shm, ipc = _make_host_ipc(), {}
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    programs = _programs(str(tmp)) | _escapes(str(tmp), sockets[0].getsockname()[1],
                                              sockets[3].getsockname()[1], str(tmp / "unix.sock"),
                                              abstract_name, victim.pid)
    try:
        results = run_programs(list(programs.values()), timeout=TIMEOUT, num_workers=2, show_progress=False)
        reached = _reached(sockets)
        victim_alive = victim.poll() is None
        ipc = _host_ipc_state(shm)
    finally:
        victim.kill()
        victim.wait()
        for s in sockets:
            s.close()
        _remove_host_ipc(shm, ipc)
    return {"results": dict(zip(programs, results, strict=True)), "tmp": tmp, "reached": reached,
            "victim_alive": victim_alive, "keep_mode": keep_mode, "ipc": ipc}


def _contained(r, errors=("PermissionError", "Errno 1]", "Errno 13]", "Errno 18]")) -> bool:
    # EPERM / EACCES from Landlock or seccomp, EXDEV from Landlock on links across its rules.
    return r.status == FAILED and any(e in r.reason for e in errors)


def test_correct_program_passes_and_wrong_ones_fail(outcome):
    r = outcome["results"]
    assert r["ok"].status == PASSED and r["ok"].reason == ""
    assert r["wrong"].status == FAILED and r["wrong"].reason == "AssertionError: arithmetic"
    assert r["syntax"].status == FAILED and r["syntax"].reason.startswith("SyntaxError")
    # Junk on the channel garbles only the program's own account: it fails, it is not judged a pass.
    assert r["scribble"].status == FAILED and "something else than a message" in r["scribble"].reason


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
    # seccomp lets clone with CLONE_THREAD through, and the task cap leaves room for a few, except where
    # RLIMIT_NPROC can only count all of a non-root user's processes (no user namespace): none then.
    r = outcome["results"]["threads"]
    assert r.status == PASSED or (os.geteuid() != 0 and not KERNEL["userns"] and "new thread" in r.reason), r


def test_a_program_can_switch_the_audit_hook_off(outcome):
    # What makes the escape tests below meaningful: DISARM works, so only the kernel stops them.
    assert outcome["results"]["tamper_hook"].status == PASSED, outcome["results"]["tamper_hook"]


@pytest.mark.parametrize("name", ["forge", "sys_exit_0", "os_exit_0"])
def test_a_program_cannot_exit_or_scribble_into_a_pass(outcome, name):
    # Only the program's own account (scoring never uses it: see test_checker.py), and still not a pass.
    assert outcome["results"][name].status in (FAILED, TIMED_OUT), outcome["results"][name]


def _escape_names(prefix):
    names = _escapes("t", 1, 1, "u", "a", 1)
    return [n for n in names if n.startswith(prefix)]


@needs("landlock", "seccomp")
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


@needs("seccomp")
@pytest.mark.parametrize("name", _escape_names("proc_"))
def test_process_escapes_are_contained(outcome, name):
    # EPERM from seccomp on clone/execve: no process was made (Landlock's EACCES on exec would come later)
    r = outcome["results"][name]
    assert r.status == FAILED and ("Operation not permitted" in r.reason or "no shell ran" in r.reason), r
    assert not list(outcome["tmp"].glob("*_marker"))


@needs("landlock", "seccomp")
@pytest.mark.parametrize("name", _escape_names("sig_"))
def test_signal_escapes_are_contained(outcome, name):
    assert _contained(outcome["results"][name]), outcome["results"][name]
    assert outcome["victim_alive"]


@needs("landlock", "seccomp")
@pytest.mark.parametrize("name", _escape_names("net_"))
def test_network_escapes_are_contained(outcome, name):
    assert _contained(outcome["results"][name]), outcome["results"][name]
    assert not outcome["reached"]


@needs("seccomp")
def test_limits_cannot_be_raised(outcome):
    r = outcome["results"]["raise_rlimit"]
    assert r.status == FAILED and "not allowed to raise maximum limit" in r.reason, r


@needs("userns")
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


@needs("landlock", "seccomp", "ipc", "task cap")
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
    legacy |= {"readlink", "inotify_init"}
    missing = set(_DENIED) - set(numbers)
    assert missing == (set() if arch == "x86_64" else legacy)
    if not os.path.exists(header):
        pytest.skip(f"no kernel headers at {header}")
    reference = _header_numbers(header)
    checked = {name: nr for name, nr in numbers.items() if name in reference}
    assert checked == {name: reference[name] for name in checked}
    # only syscalls newer than these headers go unchecked
    newer = {"fchmodat2", "getxattrat", "listxattrat", "setxattrat", "removexattrat"}
    assert set(numbers) - set(checked) <= newer


@needs("landlock")
@pytest.mark.parametrize("abi", range(1, 8))
def test_the_ruleset_of_each_landlock_abi_confines_and_keeps_python_working(tmp_path, abi):
    # The ruleset an older kernel would get (fewer rights, a shorter attr): reads outside refused,
    # writes inside and late extension-module loads fine. This kernel accepts newer rights in it too,
    # so whether an old kernel would accept them is only as sure as the table of rights per ABI.
    if abi > KERNEL["landlock"]:
        pytest.skip(f"the kernel speaks Landlock ABI {KERNEL['landlock']}")
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


# --- the new classes: IPC, metadata, unix sockets, descriptors, tasks, and nothing left behind ------
@needs("ipc")
def test_the_hosts_ipc_objects_are_out_of_reach(outcome):
    r = outcome["results"]
    for name in ("ipc_host_shm", "ipc_host_mq"):
        assert r[name].status == FAILED and "No such file or directory" in r[name].reason, r[name]
    assert outcome["ipc"]["host_shm"] == b"ipc-s3cret!!" and outcome["ipc"]["host_mq"]


@needs("landlock")
def test_posix_shared_memory_is_out_of_reach(outcome):
    for name in ("ipc_host_posix_shm", "ipc_make_posix_shm"):
        assert _contained(outcome["results"][name]), outcome["results"][name]
    assert not Path("/dev/shm/minicodeparrot-made").exists()


@needs("ipc")
def test_ipc_objects_the_child_makes_die_with_it(outcome):
    assert outcome["results"]["ipc_leftovers"].status == PASSED, outcome["results"]["ipc_leftovers"]
    ipc = outcome["ipc"]
    assert ipc["left_shm"] == [] and ipc["left_msg"] == [] and not ipc["left_mq"]


@needs("seccomp")
@pytest.mark.parametrize("name", _escape_names("meta_"))
def test_metadata_outside_is_unreadable(outcome, name):
    r = outcome["results"][name]
    assert _contained(r), r
    assert "s3cret" not in r.reason and "minicodeparrot-sandbox" not in r.reason


@needs("seccomp")
@pytest.mark.parametrize("name", _escape_names("unix_"))
def test_no_unix_socket_reaches_outside(outcome, name):
    assert _contained(outcome["results"][name]), outcome["results"][name]
    assert not outcome["reached"]


@needs("landlock")
def test_no_descriptor_reopens_into_more(outcome):
    assert outcome["results"]["fd_reopen"].status == PASSED, outcome["results"]["fd_reopen"]


@needs("task cap")
def test_a_thread_flood_ends_at_the_task_cap(outcome):
    r = outcome["results"]["task_flood"]
    found = re.fullmatch(r"RuntimeError: can't start new thread after (\d+) threads", r.reason)
    assert r.status == FAILED and found, r
    assert int(found[1]) < 64


def test_nothing_the_child_made_outlives_it(outcome):
    # A thread still sleeping when the program ended, its process, temp dir and task cgroup: all gone.
    r = outcome["results"]["outlive"]
    pid, cwd = r.reason.removeprefix("ValueError: ").split()
    assert "minicodeparrot-sandbox-" in cwd
    run_dir = Path(cwd).parent
    assert not Path(f"/proc/{pid}").exists() and not run_dir.exists()
    assert not Path("/sys/fs/cgroup/pids", run_dir.name).exists()


# --- --require-isolation, for real: a child whose confinement fails -------------------------------
# This process loses Landlock as a kernel without it would (landlock_create_ruleset -> ENOSYS, through
# a seccomp filter of its own that its children inherit), then asks for isolation three ways.
_WITHOUT_LANDLOCK = """\
import ctypes, json, os, struct, sys
sys.path.insert(0, {repo!r})
libc = ctypes.CDLL(None, use_errno=True)
code = b"".join(struct.pack("HBBI", *op) for op in [
    (0x20, 0, 0, 0), (0x15, 0, 1, 444), (0x06, 0, 0, 0x00050000 | 38), (0x06, 0, 0, 0x7FFF0000)])
buf = ctypes.create_string_buffer(code, len(code))
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
prog = Prog(4, ctypes.addressof(buf))
assert libc.prctl(38, 1, 0, 0, 0) == 0 and libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0
from minicodeparrot import cli
from minicodeparrot.evaluation import checker, humaneval, sandbox
marker = {marker!r}
run = sandbox.run_program(f"open({{marker!r}}, 'w')", require_isolation=True)
problem = humaneval.load_problems()["HumanEval/0"]
check = checker.check_completion(problem, problem["canonical_solution"], require_isolation=True)
codes = []
for argv in {argvs!r}:
    try:
        cli.main(argv)
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code)
print(json.dumps({{"run": run.reason, "run_status": run.status, "check": check.reason,
                  "check_status": check.status, "cli": codes, "isolation": run.isolation}}))
"""


def test_require_isolation_fails_closed_when_confinement_fails(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return False\n"}) + "\n")
    marker = str(tmp_path / "ran")
    scoring = ["humaneval", "--samples", str(samples), "--limit", "1", "--allow-code-execution",
               "--require-isolation", "--no-progress", "--output-dir", str(tmp_path / "out")]
    # No model at that path: the refusal must come first, not a model-loading error minutes later.
    generating = ["humaneval", "--model", str(tmp_path / "no-model"), "--allow-code-execution",
                  "--require-isolation", "--output-dir", str(tmp_path / "out")]
    script = _WITHOUT_LANDLOCK.format(repo=str(REPO), marker=marker, argvs=[scoring, generating])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert "landlock" not in got["isolation"] and got["isolation"]  # the child did run, without Landlock
    for key in ("run", "check"):  # the child's own branch: it refuses before the program runs
        assert got[f"{key}_status"] == FAILED
        assert got[key].startswith("sandbox: kernel isolation required but landlock not in force"), got
    assert not os.path.exists(marker)
    assert got["cli"] == [2, 2] and out.stderr.count("kernel isolation is required but") == 2, out.stderr
    assert "(no landlock:" in out.stderr
    assert not (tmp_path / "out").exists()  # refused before any sample ran or any result was written
