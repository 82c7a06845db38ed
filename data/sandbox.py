"""Run untrusted, model-written Python in separate, confined processes, and grade it without trusting it.

Grading (run_check). The candidate's code and the test code run in separate processes. The
candidate process runs prompt + completion and then serves calls to the entry point. A runner
process, under another uid, runs only trusted code: the prompt's text before the entry point's def
(imports and helpers such as HumanEval/32's poly: the prompt's own, whatever the completion
redefines) and the task's test, then calls check(proxy), where the proxy sends each call's
arguments over a pipe and returns the candidate's answer. Values cross in a small tagged encoding
(data/sandbox_child.py) that the receiver decodes into exact builtin types only (None, bool, int,
float with nan/inf, complex, str, bytes, list, tuple, dict, set, frozenset), with caps on size,
depth and item count; never pickle, never eval. Exceptions cross by the name of a builtin
Exception class (StopIteration, SystemExit and unknown names arrive as a generic error), so a
check can still catch ValueError. The verdict is "check() returned normally", sent by the runner
on a pipe the candidate never holds; a candidate that dies, hangs up or sends anything malformed
fails the check, even one that catches everything. The candidate never sees the test code.

Limits of that design: arguments and results are copies, so a check that relies on the candidate
mutating its argument cannot pass (no HumanEval or synthetic task does), and a check can only pass
plain data to the candidate and get plain data back (a TypeError in the check otherwise; the
encoder sends a builtin subclass such as Counter or a namedtuple as its base type's data). Python
semantics still apply to the plain values: True == 1, and a weak test stays weak.

Every process starts with `python3 -I -c <data/sandbox_child.py>`; its configuration and payload
come through a pipe, and its stdout/stderr through pipes the grader opened and reads with size caps
(a program past max_file_bytes is killed) and a time bound. The grader opens nothing inside the
sandbox by name, so planted symlinks, FIFOs or devices change nothing.

Isolation (chosen once, see isolation()): as root with CAP_SYS_ADMIN ("root"), or in an
unprivileged user namespace ("userns"), each process gets new network, IPC, mount and pid
namespaces: no network at all, not even loopback; a root that is a size-capped tmpfs (disk_bytes)
holding /tmp, /var/tmp, /dev/shm and the scratch directory, read-only nosuid binds of /usr, /bin,
/lib*, /sbin, /etc and the interpreter's prefix, and /dev/null, zero, random, urandom; nothing else
of the host: no checkout, no benchmark files, no /proc, no home. The process is pid 1 of its own pid
namespace, so it sees and signals no other process, and all it started dies with it. Writes
vanish with the tmpfs. Where neither works (no root, no user namespaces, e.g. some containers),
mode "none" logs a warning once and runs programs with the uid and rlimit protections only: they
then share the network and /tmp, can read every world-readable file (the benchmark files with
their canonical solutions too: an answer-key attack then wins where a test's literals are in them),
and leave files behind outside their directory.

Always: rlimits (CPU seconds, address space, file size, process count; hard = soft), a wall-clock
timeout after which everything is SIGKILLed, closed stdin, an environment of only PATH/LANG/HOME,
no new privileges (PR_SET_NO_NEW_PRIVS), and HumanEval's "reliability guard" (os.kill, os.fork ...
set to None; defence in depth only, `import posix` gets around it).

Root. Each process runs under its own unprivileged uid from SANDBOX_UIDS (those that name no real
account; claimed with an flock, so concurrent graders never share one): RLIMIT_NPROC then holds,
and the candidate can neither signal, ptrace nor read the /proc files of the runner, the grader or
any other sandbox. After the run every live process of those uids is SIGKILLed, which also catches
children that left the process group. The uids may not reach the grader's own interpreter (e.g.
under /root, mode 700), so programs then run on the first python3 on SYSTEM_PATH that every user
can execute (standard library only, maybe another Python version). Not root: programs run as the
grader's user; with a user namespace the pid namespace still hides every other process, but in
mode "none" a program can signal the grader's other processes (kill(-1)), and cleanup is the
process-group kill. The runner is never dumpable, so even under the same uid its memory cannot be
read.

Not stopped: side channels (CPU time, memory pressure, timing of the grader's calls), use of the
CPU and memory a program is allowed, and denial of service within the limits (a program may burn
its whole timeout). A kernel exploit defeats any of this; the boundary is the kernel's namespaces,
uids and rlimits.
"""
import fcntl
import functools
import logging
import math
import os
import pwd
import queue
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data import sandbox_child
from data.sandbox_child import ProtocolError, decode, encode, write_all

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
SANDBOX_UIDS = range(64000, 64256)  # a block below 65534 (nobody) so it exists in user namespaces
UID_LOCK_DIR = "/run/srlm-sandbox-uids" if os.path.isdir("/run") else "/var/lock/srlm-sandbox-uids"
OUTPUT_KEPT = 4096  # characters of stdout/stderr kept in a result
CHILD_SOURCE = Path(sandbox_child.__file__).read_text()
# Bound read-only into an isolated sandbox (those that exist), with the interpreter's own prefix.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
DRAIN_S = 1.0  # after the kill, how long to wait for the pipes' last bytes
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0           # wall clock for the whole run (HumanEval's slowest canonical solution:
                                     # ~1 s under load; its harness uses 3 s); CPU limit: this rounded up + 1 s
    memory_bytes: int = 2 << 30      # address space (RLIMIT_AS) of each process
    max_processes: int = 32          # RLIMIT_NPROC (threads count too)
    max_file_bytes: int = 1 << 20    # any file it writes (RLIMIT_FSIZE), and each of stdout and stderr
    disk_bytes: int = 32 << 20       # isolated: the tmpfs that holds /tmp, /var/tmp, /dev/shm and the scratch dir


@dataclass(frozen=True)
class SandboxResult:
    completed: bool         # exited with status 0 within the limits (what a program's exit status is worth:
                            # it proves nothing about its correctness; see run_check)
    returncode: int         # negative: killed by that signal
    timed_out: bool
    output_exceeded: bool   # stdout or stderr went over max_file_bytes and the program was killed
    stdout: str             # first OUTPUT_KEPT characters
    stderr: str             # last OUTPUT_KEPT characters (where the traceback is)
    wall_s: float


@dataclass(frozen=True)
class CheckResult:
    passed: bool     # the trusted runner's check(candidate) returned normally
    timed_out: bool
    note: str        # "passed", "timed out" or "failed: <why>"
    stdout: str      # the candidate process's, first OUTPUT_KEPT characters
    stderr: str      # the candidate process's, last OUTPUT_KEPT characters
    wall_s: float


def _world_executable(path: str) -> bool:
    """True when every user may execute `path` (o+x on it and o+x on each parent directory)."""
    path = Path(path).resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


@functools.cache
def _find_interpreter() -> str:
    """The interpreter for sandboxed programs (see the module docstring: root).

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


@functools.cache
def _bind_dirs() -> tuple[str, ...]:
    """SYSTEM_DIRS that exist, plus the interpreter's prefix when none of them holds it."""
    dirs = [d for d in SYSTEM_DIRS if os.path.lexists(d)]
    prefixes = {Path(os.path.realpath(_find_interpreter())).parents[1]}
    if _find_interpreter() == sys.executable:
        prefixes.add(Path(sys.base_prefix).resolve())
    for prefix in sorted(prefixes):
        if not any(prefix == Path(d) or Path(d) in prefix.parents for d in dirs):
            dirs.append(str(prefix))
    return tuple(dirs)


class _UidPool:
    """The sandbox uids that name no real account, each claimed with an flock on its own lock file while
    in use, so that two graders on one machine never share a uid (one's cleanup would kill the other's
    programs, and their candidates could signal each other). First in, first out: a uid comes back
    into use only after all the others, long after the zombies of its last program have been reaped."""

    def __init__(self):
        os.makedirs(UID_LOCK_DIR, mode=0o700, exist_ok=True)
        self.free, self.locks = queue.SimpleQueue(), {}
        for uid in SANDBOX_UIDS:
            try:
                pwd.getpwuid(uid)
            except KeyError:
                self.free.put(uid)

    def take(self) -> int:
        while True:
            uid = self.free.get()
            lock = os.open(uid_lock_path(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another grader's; try the next one
                os.close(lock)
                self.free.put(uid)
                continue
            self.locks[uid] = lock
            return uid

    def give_back(self, uid: int):
        os.close(self.locks.pop(uid))  # releases the flock
        self.free.put(uid)


def uid_lock_path(uid: int) -> str:
    return os.path.join(UID_LOCK_DIR, f"{uid}.lock")


UIDS = _UidPool() if os.geteuid() == 0 else None


def _live_uid(pid: int) -> int | None:
    """Real uid of a running process; None once it has exited or is a zombie waiting to be reaped."""
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY)
    except OSError:
        return None
    try:
        status = os.read(fd, 4096)  # State and Uid are among the first lines
    except OSError:
        return None
    finally:
        os.close(fd)
    state, uid = status.find(b"\nState:"), status.find(b"\nUid:")
    if state < 0 or uid < 0 or status[state + 7:].lstrip().startswith(b"Z"):
        return None
    return int(status[uid + 5:].split(None, 1)[0])


def _kill_uids(uids: list[int]):
    """SIGKILL every process of these uids, including ones that left the process group (setsid).

    A pidfd pins the process before its uid is checked, so a pid recycled between the /proc scan
    and the kill never takes the signal. Repeats until a fork bomb has nothing left.
    """
    while pids := [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _live_uid(pid) in uids]:
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                if _live_uid(pid) in uids:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:  # it exited after the check
                pass
            finally:
                os.close(pidfd)
        time.sleep(0.005)


# ---------------------------------------------------------------- isolation

ISOLATION_ORDER = {True: ("root", "userns"), False: ("userns",)}  # by "running as root"
_isolation_lock = threading.Lock()


@functools.cache
def isolation_works(mode: str) -> bool:
    """Whether a program can run isolated in `mode` here: "root" (namespaces set up as root) or
    "userns" (inside an unprivileged user namespace)."""
    result = _run_program(f"import os\nassert os.getcwd() == {sandbox_child.SCRATCH!r}\n", Limits(), mode)
    if not result.completed:
        failure = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        log.debug("sandbox isolation %r unavailable: %s", mode, failure)
    return result.completed


@functools.cache
def _choose_isolation() -> str:
    for mode in ISOLATION_ORDER[os.geteuid() == 0]:
        if isolation_works(mode):
            return mode
    log.warning("sandbox: no namespace isolation (needs root with CAP_SYS_ADMIN or unprivileged user "
                "namespaces): sandboxed programs share the network, /tmp, /dev/shm and the filesystem view "
                "of the %s", "sandbox uid" if os.geteuid() == 0 else "grader's user")
    return "none"


def isolation() -> str:
    """How programs are isolated here, chosen once: the first mode of ISOLATION_ORDER that works, else
    "none" (uid and rlimits only; see the module docstring)."""
    with _isolation_lock:
        return _choose_isolation()


# ---------------------------------------------------------------- one run: processes, pipes, cleanup

class _Capture:
    """What came through one pipe: the first `keep` bytes, or the last ones (`tail`), and the total."""

    def __init__(self, keep: int = OUTPUT_KEPT, tail: bool = False):
        self.keep, self.tail, self.total, self.data = keep, tail, 0, bytearray()

    def add(self, chunk: bytes):
        self.total += len(chunk)
        if self.tail:
            self.data = (self.data + chunk)[-self.keep:]
        elif len(self.data) < self.keep:
            self.data += chunk[:self.keep - len(self.data)]

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class _Run:
    """The processes of one sandboxed run, each under its own uid (root) in its own namespaces
    (isolated), their pipes read through captures, and everything killed and removed on exit."""

    def __init__(self, limits: Limits, mode: str):
        self.limits, self.mode = limits, mode
        self.start = time.perf_counter()
        self.deadline = self.start + limits.timeout_s
        self.processes, self.uids, self.workdirs, self.fds = [], [], [], []
        self.captures: dict[int, _Capture] = {}
        self.killed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.killed:
            self.kill()
        for process in self.processes:
            process.wait()
        for fd in self.fds:
            os.close(fd)
        for uid in self.uids:
            UIDS.give_back(uid)
        for workdir in self.workdirs:
            shutil.rmtree(workdir, ignore_errors=True)

    def pipe(self) -> tuple[int, int]:
        read_end, write_end = os.pipe()
        self.fds += [read_end, write_end]
        return read_end, write_end

    def close(self, *fds: int):
        for fd in fds:
            self.fds.remove(fd)
            os.close(fd)

    def launch(self, role: str, payload, fds: dict[str, int], merge_stderr: bool = False) -> subprocess.Popen:
        """Start `role` (see data/sandbox_child.py) with `payload` on its source pipe and `fds` passed on."""
        uid = UIDS.take() if UIDS is not None else None
        workdir = Path(tempfile.mkdtemp(prefix="srlm-sandbox-"))
        self.workdirs.append(workdir)
        if uid is not None:
            self.uids.append(uid)
            os.chown(workdir, uid, uid)
        source_read, source_write = self.pipe()
        config = dict(role=role, uid=uid, isolation=self.mode, mountpoint=str(workdir), binds=_bind_dirs(),
                      disk_bytes=self.limits.disk_bytes, rlimits=self._rlimits(), fds=fds)
        home = sandbox_child.SCRATCH if self.mode != "none" else str(workdir)
        process = subprocess.Popen(
            [_find_interpreter(), "-I", "-c", CHILD_SOURCE, str(source_read)], cwd=workdir,
            env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": home}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            pass_fds=[source_read, *fds.values()], start_new_session=True)
        self.processes.append(process)
        self.close(source_read)
        try:
            write_all(source_write, encode((config, payload)))
        except BrokenPipeError:  # it died before reading: its exit status and stderr tell why
            pass
        self.close(source_write)
        return process

    def _rlimits(self) -> dict[str, int]:
        cpu_s = math.ceil(self.limits.timeout_s) + 1
        return {"RLIMIT_CPU": cpu_s, "RLIMIT_AS": self.limits.memory_bytes,
                "RLIMIT_NPROC": self.limits.max_processes, "RLIMIT_FSIZE": self.limits.max_file_bytes}

    def capture(self, fd: int, keep: int = OUTPUT_KEPT, tail: bool = False) -> _Capture:
        """Read the pipe `fd` (its read end, ours) into a capture."""
        self.captures[fd] = _Capture(keep, tail)
        return self.captures[fd]

    def capture_stream(self, stream, tail: bool = False) -> _Capture:
        """Capture a Popen pipe (stdout/stderr): the child holds its only other end."""
        fd = os.dup(stream.fileno())
        stream.close()
        self.fds.append(fd)
        return self.capture(fd, tail=tail)

    def pump(self, stop_fd: int) -> str:
        """Read the captured pipes until `stop_fd` is done (a pipe at EOF, a pidfd readable: its
        process exited), the deadline passes or an output goes over max_file_bytes.
        Returns "done", "timed out" or "output exceeded"."""
        with selectors.DefaultSelector() as selector:
            for fd in {*self.captures, stop_fd}:
                selector.register(fd, selectors.EVENT_READ)
            while (remaining := self.deadline - time.perf_counter()) > 0:
                for key, _ in selector.select(remaining):
                    if self._read(key.fd, selector) and key.fd == stop_fd:
                        return "done"
                    if any(c.total > self.limits.max_file_bytes for c in self.captures.values()):
                        return "output exceeded"
            return "timed out"

    def _read(self, fd: int, selector) -> bool:
        """Read what `fd` has into its capture; True at EOF (then it is no longer watched), and for a
        pidfd, which is only ever readable once its process has exited."""
        if fd not in self.captures:
            return True
        chunk = os.read(fd, 1 << 16)
        if chunk:
            self.captures[fd].add(chunk)
            return False
        selector.unregister(fd)
        return True

    def kill(self):
        """SIGKILL each process group and (root) every process of the run's uids, then read the pipes
        to their end: all writers are dead, so EOF comes at once unless an escapee still holds one."""
        self.killed = True
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:  # the whole group has already exited
                pass
        if self.uids:
            _kill_uids(self.uids)
        self._drain()

    def _drain(self):
        deadline = time.perf_counter() + DRAIN_S
        with selectors.DefaultSelector() as selector:
            for fd in self.captures:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map() and (remaining := deadline - time.perf_counter()) > 0:
                for key, _ in selector.select(remaining):
                    self._read(key.fd, selector)

    def wall_s(self) -> float:
        return time.perf_counter() - self.start


# ---------------------------------------------------------------- programs

def run_program(source: str, limits: Limits = Limits()) -> SandboxResult:
    """Run `source` as a fresh program under `limits` (see the module docstring). Its exit status
    says nothing trustworthy about what it computed: grade code with run_check."""
    return _run_program(source, limits, isolation())


def _run_program(source: str, limits: Limits, mode: str) -> SandboxResult:
    with _Run(limits, mode) as run:
        process = run.launch("program", source, {})
        stdout, stderr = run.capture_stream(process.stdout), run.capture_stream(process.stderr, tail=True)
        pidfd = os.pidfd_open(process.pid)
        try:
            outcome = run.pump(pidfd)
        finally:
            os.close(pidfd)
        run.kill()
        returncode = process.wait()
    return SandboxResult(completed=outcome == "done" and returncode == 0, returncode=returncode,
                         timed_out=outcome == "timed out", output_exceeded=outcome == "output exceeded",
                         stdout=stdout.text(), stderr=stderr.text(), wall_s=run.wall_s())


# ---------------------------------------------------------------- checks

def run_check(prompt: str, code: str, test: str, entry_point: str, limits: Limits = Limits()) -> CheckResult:
    """Grade `code`, the completion of `prompt`, against `test`'s check(candidate).

    The candidate process runs prompt + code and answers calls to `entry_point`; a separate runner
    process runs prompt + test (trusted code only) and calls check() with a proxy that forwards each
    call over a pipe. Passed means the runner's check returned normally, reported on a pipe that
    only the runner holds.
    """
    with _Run(limits, isolation()) as run:
        requests_read, requests_write = run.pipe()
        replies_read, replies_write = run.pipe()
        verdict_read, verdict_write = run.pipe()
        candidate = run.launch("candidate", (prompt + code, entry_point),
                               {"requests": requests_read, "replies": replies_write})
        runner = run.launch("runner", (trusted_prelude(prompt, entry_point), test, entry_point),
                            {"requests": requests_write, "replies": replies_read, "verdict": verdict_write},
                            merge_stderr=True)
        run.close(requests_read, requests_write, replies_read, replies_write, verdict_write)
        stdout, stderr = run.capture_stream(candidate.stdout), run.capture_stream(candidate.stderr, tail=True)
        runner_output = run.capture_stream(runner.stdout, tail=True)
        verdict_capture = run.capture(verdict_read, keep=1 << 16)
        outcome = run.pump(verdict_read)
        verdict = _decode_verdict(verdict_capture.data)
        if outcome == "done" and verdict != ("passed",):
            _wait_briefly(candidate, run.deadline)  # so a candidate that died is told from one that broke off
        candidate_status = candidate.poll()
        run.kill()
    note = _check_note(outcome, verdict, candidate_status, stderr.text(), runner_output.text())
    return CheckResult(passed=note == "passed", timed_out=outcome == "timed out", note=note,
                       stdout=stdout.text(), stderr=stderr.text(), wall_s=run.wall_s())


def trusted_prelude(prompt: str, entry_point: str) -> str:
    """What the runner takes from the prompt: its text before the entry point's `def` line (imports and
    helpers such as HumanEval/32's poly, which the check calls: the prompt's, whatever the completion
    redefines); all of it when it has no such line. The def itself is left out, since a prompt that
    ends on a bare `def f(x):` line is not valid Python alone."""
    starts = [m.start() for m in re.finditer(rf"^def {re.escape(entry_point)}\s*\(", prompt, re.MULTILINE)]
    return prompt[:starts[-1]] if starts else prompt


def _decode_verdict(data: bytes):
    try:
        return decode(data[4:]) if len(data) >= 4 else None
    except ProtocolError:
        return None


def _wait_briefly(process: subprocess.Popen, deadline: float):
    try:
        process.wait(timeout=max(0.0, min(DRAIN_S, deadline - time.perf_counter())))
    except subprocess.TimeoutExpired:
        pass


def _check_note(outcome: str, verdict, candidate_status: int | None, candidate_stderr: str,
                runner_output: str) -> str:
    if outcome != "done":
        return outcome if outcome == "timed out" else "failed: output over the size limit"
    if verdict == ("passed",):
        return "passed"
    if isinstance(verdict, tuple) and len(verdict) == 2 and verdict[0] == "failed":
        return f"failed: {verdict[1]}"
    if isinstance(verdict, tuple) and len(verdict) == 2 and verdict[0] == "lost":
        return f"failed: {_candidate_failure(candidate_status, candidate_stderr, verdict[1])}"
    return f"failed: no verdict from the check's runner: {_last_line(runner_output) or 'no output'}"


def _candidate_failure(status: int | None, stderr: str, protocol_error: str) -> str:
    if status is None:
        return f"the candidate process broke off ({protocol_error})"
    return _last_line(stderr) or f"the candidate process exited with status {status}"


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:200] if lines else ""


# ---------------------------------------------------------------- many at once

def default_workers() -> int:
    """Two runs per core: each spends part of its life starting up and being cleaned up."""
    return 2 * (os.cpu_count() or 1)


def in_parallel(function, items: list, workers: int | None = None) -> list:
    """function over items, `workers` at a time (default: default_workers()), in input order.

    Threads suffice: each only waits on its subprocesses.
    """
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        return list(pool.map(function, items))


def run_many(sources: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[SandboxResult]:
    """run_program over many sources, `workers` at a time, in input order."""
    return in_parallel(lambda source: run_program(source, limits), sources, workers)
