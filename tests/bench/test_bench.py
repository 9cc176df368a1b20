"""End-to-end check of ``qat-plugins bench`` with the tiny internal setting (QAT_PLUGINS_BENCH_TINY=1):
a few steps per method on 256 digits, every column, JSON + Markdown + PNG written."""

from __future__ import annotations

import json

import pytest

from qat_plugins.bench import main
from qat_plugins.bench.report import ACC_METHODS, method_label
from qat_plugins.bench.settings import preset


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("bench")
    monkeypatch_module.setenv("QAT_PLUGINS_BENCH_TINY", "1")
    rc = main(["--quick", "--out", str(out / "results"), "--cache", str(out / "cache"), "--workers", "1"])
    return rc, out / "results"


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_bench_quick_end_to_end(bench_out):
    rc, res = bench_out
    assert rc == 0
    data = json.loads((res / "results.json").read_text())
    assert data["errors"] == []
    s = data["settings"]
    assert s["mode"] == "tiny" and s["datasets"] == ["digits"] and s["bits"] == [4, 2]
    for key in ("cpu_count", "torch", "onnxruntime", "nncf"):
        assert data["machine"][key]
    assert data["wall_time_s"] > 0 and data["command"].startswith("python -m qat_plugins bench")
    runs = {(r["method"], r["bits"]) for r in data["runs"]}
    for m in ACC_METHODS:
        for b in ([8] if m == "nncf8" else [4, 2]):
            assert (m, b) in runs, (m, b)
    for r in data["runs"]:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["config"]["qat"]["augment"] is False
        assert r["config"]["qat"]["epochs"] == data["runs"][0]["config"]["qat"]["epochs"]
    deployed = [r for r in data["runs"] if "deploy" in r]
    assert {r["method"] for r in deployed} == set(ACC_METHODS)
    for r in deployed:
        assert r["deploy"]["int8"]["size_bytes"] > 0 and "latency_rel_fp32" in r["deploy"]["int8"]
        if r["bits"] == 4:
            assert 0.0 <= r["deploy"]["int4"]["top1_agreement"] <= 1.0
    t = data["timing"][0]
    assert set(t["relative_to_lsq"]) == set(ACC_METHODS) and t["relative_to_lsq"]["lsq"] == 1.0
    assert {m["method"] for m in data["memory"]} == set(ACC_METHODS)
    assert all(m["delta_mb"] >= 0 for m in data["memory"])
    assert len(data["fp_models"]) == 1 and 0 <= data["fp_models"][0]["test_accuracy"] <= 1


def test_bench_markdown_and_plot(bench_out):
    _, res = bench_out
    md = (res / "digits.md").read_text()
    for col in ["FP"] + [method_label(m, preset("tiny").combo) for m in ACC_METHODS]:
        assert f"| {col} |" in md or f" {col} |" in md, col
    assert "| W4A4 |" in md and "| W2A2 |" in md
    for heading in ("### Test accuracy", "### Training cost", "### Deployment"):
        assert heading in md
    for col in ("step time / LSQ", "peak RSS growth MiB", "INT8 KB", "INT4 KB", "ORT latency INT8 / FP32",
                "top-1 agree INT4"):
        assert col in md
    png = (res / "digits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_bench_missing_fashion(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("qat_plugins.data.FASHION_MNIST_DIR", str(tmp_path / "nope"))
    rc = main(["--datasets", "fashion-mnist", "--out", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "apt-get update && apt-get install -y dataset-fashion-mnist" in err


def test_bench_bad_args(capsys):
    assert main(["--datasets", "imagenet"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert main(["--bits", "9"]) == 2
