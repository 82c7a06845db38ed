"""Run untrusted, model-written Python programs in separate, resource-limited processes.

Each program runs in its own Python subprocess (never `exec` in the caller), started with `-I`
(isolated mode: no user site, no PYTHON* variables) and a short BOOTSTRAP that applies the limits:
  * wall-clock timeout; on expiry the whole process group is SIGKILLed;
  * rlimits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE, which
    also caps its stdout/stderr: both go to files in its directory), process count (RLIMIT_NPROC);
  * a fresh temporary working directory, removed afterwards; closed stdin; an environment that
    holds only PATH/LANG/HOME, so none of the parent's variables (tokens, keys) leak in;
  * a light "reliability guard" (after HumanEval's): os.kill, os.fork, os.system, os.remove ...
    are set to None, which also disables shutil.rmtree. Defence in depth only: `import posix` or
    `subprocess` get around it. The process and rlimit isolation is the boundary.

Root. Linux never applies RLIMIT_NPROC to uid 0, and a root child could signal its parent, read
its /proc/<pid>/environ or delete any file. So when the grader runs as root, each program runs
under its own unprivileged uid from a pool (SANDBOX_UIDS, minus uids that name real accounts):
the process-count limit then holds, and the program cannot touch root's files or processes. After
the run every live process of that uid is SIGKILLed, which also catches children that left the
process group with setsid(). The unprivileged uid may not be able to reach the grader's own
interpreter (e.g. under /root, mode 700), so the programs then run on the first python3 on
SYSTEM_PATH that every user can execute (standard library only, maybe another Python version).
As a non-root user, programs run as that user: RLIMIT_NPROC counts all of the user's processes
(so it still caps a fork bomb), but only the guard stands between a determined program and the
user's files and processes, and cleanup is the process-group kill.

Passing. Exit status 0 alone proves nothing: `sys.exit(0)` or `os._exit(0)` before the asserts
also exits 0. `run_program` therefore appends a line that prints a random per-run nonce and counts
the program as `completed` only when it exits 0 AND the nonce is on its stdout, i.e. execution
reached the last line. A program that deliberately reads its own source could still print the
nonce; this guards against early exits, not against a model written to cheat the checker.
"""
import functools
import math
import os
import pwd
import queue
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
SANDBOX_UIDS = range(64000, 64256)  # a block below 65534 (nobody) so it exists in user namespaces
OUTPUT_KEPT = 4096  # characters of stdout/stderr kept in a SandboxResult

# Runs inside the child before the program: lower the rlimits (hard = soft, so the program cannot
# raise them again), disable the dangerous os helpers, then run the program as __main__. Only
# modules the interpreter has already loaded are touched: importing more (runpy, subprocess, shutil)
# would double the start-up time of every program.
BOOTSTRAP = """
import os, resource, sys
path, cpu, memory, nproc, fsize = sys.argv[1], *map(int, sys.argv[2:])
for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory),
                     (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_FSIZE, fsize)):
    resource.setrlimit(limit, (value, value))
for name in ("kill", "killpg", "fork", "forkpty", "system", "popen", "execv", "execve", "spawnv", "putenv",
             "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
             "chmod", "chown", "setuid"):
    setattr(os, name, None)
sys.argv = [path]
with open(path) as f:
    code = compile(f.read(), path, "exec")
exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
"""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0           # wall clock (HumanEval's slowest canonical solution: ~1 s under load;
                                     # its harness uses 3 s); the CPU-time limit is this rounded up, plus 1 s
    memory_bytes: int = 2 << 30      # address space (RLIMIT_AS)
    max_processes: int = 32          # RLIMIT_NPROC (threads count too)
    max_file_bytes: int = 1 << 20    # any file it writes, stdout and stderr included


@dataclass(frozen=True)
class SandboxResult:
    completed: bool      # exit status 0 and the end-of-program nonce printed
    returncode: int      # negative: killed by that signal
    timed_out: bool
    stdout: str          # first OUTPUT_KEPT characters
    stderr: str          # last OUTPUT_KEPT characters (where the traceback is)
    wall_s: float


def _world_executable(path: str) -> bool:
    """True when every user may execute `path` (o+x on it and o+x on each parent directory)."""
    path = Path(path).resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


@functools.cache
def _find_interpreter() -> str:
    """The interpreter for sandboxed programs (see the module docstring: the root case).

    As root, also checks that the sandbox uids can reach the temporary directory: otherwise every
    program would fail to start and score 0 without a word.
    """
    if os.geteuid() != 0:
        return sys.executable
    if not _world_executable(tempfile.gettempdir()):
        raise RuntimeError(f"running as root, the sandbox needs a temporary directory every user can enter; "
                           f"{tempfile.gettempdir()} is not (set TMPDIR, e.g. to /tmp)")
    for candidate in [sys.executable] + [os.path.join(d, "python3") for d in SYSTEM_PATH.split(":")]:
        if os.path.exists(candidate) and _world_executable(candidate):
            return candidate
    raise RuntimeError(f"running as root, the sandbox needs a python3 every user can execute on "
                       f"{SYSTEM_PATH}; {sys.executable} is not (a parent directory lacks o+x)")


def _free_uids() -> queue.SimpleQueue:
    """The sandbox uids that name no real account. First in, first out: a uid comes back into use
    only after all the others, long after the zombies of its last program have been reaped."""
    free = queue.SimpleQueue()
    for uid in SANDBOX_UIDS:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            free.put(uid)
    return free


FREE_UIDS = _free_uids() if os.geteuid() == 0 else None


def _live_uid(pid: int) -> int | None:
    """Real uid of a running process; None once it has exited or is a zombie waiting to be reaped."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return None if fields["State"].strip().startswith("Z") else int(fields["Uid"].split()[0])


def _kill_uid(uid: int):
    """SIGKILL every process of `uid`, including ones that left the process group (setsid).

    A pidfd pins the process before its uid is checked, so a pid recycled between the /proc scan
    and the kill never takes the signal. Repeats until a fork bomb has nothing left.
    """
    while pids := [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _live_uid(pid) == uid]:
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                if _live_uid(pid) == uid:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            finally:
                os.close(pidfd)
        time.sleep(0.005)


def run_program(source: str, limits: Limits = Limits()) -> SandboxResult:
    """Run `source` as a fresh program under `limits` (see the module docstring)."""
    interpreter = _find_interpreter()
    uid = FREE_UIDS.get() if FREE_UIDS is not None else None
    workdir = Path(tempfile.mkdtemp(prefix="srlm-sandbox-"))
    try:
        return _run_in(workdir, source, limits, interpreter, uid)
    finally:
        if uid is not None:
            _kill_uid(uid)
            FREE_UIDS.put(uid)
        shutil.rmtree(workdir, ignore_errors=True)


def _run_in(workdir: Path, source: str, limits: Limits, interpreter: str, uid: int | None) -> SandboxResult:
    nonce = secrets.token_hex(16)
    program = workdir / "program.py"
    program.write_text(f"{source}\n\nprint({nonce!r}, flush=True)\n")
    if uid is not None:
        for path in (workdir, program):
            os.chown(path, uid, uid)
    cpu_s = math.ceil(limits.timeout_s) + 1
    argv = [interpreter, "-I", "-c", BOOTSTRAP, str(program), str(cpu_s), str(limits.memory_bytes),
            str(limits.max_processes), str(limits.max_file_bytes)]
    user = dict(user=uid, group=uid, extra_groups=[]) if uid is not None else {}
    start = time.perf_counter()
    with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
        process = subprocess.Popen(argv, cwd=workdir, env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": str(workdir)},
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True, **user)
        try:
            process.wait(timeout=limits.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(process.pid)
            process.wait()
    stdout, stderr = ((workdir / name).read_bytes().decode("utf-8", errors="replace") for name in ("stdout", "stderr"))
    completed = not timed_out and process.returncode == 0 and nonce in stdout
    return SandboxResult(completed=completed, returncode=process.returncode, timed_out=timed_out,
                         stdout=stdout.replace(nonce, "")[:OUTPUT_KEPT], stderr=stderr[-OUTPUT_KEPT:],
                         wall_s=time.perf_counter() - start)


def _kill_group(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group has already exited
        pass


def default_workers() -> int:
    """Two programs per core: each spends part of its life starting up and being cleaned up."""
    return 2 * (os.cpu_count() or 1)


def run_many(sources: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[SandboxResult]:
    """run_program over many sources, `workers` at a time (default: default_workers()), in input order.

    Threads suffice: each only waits on its subprocess.
    """
    workers = workers or default_workers()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda source: run_program(source, limits), sources))
