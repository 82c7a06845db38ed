"""data/sandbox.py and the code grader under attack: each program is contained and scored 0.

The attacks bypass the in-process guard on purpose (`import posix` instead of `os`): they test the
process and rlimit boundary. Each test runs in every isolation mode that works here (the `mode`
fixture), "none" included, the fallback where namespaces are unavailable. Attacks that only a
separate uid can stop (signalling the parent, deleting the parent's files, reading its /proc
environ) need the root path of the sandbox, which is how it runs here; as a non-root user they are
skipped (see the sandbox docstring for what is and is not isolated then).
"""
import fcntl
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from data import sandbox
from data.graders.code import grade
from data.sandbox import OUTPUT_KEPT, SANDBOX_UIDS, Limits, run_program, uid_lock_path

LIMITS = Limits(timeout_s=2.0)
HARD_WALL_S = 60  # a broken sandbox fails the test instead of hanging the suite
# A HumanEval-shaped task: the right body is `return x + 1`.
TASK = {"prompt": "def f(x):\n", "test": "def check(candidate):\n    assert candidate(1) == 2\n", "entry_point": "f"}
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="uid separation is only used when the grader runs as root")
MODES = [mode for mode in ("root", "userns") if sandbox.isolation_works(mode)] + ["none"]


@pytest.fixture(params=MODES)
def mode(request, monkeypatch) -> str:
    """Run the test with the sandbox in each isolation mode that works here."""
    monkeypatch.setattr(sandbox, "isolation", lambda: request.param)
    return request.param


@pytest.fixture
def private_tmp(monkeypatch) -> Path:
    """A temporary directory for the sandbox's working directories alone, to see that all are removed."""
    path = Path(tempfile.mkdtemp())
    path.chmod(0o755)  # the sandbox uids must reach their directories in it
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    yield path
    shutil.rmtree(path)


def bounded(fn, *args, timeout: float = HARD_WALL_S):
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args).result(timeout=timeout)
    finally:
        pool.shutdown(wait=False)


def sandbox_processes() -> list[int]:
    """Pids of live processes under a sandbox uid that no grader holds (another grader on this
    machine, e.g. a concurrent test run, may be using some uids right now)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields["Uid"].split()[0])
        if uid in SANDBOX_UIDS and not fields["State"].strip().startswith("Z") and not held_by_a_grader(uid):
            pids.append(int(pid))
    return pids


def held_by_a_grader(uid: int) -> bool:
    try:
        lock = os.open(uid_lock_path(uid), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(lock)


def test_correct_and_wrong_programs(mode):
    assert bounded(grade, "    return x + 1\n", TASK, LIMITS).score == 1.0
    wrong = bounded(grade, "    return x\n", TASK, LIMITS)
    assert wrong.score == 0.0 and "AssertionError" in wrong.note


EXITED = "failed: the candidate process exited with status 0"


@pytest.mark.parametrize("body, note", [
    ("    return 0\nimport sys\nsys.exit(0)\n", EXITED),      # exits 0 before the asserts
    ("    return 0\nimport os\nos._exit(0)\n", EXITED),            # the guard leaves os._exit
    ("    return 0\nimport posix\nposix._exit(0)\n", EXITED),
    ("    import posix\n    posix._exit(0)\n", EXITED),          # in the middle of the check's call
    ("    while True:\n        pass\n", "timed out"),
    ("    return x + 1\nx = bytearray(16 << 30)\n", "failed: MemoryError"),  # 16 GB
])
def test_attacks_score_zero(body, note, mode):
    start = time.perf_counter()
    result = bounded(grade, body, TASK, LIMITS)
    assert result.score == 0.0 and result.note == note
    assert time.perf_counter() - start < LIMITS.timeout_s + 10


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_gigabyte_of_output_is_capped(stream, mode):
    source = f"import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.{stream}.write(chunk)\n"
    start = time.perf_counter()
    result = bounded(run_program, source, LIMITS)
    assert result.output_exceeded and not result.completed and result.returncode == -9  # killed past the cap
    assert time.perf_counter() - start < LIMITS.timeout_s  # well before the timeout
    assert len(result.stdout) <= OUTPUT_KEPT and len(result.stderr) <= OUTPUT_KEPT


def test_file_size_is_capped(mode):
    source = "with open('big', 'wb') as f:\n    f.write(b'x' * (2 << 20))\n"
    result = bounded(run_program, source, LIMITS)
    assert not result.completed and "File too large" in result.stderr


def test_child_runs_under_the_rlimits_with_stdin_closed(mode):
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
def test_fork_bomb_is_capped_and_cleaned_up(mode):
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
    assert sandbox_processes() == []  # setsid() escapees were killed too


@as_root
def test_cannot_kill_parent_or_delete_its_files(monkeypatch):
    # The canary's directory is world-readable, so without namespaces the program reaches and reads
    # the file: only the separate uid (no write permission on the directory) stops the unlink.
    monkeypatch.setattr(sandbox, "isolation", lambda: "none")
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


def test_parent_environment_is_not_inherited(monkeypatch, mode):
    monkeypatch.setenv("SRLM_TEST_SECRET", "hunter2")
    source = "import os\nprint(sorted(os.environ))\nprint(os.environ.get('SRLM_TEST_SECRET'))\n"
    result = bounded(run_program, source, LIMITS)
    assert result.completed and "hunter2" not in result.stdout
    assert result.stdout.splitlines()[:2] == ["['HOME', 'LANG', 'PATH']", "None"]


@as_root
def test_parent_environment_is_not_readable_through_proc(mode):
    # isolated, there is no /proc at all; otherwise the grader's /proc files belong to another uid
    result = bounded(run_program, f"import os\nprint(open('/proc/{os.getpid()}/environ').read())\n", LIMITS)
    error = "PermissionError" if mode == "none" else "FileNotFoundError"
    assert not result.completed and error in result.stderr


def test_guard_and_working_directory(mode, private_tmp):
    source = ("import os\n"
              "assert os.kill is None and os.fork is None and os.remove is None and os.system is None\n"
              "assert __name__ == '__main__' and os.path.basename(__file__) == 'program.py'\n"
              "assert os.getcwd() == os.environ['HOME'] and 'program.py' in os.listdir('.')\n"
              "open('left-behind', 'w').close()\n")
    result = bounded(run_program, source, LIMITS)
    assert result.completed, result.stderr
    assert list(private_tmp.iterdir()) == []  # the working directory was removed
