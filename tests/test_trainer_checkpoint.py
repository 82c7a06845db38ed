"""Run-directory safety: the run lock, removal of a dead writer's temps, and checkpoint / export writes on a
full disk (a small tmpfs) that name the path and lose nothing."""
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model.checkpoint import DiskFullError, export_temp_prefix, load_pretrained, save_pretrained
from model.config import PRESETS
from model.transformer import Transformer
from trainer.checkpoint import (checkpoint_paths, checkpoint_temp, lock_run_dir, remove_stale_temps,
                                save_checkpoint)

ROOT = Path(__file__).resolve().parents[1]
HOLD_LOCK = """
import sys, time
from pathlib import Path
from trainer.checkpoint import lock_run_dir
lock = lock_run_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


# ---------------------------------------------------------------- lock_run_dir

@pytest.fixture
def lock_holder(tmp_path):
    """Another process that holds the lock of tmp_path/run (killed with SIGKILL at the end if still alive)."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "locked"
    yield out, holder
    holder.kill()
    holder.wait()


def test_second_locker_fails_at_once_naming_holder_and_directory(lock_holder):
    out, holder = lock_holder
    with pytest.raises(ValueError) as info:
        lock_run_dir(out)
    message = str(info.value)
    assert f"run directory {out} is in use by process {holder.pid} " in message and "\n" not in message
    assert (out / ".lock").read_text() == f"{holder.pid}\n"  # the failed attempt did not erase the pid


def test_lock_is_free_once_the_holder_is_killed(lock_holder):
    out, holder = lock_holder
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = lock_run_dir(out)
    try:
        assert (out / ".lock").read_text() == f"{os.getpid()}\n"
    finally:
        lock.close()


def test_lock_held_by_this_process_blocks_a_second_open_until_closed(tmp_path):
    out = tmp_path / "new" / "run"
    lock = lock_run_dir(out)  # creates the directory
    with pytest.raises(ValueError, match=f"in use by process {os.getpid()} "):
        lock_run_dir(out)
    lock.close()
    lock_run_dir(out).close()


# ---------------------------------------------------------------- remove_stale_temps

def test_remove_stale_temps_removes_exactly_the_writers_temps(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torn = checkpoint_temp(out / "checkpoints" / "step_00000002.pt")
    torn.write_bytes(b"half a checkpoint")
    export_tmp = Path(tempfile.mkdtemp(prefix=export_temp_prefix(out / "final"), dir=out))
    (export_tmp / "model.safetensors").write_bytes(b"partial")
    kept = [out / "checkpoints" / "step_00000001.pt", out / "final" / "config.json", out / ".lock",
            out / "checkpoints" / ".step_2.pt.tmp", out / ".final.tmp-abc", out / ".final.tmp-abcdefghi",
            out / ".adapter.tmp-abcdefgh", out / "notes.tmp", out / "checkpoints" / "step_00000003.pt.tmp"]
    for path in kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("keep")
    assert torn.name == ".step_00000002.pt.tmp" and export_tmp.name.startswith(".final.tmp-")
    assert remove_stale_temps(out) == [torn, export_tmp]
    assert not torn.exists() and not export_tmp.exists()
    assert all(path.read_text() == "keep" for path in kept)
    assert remove_stale_temps(out) == [] and remove_stale_temps(tmp_path / "missing") == []


# ---------------------------------------------------------------- a full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted at tmp_path/disk for this test, unmounted after it (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_step(out: Path, model: torch.nn.Module, step: int):
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(out, model, optimizer, step, {"config": {}}, keep_last=3, is_main=True, sharded=False)


def test_checkpoint_on_a_full_disk_names_the_file_and_keeps_the_previous_one(small_disk):
    out = small_disk / "run"
    save_step(out, torch.nn.Linear(64, 64), step=1)
    first = checkpoint_paths(out)[0]
    before = digest(first)
    with pytest.raises(DiskFullError) as info:
        save_step(out, torch.nn.Linear(1024, 1024), step=2)  # 4 MiB of weights on a 2 MiB disk
    message = str(info.value)
    assert message.startswith(f"{out}/checkpoints/step_00000002.pt: disk full (No space left on device)")
    assert "\n" not in message and info.value.errno == 28 and isinstance(info.value, ValueError)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001.pt"]  # no temp left
    assert digest(first) == before
    save_step(out, torch.nn.Linear(64, 64), step=3)  # the space of the failed write was given back
    assert [p.name for p in checkpoint_paths(out)] == ["step_00000001.pt", "step_00000003.pt"]


def test_export_on_a_full_disk_names_the_directory_and_keeps_the_previous_export(small_disk):
    small = replace(PRESETS["tiny-student"], vocab_size=64, hidden_size=32, intermediate_size=64, head_dim=8)
    torch.manual_seed(0)
    old = Transformer(small)
    save_pretrained(old, small_disk / "final")
    before = {p.name: digest(p) for p in (small_disk / "final").iterdir()}
    with pytest.raises(DiskFullError) as info:
        save_pretrained(Transformer(replace(small, vocab_size=20_000)), small_disk / "final")  # 2.6 MB of embedding
    message = str(info.value)
    assert message.startswith(f"{small_disk / 'final'}: disk full (No space left on device)") and "\n" not in message
    assert sorted(p.name for p in small_disk.iterdir()) == ["final"]  # the temp directory was removed
    assert {p.name: digest(p) for p in (small_disk / "final").iterdir()} == before
    reloaded = load_pretrained(small_disk / "final")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.parameters(), old.parameters()))
