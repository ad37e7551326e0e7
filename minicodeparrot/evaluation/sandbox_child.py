"""The inside of the sandbox: a child process confines itself with the kernel, runs one program, then
answers calls to the functions it defined.

`sandbox.Sandbox` loads this file in a fresh `python -I -B` and calls `main()` with argv
`CHANNEL_FD TIMEOUT MEMORY_MB MAX_FILE_MB REQUIRE CGROUP` and the program on stdin. It imports only the
standard library: the package (and its read paths) stays out. Before the program runs it applies, in
this order (each step needs powers that the next one takes away):

1. rlimits: CPU seconds, address space, size of one file, open files, no core dumps;
2. a task cap: it joins the `pids` cgroup CGROUP that the parent made for it (a root child: root
   ignores RLIMIT_NPROC), or, not being root, sets RLIMIT_NPROC once inside its own user namespace,
   where the count is its own tasks only (step 3);
3. namespaces of its own: user + mount (for the tmpfs below), IPC (System V objects and POSIX message
   queues of the host are out of reach, and those it makes die with it), UTS and cgroup. Not network
   (creating one costs ~7 ms a program; seccomp refuses every socket instead) and not PID (it would
   need a fork: seccomp refuses signals and ptrace of other processes instead);
4. a size- and inode-capped tmpfs over its working directory: without root, the only way to cap the
   *total* written (RLIMIT_FSIZE caps one file). Where user namespaces are off, the audit hook counts
   created files instead (<= 256 x the one-file cap): a second-layer bound only;
5. Landlock: read only the Python installation and the directories of the libraries it maps, write only
   in the working directory, no TCP (ABI >= 4), signals and abstract unix sockets scoped to itself
   (ABI >= 6). Landlock does not cover metadata (xattrs, symlink targets, inotify), pipes or unix
   sockets by path: seccomp refuses those;
6. all capabilities dropped (a root child keeps none, and none inside its user namespace);
7. seccomp-bpf: no new processes, no exec, no sockets (not even `socketpair`), no connect/bind/sendto/
   sendmsg on the one it holds, no ptrace or cross-process memory, no signals to other processes, no
   xattr reads or writes, no `readlink`, no inotify/fanotify, no namespaces, mounts, io_uring, bpf,
   keyrings or rlimit raising. A deny list: the syscalls not named are allowed, and Landlock confines
   what those (open, rename, ...) reach;
8. an audit hook, as a second layer: it refuses the same things with clearer messages. It is Python
   code in the program's own interpreter, so a program can switch it off: not counted as isolation.

Steps 2-7 are best effort: what could be applied is reported as one string (`landlock abi 7 + seccomp
+ tmpfs quota + namespaces user,mnt,ipc,uts,cgroup + task cap 32 (pids cgroup)`, or `audit hook
only`), and with REQUIRE=1 the program is not run unless every layer in `REQUIRED` is in force.

Descriptors: stdin (the program) is read and replaced by /dev/null, stdout and stderr are a file outside
the working directory (Landlock refuses to reopen it through /proc/self/fd), and CHANNEL_FD is a unix
stream socket to the parent (a socket cannot be reopened through /proc at all, and seccomp refuses
sending it anywhere else). Nothing secret goes through any of them: the verdict is not made here.

The channel carries length-prefixed JSON messages of plain data (`to_wire` / `from_wire`): first
`["isolation", text]`, written before the program runs, then the program's outcome (`["defined"]`,
`["failed", reason]`, `["timed out", reason]` or `["refused", reason]`), then one reply per request
`["call", name, args]`: `["ok", value]`, `["raise", type, message]` or `["timed out", reason]`. The
parent runs the tests and compares: a program that rewrites this interpreter can only answer wrongly.
"""

import os
import resource
import signal
import struct
import sys

# Landlock (include/uapi/linux/landlock.h). Each ABI only knows the rights of its own version and
# before: asking an older kernel to handle a newer right is EINVAL, so rights are masked per ABI.
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_REMOVE_DIR, _FS_REMOVE_FILE, _FS_MAKE_DIR, _FS_MAKE_REG = 1 << 4, 1 << 5, 1 << 7, 1 << 8
_FS_MAKE_SYM, _FS_REFER, _FS_TRUNCATE = 1 << 12, 1 << 13, 1 << 14
_FS_ALL_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6
_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | (1 << 15)  # all a file can take
_READ = _FS_READ_FILE | _FS_READ_DIR
_WRITE = (_READ | _FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE_DIR | _FS_MAKE_REG
          | _FS_MAKE_SYM | _FS_REFER | _FS_TRUNCATE)

# seccomp: per architecture, the audit arch the filter checks first (a syscall made through another
# ABI, e.g. 32-bit int 0x80 on x86_64, has other numbers and must not slip past) and the numbers.
_ARCHES = {
    "x86_64": (0xC000003E, {
        "fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "execve": 59, "execveat": 322,
        "socket": 41, "socketpair": 53, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
        "process_madvise": 440, "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438,
        "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
        "setrlimit": 160, "prlimit64": 302, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "unshare": 272,
        "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "open_tree": 428,
        "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "keyctl": 250, "add_key": 248, "request_key": 249, "kexec_load": 246,
        "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
        "capset": 126, "name_to_handle_at": 303, "open_by_handle_at": 304, "truncate": 76, "acct": 163,
        "reboot": 169, "swapon": 167, "swapoff": 168, "chmod": 90, "fchmod": 91, "fchmodat": 268,
        "fchmodat2": 452, "chown": 92, "fchown": 93, "lchown": 94, "fchownat": 260, "utime": 132,
        "utimes": 235, "futimesat": 261, "utimensat": 280, "setxattr": 188, "lsetxattr": 189,
        "fsetxattr": 190, "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199, "setxattrat": 463,
        "removexattrat": 466, "setpriority": 141, "ioprio_set": 251, "sched_setaffinity": 203,
        "sched_setscheduler": 144, "sched_setparam": 142, "sched_setattr": 314, "migrate_pages": 256,
        "move_pages": 279, "getxattr": 191, "lgetxattr": 192, "fgetxattr": 193, "listxattr": 194,
        "llistxattr": 195, "flistxattr": 196, "getxattrat": 464, "listxattrat": 465, "readlink": 89,
        "readlinkat": 267, "inotify_init": 253, "inotify_init1": 294, "inotify_add_watch": 254,
        "fanotify_init": 300, "fanotify_mark": 301, "connect": 42, "bind": 49, "listen": 50, "accept": 43,
        "accept4": 288, "sendto": 44, "sendmsg": 46, "sendmmsg": 307, "recvmsg": 47, "recvmmsg": 299,
    }),
    "aarch64": (0xC00000B7, {
        "clone": 220, "clone3": 435, "execve": 221, "execveat": 281, "socket": 198, "socketpair": 199,
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "process_madvise": 440,
        "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438, "kill": 129, "tkill": 130,
        "tgkill": 131, "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240, "setrlimit": 164,
        "prlimit64": 261, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "unshare": 97, "setns": 268, "mount": 40,
        "umount2": 39, "pivot_root": 41, "chroot": 51, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "keyctl": 219,
        "add_key": 217, "request_key": 218, "kexec_load": 104, "kexec_file_load": 294,
        "init_module": 105, "finit_module": 273, "delete_module": 106, "capset": 91,
        "name_to_handle_at": 264, "open_by_handle_at": 265, "truncate": 45, "acct": 89, "reboot": 142,
        "swapon": 224, "swapoff": 225, "fchmod": 52, "fchmodat": 53, "fchmodat2": 452, "fchown": 55,
        "fchownat": 54, "utimensat": 88, "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14,
        "lremovexattr": 15, "fremovexattr": 16, "setxattrat": 463, "removexattrat": 466, "setpriority": 140,
        "ioprio_set": 30, "sched_setaffinity": 122, "sched_setscheduler": 119, "sched_setparam": 118,
        "sched_setattr": 274, "migrate_pages": 238, "move_pages": 239, "getxattr": 8, "lgetxattr": 9,
        "fgetxattr": 10, "listxattr": 11, "llistxattr": 12, "flistxattr": 13, "getxattrat": 464,
        "listxattrat": 465, "readlinkat": 78, "inotify_init1": 26, "inotify_add_watch": 27,
        "fanotify_init": 262, "fanotify_mark": 263, "connect": 203, "bind": 200, "listen": 201, "accept": 202,
        "accept4": 242, "sendto": 206, "sendmsg": 211, "sendmmsg": 269, "recvmsg": 212, "recvmmsg": 243,
    }),
}
# Refused outright (those an arch lacks are skipped). clone, clone3, kill, tgkill and prlimit64 get
# argument checks below.
_DENIED = (
    "fork", "vfork", "execve", "execveat", "socket", "ptrace", "process_vm_readv", "process_vm_writev",
    "process_madvise", "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "tkill", "rt_sigqueueinfo",
    "rt_tgsigqueueinfo", "setrlimit", "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf",
    "perf_event_open", "userfaultfd", "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "keyctl",
    "add_key", "request_key", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "capset", "name_to_handle_at", "open_by_handle_at", "truncate", "acct", "reboot",
    "swapon", "swapoff",
    # Landlock has no right for these: an owner (a root child owns most of the system) could change the
    # mode, owner, times or xattrs of files it may not write, e.g. chmod 777 something in /etc.
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat", "utime", "utimes",
    "futimesat", "utimensat", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr",
    "fremovexattr", "setxattrat", "removexattrat",
    # Same-uid processes outside (every root process, for a root child) could be reniced or pinned.
    "setpriority", "ioprio_set", "sched_setaffinity", "sched_setscheduler", "sched_setparam",
    "sched_setattr", "migrate_pages", "move_pages",
    # Metadata and notifications Landlock does not govern: secrets in xattrs or symlink targets of host
    # files, names of files appearing in host directories.
    "getxattr", "lgetxattr", "fgetxattr", "listxattr", "llistxattr", "flistxattr", "getxattrat",
    "listxattrat", "readlink", "readlinkat", "inotify_init", "inotify_init1", "inotify_add_watch",
    "fanotify_init", "fanotify_mark",
    # Unix sockets: no new ones (a socketpair can sendto a host socket's path), and nothing but read and
    # write on the channel socket it holds (no path addresses, no descriptors passed with sendmsg).
    "socketpair", "connect", "bind", "listen", "accept", "accept4", "sendto", "sendmsg", "sendmmsg",
    "recvmsg", "recvmmsg",
)
_EPERM, _ENOSYS, _CLONE_THREAD = 1, 38, 0x00010000
_NEWUSER, _NEWNS, _NEWIPC, _NEWUTS, _NEWCGROUP = 0x10000000, 0x00020000, 0x08000000, 0x04000000, 0x02000000
# What `--require-isolation` insists on: without any one of them, some class of attack reaches the host.
REQUIRED = ("landlock", "seccomp", "ipc", "task cap")
TASK_CAP = 32  # tasks (the main thread included): a thread flood ends here, far from the host's limits
_MESSAGE_LIMIT = 16 << 20  # bytes of one message on the channel
_TMPFS_FILES = 256  # inodes in the tmpfs quota; its bytes are 4x the one-file cap


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return ctypes, libc


def _check(ctypes, result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def set_rlimits(timeout: float, memory_mb: int, max_file_mb: int) -> None:
    # Hard limits equal soft ones so the program cannot raise them back (seccomp refuses it too: a root
    # child could raise hard limits with CAP_SYS_RESOURCE).
    for name, value in (
        ("RLIMIT_CPU", int(timeout) + 2),  # SIGXCPU if the alarm is swallowed
        ("RLIMIT_AS", memory_mb << 20),  # big allocations raise MemoryError
        ("RLIMIT_FSIZE", max_file_mb << 20),  # one file (Python ignores SIGXFSZ: OSError)
        ("RLIMIT_NOFILE", 64),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))


def join_task_cgroup(cgroup: str) -> None:
    """Join the `pids` cgroup the parent made (pids.max = TASK_CAP): root ignores RLIMIT_NPROC.

    Before Landlock and the capability drop: afterwards the cgroup files are out of reach, so the
    program cannot move itself out. The parent removes the cgroup when the child is gone.
    """
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def enter_namespaces(ctypes, libc) -> list[str]:
    """A user + mount + IPC + UTS + cgroup namespace of its own, mapping only its own ids.

    A root child can make the non-user ones without a user namespace (where unprivileged user
    namespaces are off, by sysctl, AppArmor or a container's seccomp profile), so it tries those first.
    Returns the namespaces it got.
    """
    others = _NEWIPC | _NEWUTS | _NEWCGROUP
    got = []
    if os.geteuid() == 0 and libc.unshare(others) == 0:
        got, others = ["ipc", "uts", "cgroup"], 0
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(_NEWUSER | _NEWNS | others) != 0:
        return got
    # Map our own ids only: the namespace cannot act as anyone else. setgroups must be denied first.
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return ["user", "mnt"] + (got or ["ipc", "uts", "cgroup"])


def mount_tmpfs_quota(ctypes, libc, work: str, max_file_mb: int) -> None:
    """A tmpfs of 4x max_file_mb and _TMPFS_FILES inodes over `work` (in our own mount namespace)."""
    options = f"size={4 * max_file_mb}m,nr_inodes={_TMPFS_FILES},mode=700".encode()
    flags = 0x2 | 0x4 | 0x8  # MS_NOSUID | MS_NODEV | MS_NOEXEC
    _check(ctypes, libc.mount(b"tmpfs", work.encode(), b"tmpfs", flags, options), "mount tmpfs")
    os.chdir(work)  # the old cwd is the directory under the mount


def landlock_abi(ctypes, libc) -> int:
    abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return max(0, abi)


def read_paths() -> tuple[set[str], set[str]]:
    """(directories, files) the interpreter needs to keep running: its installation, what it has mapped."""
    dirs = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    dirs |= {p for p in sys.path if p and os.path.isdir(p)}
    # Mapped shared libraries and locale files: their directories also hold the libraries that extension
    # modules load later (libcrypto for _hashlib, libffi for _ctypes, ...).
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/") and os.path.exists(fields[5].rstrip()):
                dirs.add(os.path.dirname(fields[5].rstrip()))
    files = {p for p in ("/etc/ld.so.cache",) if os.path.exists(p)}  # the dynamic loader's index
    return {os.path.realpath(d) for d in dirs}, files


def apply_landlock(ctypes, libc, abi: int, work: str) -> None:
    fs = _FS_ALL_BY_ABI[max(a for a in _FS_ALL_BY_ABI if a <= abi)]
    net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = _check(ctypes, libc.syscall(444, attr, len(attr), 0), "landlock_create_ruleset")
    dirs, files = read_paths()
    rules = [(d, _READ) for d in dirs] + [(f, _FS_READ_FILE) for f in files] + [(work, _WRITE)]
    rules.append(("/dev/null", _FS_READ_FILE | _FS_WRITE_FILE))
    try:
        for path, access in rules:
            if not os.path.exists(path):
                continue
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if not os.path.isdir(path):
                    access &= _FILE_RIGHTS
                rule = struct.pack("=Qi", access & fs, fd)  # struct landlock_path_beneath_attr is packed
                _check(ctypes, libc.syscall(445, ruleset, 1, rule, 0), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        _check(ctypes, libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
        _check(ctypes, libc.syscall(446, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def drop_capabilities(ctypes, libc) -> None:
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    nr = _ARCHES[os.uname().machine][1]["capset"]
    _check(ctypes, libc.syscall(nr, header, bytes(24)), "capset")  # effective/permitted/inheritable = 0


def seccomp_filter(arch: int, nrs: dict[str, int], pid: int) -> bytes:
    """The BPF program: the arch check, then one test per syscall; anything else is allowed.

    A deny list, not an allow list: Python makes too many different syscalls to list them all safely,
    and Landlock already confines what the allowed ones (open, rename, ...) can reach.
    """
    def op(code, k, jt=0, jf=0):
        return struct.pack("HBBI", code, jt, jf, k)

    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JSET|K, BPF_RET|K
    allow, deny, nosys = 0x7FFF0000, 0x00050000 | _EPERM, 0x00050000 | _ENOSYS
    arg = [16 + 8 * i for i in range(6)]  # low 32 bits of seccomp_data.args[i] (both arches: little-endian)
    prog = [op(ld, 4), op(jeq, arch, 1, 0), op(ret, 0x80000000)]  # foreign arch: kill the process
    prog.append(op(ld, 0))
    if arch == _ARCHES["x86_64"][0]:
        prog += [op(0x35, 0x40000000, 0, 1), op(ret, deny)]  # x32 syscalls (BPF_JGE): refuse
    for name in _DENIED:
        if name in nrs:
            prog += [op(jeq, nrs[name], 0, 1), op(ret, deny)]
    # clone3 passes its flags in memory BPF cannot read: ENOSYS makes libc fall back to clone.
    prog += [op(jeq, nrs["clone3"], 0, 1), op(ret, nosys)]
    blocks = {
        "clone": [op(ld, arg[0]), op(jset, _CLONE_THREAD, 0, 1), op(ret, allow), op(ret, deny)],  # threads
        "kill": [op(ld, arg[0]), op(jeq, pid, 0, 1), op(ret, allow), op(ret, deny)],  # itself only
        "tgkill": [op(ld, arg[0]), op(jeq, pid, 0, 1), op(ret, allow), op(ret, deny)],  # its own threads
        # prlimit64(pid, resource, new, old): reading is fine, setting is not.
        "prlimit64": [op(ld, arg[2]), op(jeq, 0, 0, 3), op(ld, arg[2] + 4), op(jeq, 0, 0, 1), op(ret, allow),
                      op(ret, deny)],
    }
    for name, block in blocks.items():
        prog += [op(jeq, nrs[name], 0, len(block))] + block
    prog.append(op(ret, allow))
    return b"".join(prog)


def apply_seccomp(ctypes, libc) -> None:
    machine = os.uname().machine
    if machine not in _ARCHES:
        raise OSError(f"seccomp: no syscall table for {machine}")
    arch, nrs = _ARCHES[machine]
    code = seccomp_filter(arch, nrs, os.getpid())
    buf = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(len(code) // 8, ctypes.addressof(buf))
    _check(ctypes, libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    _check(ctypes, libc.prctl(22, 2, ctypes.byref(prog), 0, 0), "PR_SET_SECCOMP")  # SECCOMP_MODE_FILTER


def confine(work: str, max_file_mb: int, cgroup: str) -> list[str]:
    """Apply steps 2-7 of the module docstring, each if the kernel allows; return those in force."""
    try:
        ctypes, libc = _libc()
    except (ImportError, OSError):
        return []
    task_cap = quota = landlock = seccomp = ""
    try:
        if cgroup:
            join_task_cgroup(cgroup)
            task_cap = f"task cap {TASK_CAP} (pids cgroup)"
    except OSError:
        pass
    try:
        namespaces = enter_namespaces(ctypes, libc)
    except OSError:  # the id maps could not be written: report none rather than guess
        namespaces = []
    if not task_cap and os.geteuid() != 0:
        # Counted per user namespace: in our own one, only our tasks; outside it, all of this user's
        # processes, so there the only safe cap is no new task at all.
        limit = TASK_CAP if "user" in namespaces else 0
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
        task_cap = f"task cap {limit or 1} (rlimit)"
    try:
        if "mnt" in namespaces:
            mount_tmpfs_quota(ctypes, libc, work, max_file_mb)
            quota = "tmpfs quota"
    except OSError:
        pass
    abi = landlock_abi(ctypes, libc)
    try:
        if abi:
            apply_landlock(ctypes, libc, abi, work)
            landlock = f"landlock abi {abi}"
    except OSError:
        pass
    try:
        drop_capabilities(ctypes, libc)
    except (OSError, KeyError):  # KeyError: no syscall table for this machine; seccomp says so below
        pass
    try:
        apply_seccomp(ctypes, libc)
        seccomp = "seccomp"
    except OSError:
        pass
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # so the program's `import ctypes` reaches the audit hook again
    spaces = f"namespaces {','.join(namespaces)}" if namespaces else ""
    return [part for part in (landlock, seccomp, quota, spaces, task_cap) if part]


def install_audit_hook(root: str, count_files: bool) -> None:
    """The second layer; see the module docstring for why it is not counted as isolation."""
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
    created = [0]  # without the tmpfs quota: files created, to bound the total at _TMPFS_FILES x one file

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
        if event == "open" and isinstance(args[2], int) and args[2] & write_flags:
            if not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} (outside the temp dir) is not allowed")
            if count_files and args[2] & os.O_CREAT:
                created[0] += 1
                if created[0] > _TMPFS_FILES:
                    raise PermissionError(f"sandbox: more than {_TMPFS_FILES} files is not allowed")
        if event in path_events:
            paths = args[:2] if event in ("os.rename", "os.link", "os.symlink") else args[:1]
            if not all(isinstance(p, (str, bytes, os.PathLike)) and inside(p) for p in paths):
                raise PermissionError(f"sandbox: {event} outside the temp dir is not allowed")

    sys.addaudithook(guard)


# --- the channel: plain data only ------------------------------------------------------------------
# JSON cannot tell a tuple from a list or carry a set, bytes or a dict with int keys, and a test's
# `assert f(x) == (1, 2)` must see exactly what the function returned. So every container is a
# [tag, items] pair and a bare JSON value is a scalar; nothing else (no objects, no pickle) exists.
_CONTAINERS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def to_wire(value, depth: int = 0):
    """A returned value as plain JSON data. Subclasses become their base type (a `str` whose `__eq__`
    says yes to everything arrives as the plain string it holds); anything else is a TypeError."""
    if depth > 100:
        raise ValueError("nested more than 100 deep")
    kind = type(value)
    if value is None or kind in (bool, str, float) or (kind is int and -(1 << 63) <= value < 1 << 63):
        return value
    if isinstance(value, int) and kind is not bool:
        return ["int", format(int(value), "x")]  # beyond 64 bits: JSON readers would limit the digits
    for name in ("list", "tuple", "frozenset", "set"):  # frozenset first: it is no subclass of set
        if isinstance(value, _CONTAINERS[name]):
            return [name, [to_wire(v, depth + 1) for v in value]]
    if isinstance(value, dict):
        return ["dict", [[to_wire(k, depth + 1), to_wire(v, depth + 1)] for k, v in value.items()]]
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, (bytes, bytearray)):
        return ["bytes", bytes(value).hex()]
    if hasattr(type(value), "__index__"):  # numpy integers and the like
        return to_wire(int(type(value).__index__(value)), depth)
    raise TypeError(f"a {kind.__name__} is not plain data")


def from_wire(data):
    """The inverse of `to_wire`, strict: the parent trusts nothing it cannot rebuild from plain data."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is not list or len(data) != 2 or type(data[1]) not in (list, str):
        raise ValueError("not plain data")
    tag, body = data
    if tag in _CONTAINERS and type(body) is list:
        return _CONTAINERS[tag](from_wire(v) for v in body)
    if tag == "dict" and type(body) is list and all(type(kv) is list and len(kv) == 2 for kv in body):
        return {from_wire(k): from_wire(v) for k, v in body}
    if tag == "int" and type(body) is str:
        return int(body, 16)
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    raise ValueError(f"not plain data: {tag!r}")


def send(fd: int, message: list) -> None:
    """One message: 4-byte length, then JSON. SIGALRM waits meanwhile: a half-written message would
    leave the parent reading garbage instead of our `timed out`."""
    import json

    data = json.dumps(message).encode()
    data = len(data).to_bytes(4, "big") + data
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


def receive(fd: int) -> list | None:
    """One message, or None at the end of the channel."""
    import json

    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = os.read(fd, n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    header = exactly(4)
    size = int.from_bytes(header, "big") if header else 0
    body = exactly(size) if header and size <= _MESSAGE_LIMIT else None
    return json.loads(body) if body else None


# --- running the program and answering calls -----------------------------------------------------
class Timeout(BaseException):
    pass


def _short(e: BaseException) -> str:
    """The exception's type and a one-line message; str() runs the program's code, so it may fail."""
    reason = type(e).__name__
    try:
        message = " ".join(str(e).split())[:200]
        reason += f": {message}" if message else ""
    except BaseException:  # noqa: B036
        pass
    return reason


def define(program: str, namespace: dict) -> list:
    """Run the program (its definitions, and anything at its top level): the outcome as a message."""
    try:
        exec(compile(program, "<candidate>", "exec"), namespace)
    except Timeout as e:
        return ["timed out", str(e)]
    except BaseException as e:  # noqa: B036 -- SystemExit and KeyboardInterrupt are failures too
        return ["failed", _short(e)]
    return ["defined"]


def serve(fd: int, namespace: dict) -> None:
    """Answer `["call", name, args]` requests until the parent closes the channel.

    A program that ran to its end may have left anything in the namespace; only what the parent asks
    for by name is called, with arguments rebuilt from plain data.
    """
    while (request := receive(fd)) is not None:
        try:
            function = namespace[request[1]]
            value = function(*[from_wire(a) for a in request[2]])
            reply = ["ok", to_wire(value)]
        except Timeout as e:
            send(fd, ["timed out", str(e)])
            return
        except BaseException as e:  # noqa: B036
            reply = ["raise", type(e).__name__, _short(e)]
        send(fd, reply)


def start_alarm(timeout: float) -> None:
    """One wall-clock alarm for the whole run (definitions and every call), as in OpenAI's harness."""
    def on_alarm(signum, frame):
        raise Timeout(f"timed out after {timeout:g} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)


def main() -> None:
    channel, timeout = int(sys.argv[1]), float(sys.argv[2])
    memory_mb, max_file_mb, require, cgroup = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
    program = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)  # the stdin pipe could be reopened for writing through /proc/self/fd/0
    os.close(null)
    work = os.path.realpath(os.getcwd())
    set_rlimits(timeout, memory_mb, max_file_mb)
    in_force = confine(work, max_file_mb, cgroup if cgroup != "-" else "")
    isolation = " + ".join(in_force) or "audit hook only"
    send(channel, ["isolation", isolation])
    install_audit_hook(work, count_files="tmpfs quota" not in in_force)
    missing = [need for need in REQUIRED if need not in isolation] if require == "1" else []
    if missing:
        send(channel, ["refused", f"sandbox: kernel isolation required but {', '.join(missing)} "
                                  f"not in force ({isolation})"])
        os._exit(0)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        start_alarm(timeout)
        send(channel, define(program, namespace))
        serve(channel, namespace)
    except Timeout as e:  # between calls, while the parent was running its part of the tests
        send(channel, ["timed out", str(e)])
    except BaseException:  # noqa: B036 -- the channel broke: the parent is gone or gave up
        pass
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:  # noqa: S110, B036 -- a program that broke its streams loses its output
            pass
    os._exit(0)  # no atexit handlers or __del__ of the program after the last message


if __name__ == "__main__":
    main()
