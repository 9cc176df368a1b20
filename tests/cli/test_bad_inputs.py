"""Bad inputs give one clear line and lose nothing; a SIGKILLed run resumes to the uninterrupted result.

Every bad config file, CLI flag or file (in-process ``qat_plugins.cli.main``) must exit with status 2
and print exactly one stderr line ``qat-plugins: error: ...`` that names the field or file and says
what to do, with every file already on disk (a finished run, configs, checkpoints) byte-identical
afterwards and no new file left behind. Python API misuse raises one-line exceptions of the same kind.

``test_sigkill_then_resume_equals_uninterrupted``: ``python -m qat_plugins train`` in a subprocess,
SIGKILLed right after its first periodic checkpoint (``checkpoint_every: 1``), then ``--resume``;
the final weights, BN statistics, quantizer scales and history equal those of an uninterrupted run
bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from qat_plugins.cli import main

from cli_files import config_file, snapshot, write_idx, write_yaml

ROOT = Path(__file__).resolve().parents[2]

# 256 samples, batch 32: 8 QAT steps per epoch, 40 in all; CR with random views and augmented student
# inputs, so every RNG stream and the optimizer momentum must be restored exactly.
KILL_CFG: dict[str, Any] = {
    "data": {"limit_train": 256, "batch_size": 32},
    "model": {"name": "cnn", "width": 4},
    "fp": {"epochs": 1},
    "qat": {"epochs": 5, "augment": True},
    "regularizers": [{"name": "cr", "weight": 0.5}],
    "checkpoint_every": 1,
    "progress": False,
}
TOTAL_STEPS = 40



def _cli(capsys, argv: list[str]) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted run of KILL_CFG (in process): the resume reference and a finished output dir."""
    d = tmp_path_factory.mktemp("finished")
    cfg = write_yaml(d / "small.yaml", {**KILL_CFG, "output_dir": str(d / "run")})
    rc = main(["-q", "train", "--config", str(cfg)])
    assert rc == 0
    return d, cfg


# --- the table -----------------------------------------------------------------------------------
BASE: dict[str, Any] = {
    "data": {"limit_train": 64, "batch_size": 32},
    "model": {"name": "resnet", "width": 4},
    "fp": {"epochs": 1},
    "qat": {"epochs": 1, "augment": False},
    "progress": False,
}


def _idx_dir(d: Path, n_train: int = 20, n_test: int = 10, truncate: str | None = None) -> Path:
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte", np.zeros((n_train, 8, 8), np.uint8))
    write_idx(d / "train-labels-idx1-ubyte", np.zeros((n_train,), np.uint8))
    write_idx(d / "t10k-images-idx3-ubyte", np.zeros((n_test, 8, 8), np.uint8))
    write_idx(d / "t10k-labels-idx1-ubyte", np.zeros((n_test,), np.uint8))
    if truncate:
        (d / truncate).write_bytes((d / truncate).read_bytes()[:100])
    return d



def _copy_ckpt(finished_dir: Path, tmp: Path, name: str, cut: int | None = None) -> Path:
    d = tmp / name
    d.mkdir()
    data = (finished_dir / "run" / "checkpoint.pt").read_bytes()
    (d / "checkpoint.pt").write_bytes(data[:cut] if cut else data)
    return d


def _ckpt_of_two_ranks(finished_dir: Path, tmp: Path) -> Path:
    d = tmp / "ddp"
    d.mkdir()
    state = torch.load(finished_dir / "run" / "checkpoint.pt", weights_only=True)
    state["world_size"] = 2  # as written by rank 0 of `torchrun --nproc_per_node 2`
    torch.save(state, d / "checkpoint.pt")
    return d


def _foreign_ckpt(tmp: Path) -> Path:
    d = tmp / "foreign"
    d.mkdir()
    torch.save({"state_dict": {"w": torch.ones(1)}}, d / "checkpoint.pt")
    return d


# (id, argv(tmp, finished_dir, finished_cfg), fragments that must all be in the error line)
Case = tuple[str, Callable[[Path, Path, Path], list], list[str]]
CLI_CASES: list[Case] = [
    ("bits 0", lambda t, f, c: ["train", "--config", _cfg_file(t, **{"qat.weight_bits": 0})],
     ["c.yaml", "qat.weight_bits: must be an int from 2 to 8, got 0"]),
    ("bits 1", lambda t, f, c: ["train", "--config", _cfg_file(t, **{"qat.act_bits": 1})],
     ["qat.act_bits: must be an int from 2 to 8, got 1"]),
    ("bits 9", lambda t, f, c: ["train", "--config", _cfg_file(t, **{"qat.weight_bits": 9})],
     ["qat.weight_bits: must be an int from 2 to 8, got 9"]),
    ("bits four", lambda t, f, c: ["train", "--config", _cfg_file(t, **{"qat.weight_bits": "four"})],
     ["qat.weight_bits: must be an int from 2 to 8, got 'four'"]),
    ("unknown regularizer", lambda t, f, c: ["train", "--config", _cfg_file(t, regularizers=[{"name": "crr"}])],
     ["regularizers[0].name: unknown regularizer 'crr'", "known: ['br', 'cr', 'fpq'"]),
    ("missing block names", lambda t, f, c: ["train", "--config", _cfg_file(t, regularizers=[{"name": "br"}])],
     ["regularizers[0].blocks: required for 'br'", "e.g. [layer1, layer2]"]),
    ("layer not in model", lambda t, f, c: ["train", "--config",
                                            _cfg_file(t, regularizers=[{"name": "cr", "layers": ["layer9"]}])],
     ["regularizers[0].layers: layer 'layer9' not found", "did you mean 'layer3'", "use module names"]),
    ("block not in model", lambda t, f, c: ["train", "--config",
                                            _cfg_file(t, regularizers=[{"name": "br", "blocks": ["layer1", "blocks.3"]}])],
     ["regularizers[0].blocks: block 'blocks.3' is not in the FP model", "use module names"]),
    ("negative weight", lambda t, f, c: ["train", "--config", _cfg_file(t, regularizers=[{"name": "cr", "weight": -0.5}])],
     ["regularizers[0].weight: must be a", "number >= 0, got -0.5"]),
    ("unknown key", lambda t, f, c: ["train", "--config", _cfg_file(t, **{"qat.lrr": 0.1})],
     ["qat.lrr: unknown key; allowed keys in qat: weight_bits"]),
    ("yaml syntax", lambda t, f, c: ["train", "--config", _text(t / "broken.yaml", "qat: {weight_bits: 4\n")],
     ["cannot parse config file", "broken.yaml"]),
    ("missing config file", lambda t, f, c: ["train", "--config", t / "nope.yaml"],
     ["config file", "nope.yaml does not exist", "check the path"]),
    ("empty dataset dir", lambda t, f, c: ["train", "--config", _cfg_file(t, **{"data.name": "idx", "data.data_dir":
                                                                             str(_mkdir(t / "empty"))})],
     ["data.data_dir:", "has no train-images-idx3-ubyte[.gz]", "expected MNIST-layout idx files"]),
    ("dataset without samples", lambda t, f, c: ["train", "--config", _cfg_file(t, **{
        "data.name": "idx", "data.data_dir": str(_idx_dir(t / "zero", 0, 0))})],
     ["data.data_dir:", "hold no samples", "re-download"]),
    ("corrupted idx file", lambda t, f, c: ["train", "--config", _cfg_file(t, **{
        "data.name": "idx", "data.data_dir": str(_idx_dir(t / "idx", truncate="t10k-images-idx3-ubyte"))})],
     ["data.data_dir:", "t10k-images-idx3-ubyte is truncated or corrupt", "re-download"]),
    ("unknown flag", lambda t, f, c: ["train", "--config", c, "--bogus"],
     ["unrecognized arguments: --bogus", "--help"]),
    ("max-steps not an int", lambda t, f, c: ["train", "--config", c, "--max-steps", "two"],
     ["argument --max-steps: expected an int >= 0, got 'two'"]),
    ("max-steps negative", lambda t, f, c: ["train", "--config", c, "--max-steps", "-3"],
     ["--max-steps", "expected an int >= 0"]),
    ("no --config", lambda t, f, c: ["train", "--resume"], ["--config", "required"]),
    ("unwritable output dir", lambda t, f, c: ["train", "--config", c, "--output-dir", c / "sub"],
     ["cannot write to output directory", "small.yaml/sub", "choose a writable directory"]),
    ("output dir holds a run", lambda t, f, c: ["train", "--config", c],
     ["checkpoint.pt exists (an earlier run)", "pass --resume", "another output directory"]),
    ("resume a finished run", lambda t, f, c: ["train", "--config", c, "--resume"],
     ["already finished", "results.json exists", "nothing to resume"]),
    ("resume without checkpoint", lambda t, f, c: ["train", "--config", c, "--output-dir", t / "fresh", "--resume"],
     ["--resume: no checkpoint", "fresh/checkpoint.pt", "drop --resume"]),
    ("truncated checkpoint", lambda t, f, c: ["train", "--config", c, "--output-dir",
                                              _copy_ckpt(f, t, "trunc", cut=5000), "--resume"],
     ["trunc/checkpoint.pt is truncated or corrupt", "start again without --resume"]),
    ("checkpoint of another config", lambda t, f, c: [
        "train", "--config", write_yaml(t / "other.yaml", {**KILL_CFG, "qat": {"epochs": 5, "augment": True, "lr": 0.02}}),
        "--output-dir", _copy_ckpt(f, t, "other"), "--resume"],
     ["other/checkpoint.pt was made with a different config", "qat.lr: checkpoint 0.01, config 0.02",
      "resume with the config it was made with"]),
    ("checkpoint of 2 processes", lambda t, f, c: ["train", "--config", c, "--output-dir", _ckpt_of_two_ranks(f, t),
                                                   "--resume"],
     ["ddp/checkpoint.pt was made by 2 process(es), this run has 1", "--nproc_per_node"]),
    ("foreign checkpoint", lambda t, f, c: ["train", "--config", c, "--output-dir", _foreign_ckpt(t), "--resume"],
     ["foreign/checkpoint.pt is not a qat_plugins training checkpoint", "written by qat-plugins train"]),
]


def _cfg_file(tmp: Path, name: str = "c.yaml", **changes: Any) -> Path:
    """BASE with dotted-path changes, output_dir tmp/out."""
    return config_file(BASE, tmp, name, **changes)


def _text(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input_one_line_exit_2_nothing_lost(case, finished, tmp_path, capsys):
    _, make_argv, fragments = case
    fdir, fcfg = finished
    argv = make_argv(tmp_path, fdir, fcfg)  # creates the case's files
    before = snapshot(tmp_path, fdir)
    rc, err = _cli(capsys, argv)
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("qat-plugins: error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert snapshot(tmp_path, fdir) == before  # nothing overwritten, deleted or added


# --- Python API ----------------------------------------------------------------------------------
def _api_cases():  # type: ignore[no-untyped-def]
    import qat_plugins as qp
    from qat_plugins.models import SmallCNN, SmallResNet
    from qat_plugins.training import load_config, load_data, train_qat

    torch.manual_seed(0)
    fp = SmallResNet(width=4).eval()
    x, y = torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)

    def student():  # type: ignore[no-untyped-def]
        q = qp.prepare_qat(fp, weight_bits=4, act_bits=4)
        with torch.no_grad():
            q.eval()(x)
        return q.train()

    def other_width_fp() -> None:
        q = student()
        before = {k: v.clone() for k, v in q.named_parameters()}
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in q.modules())
        try:
            with qp.attach(q, [qp.BlockReplacementRegularizer(["layer1"])], fp_model=SmallResNet(width=8).eval()) as r:
                r.loss(x, y, q(x))
        finally:  # the error comes before any gradient step, and the hooks are gone again
            assert all(torch.equal(v, dict(q.named_parameters())[k]) for k, v in before.items())
            assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in q.modules()) == hooks

    def resume_other_fp(finished_dir: Path) -> None:
        cfg = load_config(finished_dir / "small.yaml")
        train_qat(SmallResNet(width=4), load_data(cfg), cfg, checkpoint_path=finished_dir / "run" / "checkpoint.pt",
                  resume=True)

    return [
        ("prepare weight_bits 9", lambda f: qp.prepare_qat(fp, weight_bits=9), ValueError,
         ["weight_bits: bits must be from 2 to 8, got 9", "choose a bit width"]),
        ("prepare act_bits 1", lambda f: qp.prepare_qat(fp, act_bits=1), ValueError, ["act_bits:", "got 1"]),
        ("prepare bits four", lambda f: qp.prepare_qat(fp, weight_bits="four"), TypeError,
         ["weight_bits: bits must be an int from 2 to 8, got 'four'"]),
        ("load_config bits 0", lambda f: load_config({"qat": {"weight_bits": 0}}), ValueError,
         ["qat.weight_bits: must be an int from 2 to 8, got 0"]),
        ("regularizer weight < 0", lambda f: qp.ConsistencyRegularizer(weight=-1), ValueError,
         ["weight", "must be a finite number >= 0, got -1"]),
        ("unknown regularizer", lambda f: qp.build_regularizers([{"name": "kdx"}]), ValueError,
         ["regularizers[0].name: unknown regularizer 'kdx'"]),
        ("layer not in model", lambda f: qp.attach(student(), [qp.ConsistencyRegularizer(layers=["layer9"])]),
         ValueError, ["layer 'layer9' not found in SmallResNet", "did you mean"]),
        ("BR without FP model", lambda f: qp.attach(student(), [qp.BlockReplacementRegularizer(["layer1"])]),
         ValueError, ["needs the full-precision model", "fp_model="]),
        ("block not in FP model", lambda f: qp.attach(student(), [qp.BlockReplacementRegularizer(["layer1"])],
                                                      fp_model=SmallCNN(width=4)),
         ValueError, ["block 'layer1' is not in the FP model", "SmallCNN", "pass the FP model the QAT model"]),
        ("FP model of another width", lambda f: other_width_fp(), ValueError,
         ["block 'layer1'", "does not match the FP output", "must be the same architecture"]),
        ("resume with another FP model", resume_other_fp, ValueError,
         ["fp_model does not match the FP model in checkpoint", "resume with the FP model"]),
    ]


API_IDS = ["prepare weight_bits 9", "prepare act_bits 1", "prepare bits four", "load_config bits 0",
           "regularizer weight < 0", "unknown regularizer", "layer not in model", "BR without FP model",
           "block not in FP model", "FP model of another width", "resume with another FP model"]


@pytest.mark.parametrize("name", API_IDS)
def test_bad_python_api_input_one_line(name, finished):
    cases = {c[0]: c for c in _api_cases()}
    _, fn, exc, fragments = cases[name]
    fdir, _ = finished
    before = snapshot(fdir)
    with pytest.raises(exc) as e:
        fn(fdir)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    assert snapshot(fdir) == before


# --- resume after SIGKILL --------------------------------------------------------------------------
def _step_of(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["progress"]["step"])
    except Exception:  # noqa: BLE001 - not there yet
        return -1


def test_sigkill_then_resume_equals_uninterrupted(finished, tmp_path, capsys):
    fdir, _ = finished
    out = tmp_path / "killed"
    cfg = write_yaml(tmp_path / "small.yaml", {**KILL_CFG, "output_dir": str(out)})
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qat_plugins", "-q", "train", "--config", str(cfg)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt, step, deadline, mtime = out / "checkpoint.pt", -1, time.monotonic() + 180, 0.0
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            m = ckpt.stat().st_mtime_ns if ckpt.exists() else 0
            if m != mtime:
                mtime, step = m, _step_of(ckpt)
                if step >= 1:  # the first periodic checkpoint (step 0 is written before QAT starts)
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.002)
    finally:
        if proc.poll() is None and step < 1:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    proc.stderr.close()
    killed_at = _step_of(ckpt)
    with capsys.disabled():
        print(f"\nSIGKILL after the checkpoint of step {killed_at} of {TOTAL_STEPS}")
    assert 1 <= killed_at < TOTAL_STEPS and not (out / "results.json").exists()

    rc, err = _cli(capsys, ["-q", "train", "--config", cfg, "--resume"])
    assert rc == 0, err
    ref = torch.load(fdir / "run" / "checkpoint.pt", weights_only=True)
    res = torch.load(ckpt, weights_only=True)
    assert res["progress"]["step"] == ref["progress"]["step"] == TOTAL_STEPS
    assert ref["model"].keys() == res["model"].keys()
    diff = [k for k in ref["model"] if not torch.equal(ref["model"][k], res["model"][k])]
    assert not diff, f"resumed after SIGKILL at step {killed_at} differs in {diff[:5]}"
    assert torch.equal(ref["rng"]["torch"], res["rng"]["torch"])
    hist = [json.loads((d / "results.json").read_text())["history"] for d in (fdir / "run", out)]
    assert [[{k: v for k, v in h.items() if k != "time_s"} for h in hs] for hs in hist][0] == \
        [[{k: v for k, v in h.items() if k != "time_s"} for h in hs] for hs in hist][1]
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "results.json"]  # no half-written temp file left
