"""Scores that cannot be forged: the tests run in the parent, the sandbox only answers calls.

Every attempt below is what a hostile model could write to get a pass without solving the task
(HumanEval/0: are any two numbers closer than a threshold?). Judged inside the program's own
interpreter, each of them could pass; here each must fail, because what crosses to the parent is plain
data and the assertions are the parent's. Agreement with the official harness is in test_humaneval.py.
"""

from __future__ import annotations

import math

import pytest

from minicodeparrot.evaluation import humaneval
from minicodeparrot.evaluation.checker import check_completion, check_completions
from minicodeparrot.evaluation.sandbox import FAILED, PASSED
from minicodeparrot.evaluation.sandbox_child import from_wire, to_wire

# Frames of the channel protocol, as a program that read sandbox_child.py could write them itself.
_FRAME = ("import json\ndef frame(m):\n    b = json.dumps(m).encode()\n"
          "    return len(b).to_bytes(4, 'big') + b\n")
_FIND_CHANNEL = ("import os, stat\ndef is_socket(fd):\n    try:\n"
                 "        return stat.S_ISSOCK(os.fstat(fd).st_mode)\n"
                 "    except OSError:\n        return False\n"
                 "channel = next(fd for fd in range(3, 64) if is_socket(fd))\n")

ATTEMPTS = {
    # an answer that equals everything
    "always_equal": "    class Yes:\n        def __eq__(self, other):\n            return True\n"
                    "    return Yes()\n",
    "str_equal_to_all": "    class S(str):\n        def __eq__(self, other):\n            return True\n"
                        "    return S('yes')\n",
    # rewrite the child's encoder through gc, so every reply says True
    "patch_encoder": "    return False\nimport gc, types\nfor f in gc.get_objects():\n"
                     "    if type(f) is types.FunctionType and f.__name__ == 'to_wire':\n"
                     "        f.__code__ = (lambda value, depth=0: True).__code__\n",
    # patch os.write so that every message the child sends becomes a pass-looking reply
    "patch_os_write": "    return False\n" + _FRAME + "import os\nreal = os.write\n"
                      "os.write = lambda fd, data: real(fd, frame(['ok', True])) and len(data)\n",
    # write the replies before any question comes: a stream of `defined` and `ok True`
    "prewritten_replies": "    return False\n" + _FRAME + _FIND_CHANNEL
                          + "os.write(channel, frame(['defined']) + frame(['ok', True]) * 50)\n",
    # end the process, or raise SystemExit, at the top level or inside the call
    "exit_top_level": "    return False\nimport sys\nsys.exit(0)\n",
    "os_exit_in_call": "    import os\n    os._exit(0)\n",
    "system_exit_in_call": "    raise SystemExit(0)\n",
}


@pytest.fixture(scope="module")
def problem():
    return humaneval.load_problems()["HumanEval/0"]


@pytest.fixture(scope="module")
def verdicts(problem):
    tasks = [(problem, problem["canonical_solution"])] + [(problem, c) for c in ATTEMPTS.values()]
    results = check_completions(tasks, timeout=2.0, num_workers=2, show_progress=False)
    return dict(zip(["canonical", *ATTEMPTS], results, strict=True))


def test_the_canonical_solution_passes(verdicts):
    # Without this, a checker that fails everything would pass the test below.
    assert verdicts["canonical"].status == PASSED, verdicts["canonical"]


@pytest.mark.parametrize("name", list(ATTEMPTS))
def test_a_forged_pass_is_a_failure(verdicts, name):
    assert verdicts[name].status == FAILED, verdicts[name]


def test_why_the_forgeries_fail(verdicts):
    reason = "TypeError: a Yes is not plain data (raised by has_close_elements)"
    assert verdicts["always_equal"].reason == reason
    assert verdicts["str_equal_to_all"].reason.startswith("AssertionError")  # it arrived as 'yes'
    assert verdicts["patch_encoder"].reason.startswith("AssertionError")  # True where False is right
    assert "exited with status 0 before finishing" in verdicts["os_exit_in_call"].reason
    assert verdicts["exit_top_level"].reason == "SystemExit: 0"


def test_plain_data_keeps_every_type_a_test_compares():
    values = [None, True, 0, -1, 2**70, -(2**200), 1.5, -0.0, math.inf, "", "é\x00", b"\x00\xff",
              [], (), [1, (2, [3])], (1,), {1: "a", "b": (2.5, None), (1, 2): frozenset({3})}, {1, 2},
              frozenset(), bytearray(b"x")]
    for value in values:
        back = from_wire(to_wire(value))
        assert back == value and type(back) is (bytes if type(value) is bytearray else type(value)), value
    assert math.isnan(from_wire(to_wire(math.nan)))
    assert type(from_wire(to_wire(True))) is bool and type(from_wire(to_wire(1.0))) is float


def test_only_plain_data_crosses():
    class Sub(str):
        def __eq__(self, other):
            return True

    assert type(from_wire(to_wire(Sub("a")))) is str
    with pytest.raises(TypeError, match="not plain data"):
        to_wire(object())
    for forged in (["object", []], ["list", "x"], [1, 2], ["dict", [[1]]], {"a": 1}, ["tuple", [], 3]):
        with pytest.raises(ValueError, match="not plain data"):
            from_wire(forged)


def test_require_isolation_is_met_here(problem):
    # The fail-closed side is tested for real in test_sandbox.py (a child without Landlock).
    r = check_completion(problem, problem["canonical_solution"], require_isolation=True)
    assert r.status == PASSED, r
