"""The sandbox contains what model-written code does by accident: loops, memory, processes, files, network.

Every hostile program runs in one `run_programs` call (2 workers) so the suite pays the slowest
one, not the sum. Where a program would leave a trace (a file, a connection), the test looks for it.
"""

from __future__ import annotations

import socket
import time

import pytest

from minicodeparrot.sandbox import FAILED, PASSED, TIMED_OUT, run_program, run_programs

TIMEOUT = 1.0


def _programs(tmp: str, port: int) -> dict[str, str]:
    return {
        "ok": "def f(x):\n    return x + 1\nassert f(1) == 2\nimport math, hashlib, collections\n",
        "wrong": "assert 1 + 1 == 3, 'arithmetic'\n",
        "syntax": "def f(:\n",
        "infinite_loop": "while True:\n    pass\n",
        "sleep": "import time\ntime.sleep(60)\n",
        # Swallows our alarm: only the parent's process-group kill ends it.
        "ignores_alarm": "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True: pass\n",
        "huge_allocation": "x = bytearray(16 * 1024 ** 3)\n",
        # bytes(n) is calloc'd: pages stay untouched, so only the limit stops it (and fast).
        "growing_list": "x = []\nwhile True:\n    x.append(bytes(10 ** 8))\n",
        "os_system": f"import os\nos.system('touch {tmp}/system_marker')\n",
        "os_popen": f"import os\nos.popen('touch {tmp}/popen_marker').read()\n",
        "subprocess": f"import subprocess\nsubprocess.run(['touch', '{tmp}/subprocess_marker'])\n",
        "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
        "exec": "import os\nos.execv('/bin/true', ['true'])\n",
        "write_outside": f"with open('{tmp}/escaped.txt', 'w') as f:\n    f.write('x')\n",
        "write_outside_relative": "import os\nos.chdir('/')\nopen('tmp/escaped_rel.txt', 'w')\n",
        "os_open_outside": f"import os\nos.open('{tmp}/escaped_fd.txt', os.O_WRONLY | os.O_CREAT)\n",
        "remove_outside": f"import os\nos.remove('{tmp}/keep.txt')\n",
        "rmtree_outside": f"import shutil\nshutil.rmtree('{tmp}/keep_dir')\n",
        "write_inside": "import os\nopen('a.txt', 'w').write('x')\nos.mkdir('d')\nos.remove('a.txt')\n",
        "socket": f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
        "raw_socket": "import _socket\n_socket.socket()\n",
        "ctypes": "import ctypes\nctypes.CDLL(None).system(b'true')\n",
        "raise_limit": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
        "sys_exit_0": "import sys\nsys.exit(0)\n",
        "os_exit_0": "import os\nos._exit(0)\n",
    }


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outside")
    (tmp / "keep.txt").write_text("keep")
    (tmp / "keep_dir").mkdir()
    (tmp / "keep_dir" / "a.txt").write_text("keep")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    programs = _programs(str(tmp), server.getsockname()[1])
    start = time.perf_counter()
    results = run_programs(list(programs.values()), timeout=TIMEOUT, num_workers=2, show_progress=False)
    elapsed = time.perf_counter() - start
    try:
        server.accept()
        connected = True
    except TimeoutError:
        connected = False
    server.close()
    return {"results": dict(zip(programs, results, strict=True)), "tmp": tmp, "connected": connected,
            "elapsed": elapsed}


def test_correct_program_passes_and_wrong_ones_fail(outcome):
    r = outcome["results"]
    assert r["ok"].status == PASSED and r["ok"].reason == ""
    assert r["wrong"].status == FAILED and r["wrong"].reason == "AssertionError: arithmetic"
    assert r["syntax"].status == FAILED and r["syntax"].reason.startswith("SyntaxError")


@pytest.mark.parametrize("name", ["infinite_loop", "sleep", "ignores_alarm"])
def test_runaway_programs_time_out(outcome, name):
    r = outcome["results"][name]
    assert r.status == TIMED_OUT
    assert r.seconds < TIMEOUT + 4  # alarm at 1 s, or the group kill 2 s later, plus a busy machine


@pytest.mark.parametrize("name", ["huge_allocation", "growing_list"])
def test_memory_is_limited(outcome, name):
    r = outcome["results"][name]
    assert r.status == FAILED and "MemoryError" in r.reason


@pytest.mark.parametrize("name", ["os_system", "os_popen", "subprocess", "fork_bomb", "exec", "ctypes"])
def test_no_processes_or_native_code(outcome, name):
    r = outcome["results"][name]
    assert r.status == FAILED and ("not allowed" in r.reason), r
    assert not list(outcome["tmp"].glob("*_marker"))


@pytest.mark.parametrize("name", ["write_outside", "write_outside_relative", "os_open_outside",
                                  "remove_outside", "rmtree_outside"])
def test_no_writes_outside_the_temp_dir(outcome, name):
    r = outcome["results"][name]
    assert r.status == FAILED and "PermissionError" in r.reason and "not allowed" in r.reason, r
    tmp = outcome["tmp"]
    assert not list(tmp.glob("escaped*"))
    assert (tmp / "keep.txt").read_text() == "keep" and (tmp / "keep_dir" / "a.txt").exists()


def test_writes_inside_the_temp_dir_are_fine(outcome):
    assert outcome["results"]["write_inside"].status == PASSED


@pytest.mark.parametrize("name", ["socket", "raw_socket"])
def test_network_free(outcome, name):
    assert outcome["results"][name].status == FAILED
    assert not outcome["connected"]


def test_limits_cannot_be_raised(outcome):
    r = outcome["results"]["raise_limit"]
    assert r.status == FAILED and "resource.setrlimit" in r.reason


@pytest.mark.parametrize("name", ["sys_exit_0", "os_exit_0"])
def test_exiting_early_is_not_passing(outcome, name):
    assert outcome["results"][name].status == FAILED


def test_pool_runs_in_parallel(outcome):
    # Three programs run into the 1 s alarm or the 3 s kill; serially everything would take > 5 s.
    assert outcome["elapsed"] < 12


def test_program_sees_a_fresh_empty_cwd_and_minimal_env():
    program = (
        "import os\n"
        "assert os.listdir('.') == [], os.listdir('.')\n"
        "assert 'minicodeparrot-sandbox-' in os.getcwd()\n"
        "assert set(os.environ) <= {'PATH', 'LANG', 'LC_ALL', 'HOME', 'TMPDIR', 'LC_CTYPE'}, os.environ\n"
    )
    assert run_program(program).status == PASSED
