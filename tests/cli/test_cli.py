"""The ``qat-plugins`` command line: demo end to end, train from YAML, resume, and user errors (exit 2)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from qat_plugins.cli import main
from qat_plugins.regularizers import REGISTRY, register
from qat_plugins.training import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]

SMALL = {
    "data": {"limit_train": 192, "batch_size": 64},
    "model": {"name": "cnn", "width": 4},
    "fp": {"epochs": 1},
    "qat": {"epochs": 2},
    "regularizers": [{"name": "cr", "weight": 0.5}],
    "progress": False,
}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "qat_plugins", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _export_available() -> bool:
    try:
        import qat_plugins.export  # noqa: F401
    except ImportError:
        return False
    return True


def _one_error_line(err: str, *fragments: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    errors = [ln for ln in lines if ln.startswith("qat-plugins: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``qat-plugins train --config small.yaml`` (in process: the demo test covers ``python -m``)."""
    d = tmp_path_factory.mktemp("cli_train")
    cfg = _write_config(d / "small.yaml", {**SMALL, "output_dir": str(d / "run")})
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["train", "--config", str(cfg)])
    assert rc == 0, err.getvalue()
    return d, cfg, types.SimpleNamespace(stdout=out.getvalue(), stderr=err.getvalue())


# --- end to end ---------------------------------------------------------------------------------
def test_demo_quick_end_to_end(tmp_path, capsys):
    proc = _cli("demo", "--quick", "--output-dir", "tmp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "tmp"
    res = json.loads((out / "results.json").read_text())
    acc = res["accuracy"]
    assert set(acc) == {"fp", "w4a4_lsq", "w4a4_lsq_cr"}
    # --quick (seconds of training): measured FP 84.2 %, LSQ 89.3 %, LSQ+CR 87.8 % (chance 10 %); W4A4
    # QAT from the FP model must not fall below it by more than seed noise
    assert acc["fp"] >= 0.75 and min(acc["w4a4_lsq"], acc["w4a4_lsq_cr"]) >= acc["fp"] - 0.05, acc
    assert res["quick"] is True and res["config"]["qat"]["weight_bits"] == 4
    for label in ("FP32", "W4A4 LSQ", "W4A4 LSQ + CR"):
        assert label in proc.stdout
    if _export_available():
        assert {r["weight_format"] for r in res["onnx"]} == {"int8", "int4"}
        # ORT validation recomputes each QAT model's PyTorch top-1 on the same split: same number
        for r in res["onnx"]:
            key = {"w4a4_lsq": "w4a4_lsq", "w4a4_cr": "w4a4_lsq_cr"}[r["model"]]
            assert r["torch_top1"] == pytest.approx(acc[key], abs=1e-9) and r["num_samples"] == 450, r
        assert all((out / f"w4a4_{m}_{f}.onnx").is_file() for m in ("lsq", "cr") for f in ("int8", "int4"))
        assert "ORT top1" in proc.stdout
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    # a second demo into the same directory refuses before doing any work
    before = (out / "results.json").read_bytes()
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "exists", "not overwriting")
    assert (out / "results.json").read_bytes() == before


def test_train_from_yaml(trained):
    d, _, proc = trained
    run_dir = d / "run"
    assert sorted(os.listdir(run_dir)) == ["checkpoint.pt", "results.json"]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["steps"] == 6 and len(res["history"]) == 2 and "cr" in res["history"][0]["reg_losses"]
    assert "QAT W4A4 test top-1" in proc.stdout
    assert "qat epoch 2/2" in proc.stderr  # per-epoch log lines


def test_train_max_steps_then_resume_matches_the_full_run(trained, tmp_path, capsys):
    d, cfg, _ = trained
    out = tmp_path / "resumed"
    assert main(["train", "--config", str(cfg), "--output-dir", str(out), "--max-steps", "4"]) == 0
    assert "--resume" in capsys.readouterr().out and not (out / "results.json").exists()
    assert main(["train", "--config", str(cfg), "--output-dir", str(out), "--resume"]) == 0
    full = load_checkpoint(d / "run" / "checkpoint.pt")["model"]  # the uninterrupted run
    resumed = load_checkpoint(out / "checkpoint.pt")["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_export_from_checkpoint(trained, tmp_path, capsys):
    if not _export_available():
        pytest.skip("qat_plugins.export not available")
    d, _, _ = trained
    target = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(d / "run" / "checkpoint.pt"), "--output", str(target),
                 "--weight-format", "int4"]) == 0
    assert target.is_file()
    assert main(["export", "--checkpoint", str(d / "run" / "checkpoint.pt"), "--output", str(target)]) == 2
    _one_error_line(capsys.readouterr().err, "exists")


def test_export_and_validate_with_documented_flags(trained, tmp_path, capsys):
    """`export --format --out` and `validate MODEL.onnx --checkpoint --json` as the README shows them."""
    if not _export_available():
        pytest.skip("qat_plugins.export not available")
    import json

    d, _, _ = trained
    ckpt = str(d / "run" / "checkpoint.pt")
    target = tmp_path / "m8.onnx"
    assert main(["export", "--checkpoint", ckpt, "--format", "int8", "--out", str(target)]) == 0
    capsys.readouterr()
    assert main(["validate", str(target), "--checkpoint", ckpt, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1_agreement"] >= 0.99 and report["size_bytes"] == target.stat().st_size
    assert main(["validate", str(tmp_path / "missing.onnx"), "--checkpoint", ckpt]) == 2
    _one_error_line(capsys.readouterr().err, "does not exist")


# --- user errors: one line on stderr, exit 2 ----------------------------------------------------
def test_bad_usage_exits_2_with_one_line(capsys, tmp_path):
    good = _write_config(tmp_path / "c.yaml", SMALL)
    cases = [
        ([], "missing command"),
        (["frobnicate"], "invalid choice"),
        (["train"], "--config"),
        (["train", "--config", str(good), "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--config", str(good), "--max-steps", "-1"], "--max-steps"),
        (["demo", "--quick", "--fast"], "unrecognized arguments"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        _one_error_line(err, fragment)
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out


def test_bad_config_files_exit_2(capsys, tmp_path):
    bad_field = _write_config(tmp_path / "bits.yaml", {**SMALL, "qat": {"weight_bits": 9}})
    unparseable = tmp_path / "broken.yaml"
    unparseable.write_text("qat: {weight_bits: 4\n")
    unknown = _write_config(tmp_path / "unknown.yaml", {"qat": {"lrr": 1}})
    cases = [
        (tmp_path / "missing.yaml", ["missing.yaml", "does not exist"]),
        (bad_field, ["bits.yaml", "qat.weight_bits: must be an int from 2 to 8, got 9"]),
        (unparseable, ["broken.yaml", "cannot parse"]),
        (unknown, ["qat.lrr: unknown key", "weight_bits"]),
    ]
    for path, fragments in cases:
        assert main(["train", "--config", str(path), "--output-dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        _one_error_line(err, *fragments)


def test_output_dir_problems_exit_2(trained, capsys, tmp_path):
    d, cfg, _ = trained
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["train", "--config", str(cfg), "--output-dir", str(blocker / "sub")]) == 2
    _one_error_line(capsys.readouterr().err, "cannot write to output directory")
    before = {n: (d / "run" / n).read_bytes() for n in os.listdir(d / "run")}
    assert main(["train", "--config", str(cfg)]) == 2  # the config's output_dir holds a finished run
    _one_error_line(capsys.readouterr().err, "checkpoint.pt exists", "--resume")
    assert main(["train", "--config", str(cfg), "--resume"]) == 2
    _one_error_line(capsys.readouterr().err, "already finished")
    assert {n: (d / "run" / n).read_bytes() for n in os.listdir(d / "run")} == before
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "empty"), "--resume"]) == 2
    _one_error_line(capsys.readouterr().err, "no checkpoint")
    assert main(["demo", "--output-dir", str(blocker)]) == 2
    _one_error_line(capsys.readouterr().err, "a_file is a file, not a directory")


def test_checkpoint_problems_exit_2(trained, capsys, tmp_path):
    d, cfg, _ = trained
    good = (d / "run" / "checkpoint.pt").read_bytes()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(good[: len(good) // 3])
    assert main(["train", "--config", str(cfg), "--output-dir", str(corrupt), "--resume"]) == 2
    _one_error_line(capsys.readouterr().err, "corrupt/checkpoint.pt is truncated or corrupt")
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes(good)
    changed = _write_config(tmp_path / "changed.yaml", {**SMALL, "qat": {"epochs": 2, "lr": 0.02}})
    assert main(["train", "--config", str(changed), "--output-dir", str(other), "--resume"]) == 2
    _one_error_line(capsys.readouterr().err, "different config", "qat.lr: checkpoint 0.01, config 0.02")


def test_nonfinite_loss_exits_2(capsys, tmp_path):
    from qat_plugins.regularizers import Regularizer

    class AlwaysNaN(Regularizer):
        name = "always_nan"

        def _attach(self):
            pass

        def _loss(self, inputs, targets, outputs, ctx):
            return outputs.sum() * float("nan")

    register("always_nan", AlwaysNaN)
    try:
        cfg = _write_config(tmp_path / "nan.yaml", {**SMALL, "regularizers": [{"name": "always_nan"}]})
        assert main(["-q", "train", "--config", str(cfg), "--output-dir", str(tmp_path / "out")]) == 2
    finally:
        REGISTRY.pop("always_nan", None)
    _one_error_line(capsys.readouterr().err, "regularizer 'always_nan'", "non-finite")


def test_nncf_style_config_is_routed(monkeypatch, capsys, tmp_path):
    nncf_json = tmp_path / "nncf.json"
    nncf_json.write_text(json.dumps({"input_info": {"sample_size": [1, 1, 8, 8]},
                                     "compression": {"algorithm": "quantization"}}))
    calls = []
    fake = types.ModuleType("qat_plugins.integrations.nncf")
    fake.run_config = lambda path, **kw: calls.append((path, kw))  # type: ignore[attr-defined]
    import qat_plugins.integrations as integrations

    monkeypatch.setitem(sys.modules, "qat_plugins.integrations.nncf", fake)
    monkeypatch.setattr(integrations, "nncf", fake, raising=False)
    assert main(["train", "--config", str(nncf_json), "--output-dir", "x"]) == 0
    assert calls == [(str(nncf_json), {"output_dir": "x", "resume": False})]
    del fake.run_config
    assert main(["train", "--config", str(nncf_json)]) == 2
    _one_error_line(capsys.readouterr().err, "NNCF-style", "run_config")


def test_optional_commands_say_when_missing(capsys, monkeypatch):
    import qat_plugins

    # make `qat_plugins.bench` unimportable (None in sys.modules makes `import` raise ImportError)
    monkeypatch.delattr(qat_plugins, "bench", raising=False)
    monkeypatch.setitem(sys.modules, "qat_plugins.bench", None)
    assert main(["bench"]) == 2
    _one_error_line(capsys.readouterr().err, "qat_plugins.bench")
