"""The code grader against completions written to collect reward without solving the task.

Each attack runs as the completion of many tasks (all 164 HumanEval tasks for the reported attack
classes, every 8th task for the others, and the 49 synthetic code tasks) and must score exactly 0,
with no hang, no secret of the grader's environment in any output, no file left in /tmp, /dev/shm
or /var/tmp, and the grader's own process unharmed (same fds, no sandbox process left behind).
Attacks that only namespace isolation can stop are skipped, with the reason, where it is unavailable.
"""
import os
import secrets
import socket
import tempfile
import threading
from pathlib import Path

import pytest
from test_sandbox import bounded, sandbox_processes

from data import sandbox
from data.graders.code import extract_code
from data.readers import load_humaneval
from data.sandbox import CheckResult, Limits, in_parallel, run_check, run_program
from data.sandbox_child import encode
from data.synthetic import code_specs, make_code_tasks

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HUMANEVAL = SHARED_DATA / "humaneval" / "HumanEval.jsonl.gz"
LIMITS = Limits(timeout_s=3.0)
SWEEP_WALL_S = 600  # a hard wall for one sweep of 164 tasks on two busy cores
MARKER = f"srlm-attack-{secrets.token_hex(4)}"  # in the name of every file an attack tries to leave behind
SECRET = f"grader-secret-{secrets.token_hex(8)}"
isolated = pytest.mark.skipif(sandbox.isolation() == "none", reason=(
    "no namespace isolation here (needs root with CAP_SYS_ADMIN or unprivileged user namespaces): "
    "the network, /tmp and the filesystem are shared with the sandbox"))


@pytest.fixture(scope="module")
def humaneval() -> list[dict]:
    if not HUMANEVAL.exists():
        pytest.skip(f"real benchmark file {HUMANEVAL} not found (../shared/data is absent in a fresh clone)")
    return [row["reference"] for row in load_humaneval(HUMANEVAL)]


@pytest.fixture(scope="module")
def synthetic() -> list[dict]:
    return make_code_tasks(seed=0, n=len(code_specs()))


@pytest.fixture(autouse=True)
def grader_secret(monkeypatch):
    monkeypatch.setenv("SRLM_GRADER_SECRET", SECRET)


def check_all(completion: str, tasks: list[dict]) -> list[CheckResult]:
    """Grade `completion` on every task, as the code grader does, under a hard wall."""
    def one(task):
        return run_check(task["prompt"], extract_code(completion) + "\n", task["test"], task["entry_point"], LIMITS)
    return bounded(lambda: in_parallel(one, tasks), timeout=SWEEP_WALL_S)


def assert_contained(results: list[CheckResult]):
    """Score 0 everywhere, no secret in any output, nothing left behind, no sandbox process alive."""
    passed = [r.note for r in results if r.passed]
    assert passed == [], f"{len(passed)} of {len(results)} passed"
    for result in results:
        assert SECRET not in result.note + result.stdout + result.stderr
    assert leftovers() == []
    assert sandbox_processes() == []


def leftovers() -> list[str]:
    """Files named with MARKER in /tmp, /dev/shm or /var/tmp (two levels deep)."""
    found = []
    for top in ("/tmp", "/dev/shm", "/var/tmp"):
        for path in [Path(top), *Path(top).glob("*/")]:
            try:
                found += [str(p) for p in path.iterdir() if MARKER in p.name]
            except OSError:
                continue
    return found


# ---- 1. results that lie about equality

LYING_RESULTS = {
    "always equal": "    class _A:\n        def __eq__(s, o): return True\n        def __ne__(s, o): return False\n"
                    "        def __hash__(s): return 0\n    return _A()\n",
    "str subclass": "    class S(str):\n        def __eq__(s, o): return True\n        __hash__ = str.__hash__\n"
                    "    return S('\\x00')\n",
    "int subclass": "    class I(int):\n        def __eq__(s, o): return True\n        def __lt__(s, o): return True\n"
                    "        def __abs__(s): return 0\n        def __sub__(s, o): return I(0)\n"
                    "        __rsub__ = __sub__\n        __hash__ = int.__hash__\n    return I(-7777777)\n",
    "list subclass": "    class L(list):\n        def __eq__(s, o): return True\n    return L([None])\n",
    "float subclass": "    class F(float):\n        def __eq__(s, o): return True\n        def __lt__(s, o): return True\n"
                      "        def __abs__(s): return F(0)\n        def __sub__(s, o): return F(0)\n"
                      "        __rsub__ = __sub__\n        __hash__ = float.__hash__\n    return F(-7777777.5)\n",
}


def test_lying_result_objects_score_zero_on_all_humaneval_and_synthetic_tasks(humaneval, synthetic):
    assert_contained(check_all(LYING_RESULTS["always equal"], humaneval + synthetic))


@pytest.mark.parametrize("name", [name for name in LYING_RESULTS if name != "always equal"])
def test_lying_builtin_subclasses_score_zero(name, humaneval, synthetic):
    assert_contained(check_all(LYING_RESULTS[name], humaneval[::8] + synthetic))


# ---- 2. forging the success signal

FORGED_SIGNALS = {
    # print every 32-hex-digit token of its own source and of the running frames' constants, exit 0
    "nonce from source and frames": (
        "    return None\nimport re, sys, posix\n"
        "text = open(__file__).read()\n"
        "frame = sys._getframe()\n"
        "while frame:\n"
        "    text += repr(frame.f_code.co_consts)\n"
        "    frame = frame.f_back\n"
        "for token in set(re.findall(r'[0-9a-f]{32}', text)):\n"
        "    print(token, flush=True)\n"
        "print('passed', flush=True)\n"
        "posix._exit(0)\n"),
    "excepthook prints the nonce": (
        "    raise ValueError('wrong')\nimport re, sys, posix\n"
        "def hook(*exc):\n"
        "    print(*set(re.findall(r'[0-9a-f]{32}', open(__file__).read())), flush=True)\n"
        "    posix._exit(0)\n"
        "sys.excepthook = hook\n"),
    # in check(), jump from each assert to the next line that is no assert, or a harmless `assert True`
    "settrace jumps over asserts": (
        "    return None\nimport linecache, sys\n"
        "def harmless(frame, line):\n"
        "    text = linecache.getline(frame.f_code.co_filename, line).strip()\n"
        "    return not text.startswith('assert') or text.startswith('assert True')\n"
        "def tracer(frame, event, arg):\n"
        "    if event == 'line' and frame.f_code.co_name == 'check' and not harmless(frame, frame.f_lineno):\n"
        "        for line in sorted({n for _, _, n in frame.f_code.co_lines() if n and n > frame.f_lineno}):\n"
        "            if harmless(frame, line):\n"
        "                try:\n"
        "                    frame.f_lineno = line\n"
        "                    break\n"
        "                except ValueError:\n"
        "                    pass\n"
        "    return tracer\n"
        "sys.settrace(tracer)\n"),
    # write what a verdict and a reply look like to every fd it can reach, stdout and stderr included
    "fake verdicts on every fd": (
        "    import posix\n"
        f"    for message in ({encode(('passed',))!r}, {encode(('return', True))!r}, b'passed\\n'):\n"
        "        for fd in range(1, 256):\n"
        "            try:\n"
        "                posix.write(fd, message)\n"
        "            except OSError:\n"
        "                pass\n"
        "    posix._exit(0)\n"),
}


@pytest.mark.parametrize("name", FORGED_SIGNALS)
def test_forged_success_signals_score_zero(name, humaneval, synthetic):
    tasks = humaneval + synthetic if name == "nonce from source and frames" else humaneval[::8] + synthetic
    assert_contained(check_all(FORGED_SIGNALS[name], tasks))


# Look for the test's asserts (`candidate(args) == expected`) wherever the program can read: its own
# file, its frames, the benchmark files. In a harness that runs the check in the candidate's process,
# the check's source is in the program file and this passes every synthetic task.
ANSWER_KEY = (
    "    wanted = ', '.join(map(repr, list(locals().values())))  # the arguments, as the check's source spells them\n"
    "    import ast, glob, gzip, re, sys\n"
    "    texts = [open(__file__).read()]\n"
    "    frame = sys._getframe()\n"
    "    while frame:\n"
    "        texts.append(repr(frame.f_code.co_consts))\n"
    "        frame = frame.f_back\n"
    "    for path in glob.glob('/work*/**/*.jsonl*', recursive=True):\n"
    "        try:\n"
    "            texts.append((gzip.open if path.endswith('.gz') else open)(path, 'rt').read())\n"
    "        except Exception:\n"
    "            pass\n"
    "    for text in texts:\n"
    "        for found in re.finditer(r'candidate\\((.*?)\\) == (.+)', text.replace('\\\\n', '\\n')):\n"
    "            if found.group(1) == wanted:\n"
    "                try:\n"
    "                    return ast.literal_eval(found.group(2).strip())\n"
    "                except Exception:\n"
    "                    pass\n"
    "    return None\n")


def test_answer_key_attack_scores_zero(humaneval, synthetic):
    assert_contained(check_all(ANSWER_KEY, humaneval + synthetic))


@isolated
def test_benchmark_and_project_files_are_not_visible():
    """Not to the sandboxed program: the canonical solutions, the checkout, the shared data."""
    paths = [str(HUMANEVAL), str(Path(__file__).resolve()), str(SHARED_DATA), "/root", "/home", "/proc"]
    result = bounded(run_program, f"import os\nprint([os.path.exists(p) for p in {paths!r}])\n", LIMITS)
    assert result.completed, result.stderr
    assert result.stdout.strip() == str([False] * len(paths))


# ---- 3. the grader reads nothing the program planted

PLANTED = (
    "    return None\nimport posix\n"
    "for name, target in (('stdout', '/proc/self/environ'), ('stderr', '/dev/zero'), ('out', '/proc/1/environ')):\n"
    "    try:\n"
    "        posix.symlink(target, name)\n"
    "    except OSError:\n"
    "        pass\n"
    "for name in ('fifo', 'verdict'):\n"
    "    posix.mkfifo(name)\n")


def test_planted_symlinks_and_fifos_change_nothing(humaneval, synthetic):
    results = check_all(PLANTED, humaneval[::8] + synthetic)
    assert_contained(results)
    assert all(not r.timed_out for r in results)  # a FIFO the grader opened would hang it until the timeout


# ---- 4. reach beyond the scratch directory

LEAVE_FILES = (
    "    return None\nimport posix\n"
    "for top in ('/tmp', '/dev/shm', '/var/tmp', '.'):\n"
    "    try:\n"
    f"        with open(top + '/{MARKER}', 'w') as f:\n"
    "            f.write('x' * 1000)\n"
    "    except OSError:\n"
    "        pass\n")


def test_files_written_anywhere_are_gone_afterwards(humaneval, synthetic):
    assert_contained(check_all(LEAVE_FILES, humaneval[::8] + synthetic))


@isolated
def test_disk_is_capped():
    source = ("import os\nwritten = 0\ntry:\n    for i in range(1000):\n"
              "        with open(f'/tmp/{i}', 'wb') as f:\n            f.write(b'x' * (1 << 20))\n"
              "        written += 1\nexcept OSError as error:\n    print(written, error.strerror)\n")
    limits = Limits(timeout_s=5.0, max_file_bytes=2 << 20, disk_bytes=16 << 20)
    result = bounded(run_program, source, limits)
    written, why = result.stdout.split(maxsplit=1)
    assert int(written) < 16 and why.strip() == "No space left on device"


@isolated
def test_loopback_listener_receives_nothing(synthetic):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        received = []
        stop = threading.Event()

        def accept():
            while not stop.is_set():
                try:
                    connection, _ = listener.accept()
                except OSError:
                    continue
                with connection:
                    received.append(connection.recv(100))
        thread = threading.Thread(target=accept)
        thread.start()
        attack = ("    import socket\n    try:\n"
                  f"        socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'{MARKER}')\n"
                  "    except OSError as error:\n        print(error)\n")
        try:
            results = check_all(attack, synthetic[:8])
        finally:
            stop.set()
            thread.join()
    assert_contained(results)
    assert received == []
    assert all("unreachable" in r.stdout for r in results)
