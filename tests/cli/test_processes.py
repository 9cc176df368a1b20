"""Hostile conditions for whole processes: two runs on one directory, a stale lock, SIGTERM, disk full,
a SIGKILLed export's temp file, and a user error under ``--nproc-per-node``: one line, exit 2 (143 for
SIGTERM), nothing lost. Subprocesses run ``python -m qat_plugins``."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from qat_plugins.cli import main

from cli_files import BASE, config_file, error_lines, snapshot, subprocess_env, write_yaml


# --- processes: lock, stale lock, SIGTERM, disk full, SIGKILLed export ------------------------------------------
# minutes of QAT (300 epochs of 32 steps): the processes below are killed long before it ends
SLOW: dict[str, Any] = {**BASE, "data": {"limit_train": 512, "batch_size": 16}, "model": {"name": "cnn", "width": 8},
                        "qat": {"epochs": 300, "augment": False}, "checkpoint_every": 4}


def _spawn(args: list[str], cwd: Path, **kw: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qat_plugins", "-q", *args], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_two_runs_one_directory_second_refused_then_stale_lock_taken_over(tmp_path):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "slow.yaml", {**SLOW, "output_dir": str(out)})
    a = _spawn(["train", "--config", str(cfg)], tmp_path)
    try:
        _wait_for(out / ".qat_plugins.lock", a)  # A holds the lock (and goes on to train for minutes)
        before = snapshot(out)
        b = subprocess.run([sys.executable, "-m", "qat_plugins", "-q", "train", "--config", str(cfg), "--resume"],
                           cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert b.returncode == 2, b.stderr
        lines = error_lines(b.stderr)
        assert len(lines) == 1 and f"is in use by another run (pid {a.pid}" in lines[0], b.stderr
        assert a.poll() is None  # B refused while A still ran: no training in B
        kept = {p for p in before if ".write-test-" not in p}
        assert set(snapshot(out)) >= kept  # B removed nothing of A's
        lock = json.loads((out / ".qat_plugins.lock").read_text())
        assert lock["pid"] == a.pid and lock["host"] and lock["started"]
        _wait_for(out / "checkpoint.pt", a)  # A trains (its step-0 checkpoint is there to resume from)
        a.send_signal(signal.SIGKILL)  # A dies holding the lock: a stale lock
        a.wait(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
        a.stderr.close()
    assert (out / ".qat_plugins.lock").exists()
    # resume A's run here: the stale lock (dead pid) is taken over; stop at once to keep the test fast
    assert main(["-q", "train", "--config", str(cfg), "--resume", "--max-steps", "1"]) == 0
    assert not (out / ".qat_plugins.lock").exists()  # released on exit
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_sigterm_one_line_lock_released_resume_possible(tmp_path, capsys):
    """SIGTERM (what torchrun and schedulers send) mid-training, in this process: one line, exit 143, the lock
    released, no temp file, the checkpoint loadable."""
    import threading

    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "slow.yaml", {**SLOW, "output_dir": str(out)})

    def kill_when_training() -> None:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=kill_when_training, daemon=True)
    previous = signal.getsignal(signal.SIGTERM)
    killer.start()
    try:
        rc = main(["-q", "train", "--config", str(cfg)])
    finally:
        killer.join(timeout=130)
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert rc == 143, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "terminated (SIGTERM)" in lines[0] and "--resume" in lines[0], err
    assert sorted(os.listdir(out)) == ["checkpoint.pt"]  # no lock, no temp file
    torch.load(out / "checkpoint.pt", weights_only=True)  # loadable


class _FileSizeLimit:
    """``ulimit -f`` for this process (soft limit only, restored on exit); Python ignores SIGXFSZ, so an
    oversized write fails with EFBIG as on a full disk."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def __enter__(self) -> None:
        self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.nbytes, self.old[1]))

    def __exit__(self, *exc: object) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old)


def test_disk_full_during_checkpoint_write(tmp_path, capsys):
    """``ulimit -f``: the checkpoint write fails; one line naming checkpoint.pt, exit 2, no temp file left."""
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "c.yaml", {**BASE, "output_dir": str(out)})
    with _FileSizeLimit(20_000):
        rc = main(["-q", "train", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "run/checkpoint.pt: File too large" in lines[0] and "file-size limit" in lines[0], err
    assert os.listdir(out) == []  # neither a temp file nor the lock


def test_disk_full_during_export_keeps_checkpoint(ctx, tmp_path, capsys):
    before = snapshot(ctx.root)
    with _FileSizeLimit(2_000):
        rc = main(["-q", "export", "--checkpoint", str(ctx.ckpt), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "m.onnx: File too large" in lines[0], err
    assert os.listdir(tmp_path) == [] and snapshot(ctx.root) == before


def test_stale_temp_file_of_a_killed_export_is_removed(ctx, tmp_path):
    """A temp file left by a SIGKILLed writer (dead pid in its name) goes at the next write into that directory;
    one of a live process stays."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in socket.gethostname())[:40]
    stale = tmp_path / f".m.onnx.{host}.{dead.pid}.abc123.tmp"
    stale.write_bytes(b"\0" * 512 * 1024)  # as left by a SIGKILL during export
    live = tmp_path / f".x.onnx.{host}.{os.getpid()}.abc123.tmp"
    live.write_bytes(b"\0")
    assert main(["-q", "export", "--checkpoint", str(ctx.ckpt), "--out", str(tmp_path / "m.onnx")]) == 0
    assert not stale.exists() and live.exists() and (tmp_path / "m.onnx").is_file()


@pytest.mark.slow
def test_nproc_per_node_user_error_is_one_line_per_rank(tmp_path):
    """``train --nproc-per-node 2``: a data error found in the workers reads as one line per rank, exit 2,
    without torchrun's ChildFailedError report."""
    cfg = config_file(BASE, tmp_path, **{"data.name": "idx", "data.data_dir": str(tmp_path / "missing")})
    p = subprocess.run([sys.executable, "-m", "qat_plugins", "-q", "train", "--config", str(cfg),
                        "--nproc-per-node", "2"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 2, p.stderr
    lines = error_lines(p.stderr)
    rank0 = [ln for ln in lines if ln.startswith("qat-plugins: error: data.data_dir: dataset directory")]
    rank1 = [ln for ln in lines if ln.startswith("qat-plugins: error: [rank 1] ")]
    assert len(rank0) == 1 and len(rank1) <= 1 and len(lines) == len(rank0) + len(rank1), p.stderr
    # rank 1 reports the same error, or, when the launcher stopped it first after rank 0 failed, SIGTERM
    assert all("data.data_dir: dataset directory" in ln or "terminated (SIGTERM)" in ln for ln in rank1), p.stderr
    assert "ChildFailedError" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "out" / ".qat_plugins.lock").exists()
