"""data/sandbox.py and the code grader under attack: each program is contained and scored 0.

The attacks bypass the in-process guard on purpose (`import posix` instead of `os`): they test the
process and rlimit boundary. Attacks that only a separate uid can stop (signalling the parent,
deleting the parent's files, reading its /proc environ, killing setsid() escapees) need the root
path of the sandbox, which is how it runs here; as a non-root user they are skipped (see the
sandbox docstring for what is and is not isolated then).
"""
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from data.graders.code import grade
from data.sandbox import OUTPUT_KEPT, SANDBOX_UIDS, Limits, run_program

LIMITS = Limits(timeout_s=2.0)
HARD_WALL_S = 60  # a broken sandbox fails the test instead of hanging the suite
# A HumanEval-shaped task: the right body is `return x + 1`.
TASK = {"prompt": "def f(x):\n", "test": "def check(candidate):\n    assert candidate(1) == 2\n", "entry_point": "f"}
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="uid separation is only used when the grader runs as root")


def bounded(fn, *args):
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args).result(timeout=HARD_WALL_S)
    finally:
        pool.shutdown(wait=False)


def sandbox_processes() -> list[int]:
    """Pids of live processes running under any sandbox uid."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) in SANDBOX_UIDS and not fields["State"].strip().startswith("Z"):
            pids.append(int(pid))
    return pids


def test_correct_and_wrong_programs():
    assert bounded(grade, "    return x + 1\n", TASK, LIMITS).score == 1.0
    wrong = bounded(grade, "    return x\n", TASK, LIMITS)
    assert wrong.score == 0.0 and "AssertionError" in wrong.note


@pytest.mark.parametrize("body, note", [
    ("    return 0\nimport sys\nsys.exit(0)\n", "failed: exit status 0"),      # exits 0 before the asserts
    ("    return 0\nimport os\nos._exit(0)\n", "failed: exit status 0"),            # the guard leaves os._exit
    ("    return 0\nimport posix\nposix._exit(0)\n", "failed: exit status 0"),
    ("    while True:\n        pass\n", "timed out"),
    ("    return x + 1\nx = bytearray(16 << 30)\n", "failed: MemoryError"),  # 16 GB
])
def test_attacks_score_zero(body, note):
    start = time.perf_counter()
    result = bounded(grade, body, TASK, LIMITS)
    assert result.score == 0.0 and result.note == note
    assert time.perf_counter() - start < LIMITS.timeout_s + 10


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_gigabyte_of_output_is_capped(stream):
    source = f"import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.{stream}.write(chunk)\n"
    result = bounded(run_program, source, LIMITS)
    assert not result.completed and result.returncode != 0  # RLIMIT_FSIZE stopped the writes
    if stream == "stdout":  # (a full stderr cannot take the traceback)
        assert "File too large" in result.stderr
    assert len(result.stdout) <= OUTPUT_KEPT and len(result.stderr) <= OUTPUT_KEPT


def test_child_runs_under_the_rlimits_with_stdin_closed():
    """The kernel's view from inside the program: the four rlimits (hard = soft) and an empty stdin."""
    limits = Limits(timeout_s=2.5, memory_bytes=3 << 30, max_processes=20, max_file_bytes=5 << 20)
    source = ("import resource, sys\n"
              "for name in ('CPU', 'AS', 'NPROC', 'FSIZE'):\n"
              "    print(*resource.getrlimit(getattr(resource, 'RLIMIT_' + name)))\n"
              "print(repr(sys.stdin.read()))\n")
    result = bounded(run_program, source, limits)
    assert result.completed, result.stderr
    cpu_s = 4  # the wall limit rounded up, plus 1 s
    assert result.stdout.split("\n")[:5] == [f"{cpu_s} {cpu_s}", f"{3 << 30} {3 << 30}", "20 20",
                                               f"{5 << 20} {5 << 20}", "''"]


@as_root
def test_fork_bomb_is_capped_and_cleaned_up():
    # Each child leaves the process group (setsid) and sleeps; the parent counts its forks until
    # RLIMIT_NPROC refuses, prints the count and the children's pids, then spins until the timeout.
    source = (
        "import posix, time\n"
        "children = []\n"
        "for _ in range(1000):\n"
        "    try:\n"
        "        pid = posix.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        posix.setsid()\n"
        "        time.sleep(60)\n"
        "        posix._exit(0)\n"
        "    children.append(pid)\n"
        "print(len(children), *children, flush=True)\n"
        "while True:\n"
        "    pass\n"
    )
    limits = Limits(timeout_s=2.0, max_processes=16)
    result = bounded(run_program, source, limits)
    forks, *children = map(int, result.stdout.split())
    assert result.timed_out and not result.completed
    assert 0 < forks < limits.max_processes  # the program itself is one of the 16
    assert not set(children) & set(sandbox_processes())  # setsid() escapees were killed too


@as_root
def test_cannot_kill_parent_or_delete_its_files():
    # The canary's directory is world-readable, so the program reaches and reads the file: only the
    # separate uid (no write permission on the directory) stops the unlink.
    shared = Path(tempfile.mkdtemp())
    try:
        shared.chmod(0o755)
        canary = shared / "canary.txt"
        canary.write_text("alive")
        source = (f"import posix\nprint(open({str(canary)!r}).read())\n"
                  f"try:\n    posix.unlink({str(canary)!r})\nexcept OSError as e:\n    print(type(e).__name__)\n"
                  "posix.kill(posix.getppid(), 9)\n")
        result = bounded(run_program, source, LIMITS)
        assert not result.completed and "PermissionError" in result.stderr  # the kill was refused
        assert result.stdout.split() == ["alive", "PermissionError"]
        assert canary.read_text() == "alive"  # and this process is still here to check it
    finally:
        shutil.rmtree(shared)


def test_parent_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("SRLM_TEST_SECRET", "hunter2")
    result = bounded(run_program, "import os\nprint(sorted(os.environ))\nprint(os.environ.get('SRLM_TEST_SECRET'))\n", LIMITS)
    assert result.completed and "hunter2" not in result.stdout
    assert result.stdout.splitlines()[:2] == ["['HOME', 'LANG', 'PATH']", "None"]


@as_root
def test_parent_environment_is_not_readable_through_proc():
    result = bounded(run_program, "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())\n", LIMITS)
    assert not result.completed and "PermissionError" in result.stderr


def test_guard_and_working_directory():
    source = ("import os\n"
              "assert os.kill is None and os.fork is None and os.remove is None and os.system is None\n"
              "assert __name__ == '__main__' and os.path.basename(__file__) == 'program.py'\n"
              "assert os.getcwd() == os.environ['HOME'] and 'program.py' in os.listdir('.')\n"
              "print(os.getcwd())\n")
    result = bounded(run_program, source, LIMITS)
    assert result.completed, result.stderr
    assert not os.path.exists(result.stdout.split()[0])  # the temporary directory was removed
