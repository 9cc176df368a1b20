"""The one run entry (``training.run``): hooks, export + validation, the output-directory lock, temp files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
import torch

from qat_plugins._io import DirectoryLock, LockedError, atomic_write_bytes, remove_stale_temp_files
from qat_plugins.training import RunHooks, iterate_batches, load_config, prepare_student, run

TINY: dict[str, Any] = {
    "data": {"limit_train": 64, "batch_size": 32},
    "model": {"name": "cnn", "width": 4},
    "fp": {"epochs": 1},
    "qat": {"epochs": 1, "augment": False},
    "progress": False,
    "output_dir": None,  # no files unless a test passes output_dir
}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _host() -> str:
    return "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in socket.gethostname())[:40]


# --- hooks ---------------------------------------------------------------------------------------------
def test_run_hooks_order_export_and_results(tmp_path):
    calls: list[str] = []
    out = tmp_path / "run"

    def check(fp, data, cfg):  # noqa: ANN001, ANN202
        calls.append("check")
        assert not (out / "checkpoint.pt").exists()  # before any training

    def prepare(fp, data, cfg):  # noqa: ANN001, ANN202
        calls.append("prepare")
        return prepare_student(fp, data, cfg)

    def extra(student):  # noqa: ANN001, ANN202
        calls.append("checkpoint_extra")
        return {"flow": "test"}

    def after(result, data, o):  # noqa: ANN001, ANN202
        calls.append("after_qat")
        (o / "extra.txt").write_text("x")
        return {"extra_field": 42}

    hooks = RunHooks(outputs=["extra.txt"], check=check, prepare_fn=prepare, checkpoint_extra=extra, after_qat=after)
    res = run({**TINY, "export": ["int8"]}, output_dir=out, hooks=hooks)
    # check first, prepare once, a checkpoint at step 0 and at the epoch end, after_qat last
    assert calls == ["check", "prepare", "checkpoint_extra", "checkpoint_extra", "after_qat"]
    payload = json.loads((out / "results.json").read_text())
    assert payload["extra_field"] == 42
    assert torch.load(out / "checkpoint.pt", weights_only=True)["extra"] == {"flow": "test"}
    assert [o["weight_format"] for o in payload["onnx"]] == ["int8"] == [o["weight_format"] for o in res.onnx]
    assert payload["onnx"][0]["path"] == str(out / "model_int8.onnx") and (out / "model_int8.onnx").is_file()
    assert payload["onnx"][0]["validation"]["top1_agreement"] >= 0.99
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "extra.txt", "model_int8.onnx", "results.json"]
    # the hook's output file is protected like results.json: a new run into the directory is refused
    (out / "checkpoint.pt").unlink()
    (out / "results.json").unlink()
    with pytest.raises(FileExistsError, match=r"extra\.txt exists; not overwriting it"):
        run(TINY, output_dir=out, hooks=RunHooks(outputs=["extra.txt"]))


def test_run_with_trained_fp_model_skips_fp_training(tmp_path):
    first = run(TINY)
    before = {k: v.clone() for k, v in first.fp_model.state_dict().items()}
    second = run(TINY, fp_model=first.fp_model)
    # same FP model and seed: the QAT result is identical to the first run's, the FP weights untouched
    assert all(torch.equal(before[k], v) for k, v in first.fp_model.state_dict().items())
    assert second.fp_test_accuracy == first.fp_test_accuracy
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_iterate_batches_covers_every_sample_in_order(digits):
    x, y = digits.test.tensors
    got = list(iterate_batches(digits.test, 100))
    assert [len(b[0]) for b in got] == [100] * (len(x) // 100) + ([len(x) % 100] if len(x) % 100 else [])
    assert torch.equal(torch.cat([b[0] for b in got]), x) and torch.equal(torch.cat([b[1] for b in got]), y)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, iterate_batches((x, y), 100)))


def test_prepare_student_refuses_nan_quantizer_state(digits):
    from qat_plugins.models import SmallCNN

    fp = SmallCNN(width=4).eval()
    with torch.no_grad():
        next(fp.parameters()).fill_(float("inf"))  # every calibration output becomes non-finite
    cfg = load_config({**TINY, "output_dir": None})
    with pytest.raises(ValueError, match=r"is NaN/inf after the calibration forward"):
        prepare_student(fp, digits, cfg)


# --- the lock -------------------------------------------------------------------------------------------
def test_lock_refuses_a_live_holder_and_releases(tmp_path):
    a = DirectoryLock(tmp_path).acquire()
    info = json.loads((tmp_path / ".qat_plugins.lock").read_text())
    assert info["pid"] == os.getpid() and info["host"] == _host() and info["started"]
    with pytest.raises(LockedError, match=rf"is in use by another run \(pid {os.getpid()}, started"):
        DirectoryLock(tmp_path).acquire()
    a.release()
    assert not (tmp_path / ".qat_plugins.lock").exists()
    with DirectoryLock(tmp_path):  # free again
        pass


@pytest.mark.parametrize("kind", ["dead pid", "reused pid", "empty old file"])
def test_stale_lock_is_taken_over(tmp_path, kind):
    lock = tmp_path / ".qat_plugins.lock"
    if kind == "dead pid":
        lock.write_text(json.dumps({"pid": _dead_pid(), "host": _host(), "pid_start": None, "started": "x"}))
    elif kind == "reused pid":  # our own pid, but another process start time: the holder is gone
        lock.write_text(json.dumps({"pid": os.getpid(), "host": _host(), "pid_start": "1", "started": "x"}))
    else:  # a holder killed between creating and writing the file
        lock.write_text("")
        old = time.time() - 60
        os.utime(lock, (old, old))
    with DirectoryLock(tmp_path) as held:
        assert json.loads(lock.read_text())["token"] == held.token
    assert sorted(os.listdir(tmp_path)) == []


def test_lock_of_another_host_is_honoured(tmp_path):
    (tmp_path / ".qat_plugins.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(LockedError, match=r"pid 1 on host elsewhere.*delete .*\.qat_plugins\.lock if that run is dead"):
        DirectoryLock(tmp_path).acquire()


# --- temporary files ----------------------------------------------------------------------------------------
def test_stale_temp_files(tmp_path):
    host = _host()
    dead = tmp_path / f".a.onnx.{host}.{_dead_pid()}.x1.tmp"
    live = tmp_path / f".b.onnx.{host}.{os.getpid()}.x2.tmp"
    other_host = tmp_path / f".c.onnx.otherhost.{_dead_pid()}.x3.tmp"
    legacy = tmp_path / ".checkpoint.pt.abcd1234.tmp"
    unrelated = tmp_path / "notes.tmp"
    for p in (dead, live, other_host, legacy, unrelated):
        p.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == [dead]
    assert sorted(p.name for p in remove_stale_temp_files(tmp_path, unowned=True)) == [legacy.name]
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other_host.name, unrelated.name])


def test_atomic_write_names_the_target_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(target, b"x")
    atomic_write_bytes(tmp_path / "f.bin", b"old")
    with pytest.raises(FileExistsError, match=r"f\.bin already exists"):
        atomic_write_bytes(tmp_path / "f.bin", b"new", overwrite=False)
    assert (tmp_path / "f.bin").read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_last_batch_of_one_sample_is_dropped():
    """65 samples at batch 64: the 1-sample remainder (BatchNorm cannot train on it) is left out, so an epoch
    is 1 step, not a crash; 66 samples keep their 2-sample remainder (2 steps)."""
    res = run({**TINY, "data": {"limit_train": 65, "batch_size": 64}})
    assert res.steps == 1 and res.history[0]["steps"] == 1
    res = run({**TINY, "data": {"limit_train": 66, "batch_size": 64}})
    assert res.steps == 2
