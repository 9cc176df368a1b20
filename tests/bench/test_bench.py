"""``qat-plugins bench``: the tiny end-to-end run (QAT_PLUGINS_BENCH_TINY=1: a few steps per method on 256
digits, every column), resumability, the scratch output directory, and the statistics of the report
(paired differences, t-intervals, targets) against hand computations."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from qat_plugins.bench import main
from qat_plugins.bench.report import (ACC_METHODS, evaluate_targets, method_label, paired_diff,
                                      t_quantile_975)
from qat_plugins.bench.settings import DEFAULT_METHODS, preset, seeds_for


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, monkeypatch_module):
    """The tiny run from a scratch working directory without --out: outputs go to ./bench-results."""
    cwd = tmp_path_factory.mktemp("bench")
    monkeypatch_module.setenv("QAT_PLUGINS_BENCH_TINY", "1")
    monkeypatch_module.chdir(cwd)
    rc = main(["--quick", "--workers", "1"])
    return rc, cwd / "bench-results"


def test_bench_tiny_end_to_end(bench_run):
    rc, res = bench_run
    assert rc == 0
    data = json.loads((res / "results.json").read_text())
    assert data["errors"] == []
    s = data["settings"]
    assert s["mode"] == "tiny" and s["datasets"] == ["digits"] and s["bits"] == [2, 4]
    tiny = preset("tiny")
    for key in ("cpu_count", "torch", "onnxruntime", "nncf"):
        assert data["machine"][key]
    runs = {(r["method"], r["bits"], r["seed"]) for r in data["runs"]}
    expected = {(m, b, sd) for m in DEFAULT_METHODS for b in (2, 4) for sd in range(seeds_for(tiny, b))}
    assert runs == expected  # 2 seeds at W2A2, 1 at W4A4, every default column
    for r in data["runs"]:
        # one result file per run, the same record as in results.json
        rec = json.loads((res / "runs" / f"{r['id']}.json").read_text())
        assert rec["test_accuracy"] == r["test_accuracy"]
        assert len(r["history"]) == tiny.qat_epochs["digits"]
        assert r["history"][-1]["test_acc"] == r["test_accuracy"]  # the final number is the last evaluation
        assert r["config"]["qat"]["augment"] is False
        assert r["config"]["qat"]["bn"]["reestimate_batches"] == tiny.bn_reestimate_batches
    fps = {(f["model"], f["seed"]): f["test_accuracy"] for f in data["fp_models"]}
    assert set(fps) == {("resnet", 0), ("resnet", 1)}
    assert "digits/resnet" in data["targets"]
    deployed = [r for r in data["runs"] if "deploy" in r]
    assert {(r["method"], r["bits"], r["seed"]) for r in deployed} == {(m, 4, 0) for m in DEFAULT_METHODS}
    t = data["timing"][0]
    assert set(t["relative_to_lsq"]) == set(DEFAULT_METHODS) and t["relative_to_lsq"]["lsq"] == 1.0


def test_bench_report_paired_columns_and_plots(bench_run):
    _, res = bench_run
    data = json.loads((res / "results.json").read_text())
    md = (res / "digits_resnet.md").read_text()
    for heading in ("### Test accuracy", "### Paired difference to LSQ", "### Targets", "### Training cost",
                    "### Deployment"):
        assert heading in md
    # the W2A2 CR cell is mean [lo, hi] of the per-seed differences, recomputed here by hand
    acc = {(r["method"], r["seed"]): r["test_accuracy"] for r in data["runs"] if r["bits"] == 2}
    d = [acc[("cr", s)] - acc[("lsq", s)] for s in (0, 1)]
    mean = (d[0] + d[1]) / 2
    half = 12.706 * abs(d[0] - d[1]) / math.sqrt(2) / math.sqrt(2)  # sd of two values = |a-b|/sqrt(2)
    row = next(line for line in md.splitlines() if line.startswith("| W2A2 |") and "[" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = next(line for line in md.splitlines() if "+CR − LSQ" in line)
    cr_col = [c.strip() for c in header.strip("|").split("|")].index("+CR − LSQ")
    assert cells[cr_col] == f"{100 * mean:+.2f} [{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}]"
    for stem in ("digits_resnet.png", "digits_resnet_curves.png"):
        png = (res / stem).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_bench_resumes_and_reruns_only_missing(bench_run, capsys):
    rc, res = bench_run
    victim = res / "runs" / "digits_resnet_s1_cr_w2a2.json"
    before = {p.name: p.stat().st_mtime_ns for p in (res / "runs").glob("*.json")}
    victim.unlink()
    assert main(["--quick", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    n_total = len(before)
    assert f"reusing {n_total - 1} finished run(s)" in out and "to run: 1 on" in out
    after = {p.name: p.stat().st_mtime_ns for p in (res / "runs").glob("*.json")}
    assert set(after) == set(before)
    assert all(after[k] == v for k, v in before.items() if k != victim.name)  # finished runs untouched
    assert not list((res / "runs").glob(".*tmp*"))  # no half-written files left


def test_bench_shared_fp_starts_every_seed_from_seed_0s_model(bench_run, tmp_path, capsys):
    """``--fp-models shared``: one FP model (seed 0's) trained, every seed's runs start from it and record it,
    the FP column holds its accuracy for each seed, and per-seed runs of other FP models are not reused."""
    _, res = bench_run
    out = tmp_path / "shared"
    (out / "runs").mkdir(parents=True)
    # the per-seed run's LSQ records: seed 0's FP model is the shared one, seed 1's is not
    for name in ("digits_resnet_s0_lsq_w2a2.json", "digits_resnet_s1_lsq_w2a2.json", "digits_resnet_s0_lsq_w4a4.json"):
        (out / "runs" / name).write_bytes((res / "runs" / name).read_bytes())
    argv = ["--quick", "--workers", "1", "--methods", "lsq", "--fp-models", "shared", "--out", str(out),
            "--cache", str(res / "cache")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "reusing 2 finished run(s)" in printed and "to run: 2 on" in printed, printed  # seed 0's only
    data = json.loads((out / "results.json").read_text())
    per_seed = json.loads((res / "results.json").read_text())
    assert data["settings"]["shared_fp"] is True and data["errors"] == []
    assert [(f["model"], f["seed"]) for f in data["fp_models"]] == [("resnet", 0)]
    key0 = next(r["fp_key"] for r in per_seed["runs"] if (r["method"], r["bits"], r["seed"]) == ("lsq", 2, 0))
    key1 = next(r["fp_key"] for r in per_seed["runs"] if (r["method"], r["bits"], r["seed"]) == ("lsq", 2, 1))
    runs = sorted([r for r in data["runs"] if r["bits"] == 2], key=lambda r: r["seed"])
    assert key0 != key1 and [(r["seed"], r["fp_seed"], r["fp_key"]) for r in runs] == [(0, 0, key0), (1, 0, key0)]
    fp0 = data["fp_models"][0]["test_accuracy"]
    md = (out / "digits_resnet.md").read_text()
    assert "One FP model (seed 0's) for every seed" in md
    assert f"| W2A2 | 2 | {100 * fp0:.2f} ± 0.00 |" in md  # both seeds' FP column is the one shared model
    gap = [fp0 - r["test_accuracy"] for r in runs]
    assert f"{100 * sum(gap) / 2:+.2f} [" in md  # FP - LSQ paired per seed against that model


def test_bench_method_subset_still_times_against_lsq(tmp_path, monkeypatch):
    """A column subset without LSQ (``--methods cr``) used to crash on its step-time ratio (None)."""
    monkeypatch.setenv("QAT_PLUGINS_BENCH_TINY", "1")
    out = tmp_path / "subset"
    assert main(["--quick", "--workers", "1", "--methods", "cr", "--bits", "4", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["errors"] == [] and {r["method"] for r in data["runs"]} == {"cr"}
    ratio = data["timing"][0]["relative_to_lsq"]
    assert ratio["lsq"] == 1.0 and math.isfinite(ratio["cr"]) and ratio["cr"] > 0


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        assert t_quantile_975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=5e-4)  # table: 3 decimals
    assert math.isnan(t_quantile_975(0))


def test_paired_diff_by_hand():
    a = {0: 0.90, 1: 0.80, 2: 0.85, 7: 0.5}
    b = {0: 0.85, 1: 0.80, 2: 0.80}
    p = paired_diff(a, b)
    # d = [0.05, 0.00, 0.05]: mean 1/30, sample sd = sqrt(((1/60)^2 * 2 + (1/30)^2) / 2) = 0.0288675
    assert p["n"] == 3 and p["seeds"] == [0, 1, 2]
    assert p["mean"] == pytest.approx(1 / 30, abs=1e-12)
    assert p["std"] == pytest.approx(0.0288675135, abs=1e-9)
    half = 4.303 * 0.0288675135 / math.sqrt(3)
    assert p["lo"] == pytest.approx(1 / 30 - half, abs=1e-9) and p["hi"] == pytest.approx(1 / 30 + half, abs=1e-9)
    assert paired_diff({0: 0.5}, {1: 0.5})["n"] == 0


def test_targets_by_hand():
    # FP 0.90 at every seed; W2A2 LSQ 0.80 (gap 10 points); CR closes 0.4 of it consistently (met),
    # FPQ 0.5 on average but one seed below LSQ (CI includes 0: missed), BR 0.2 (missed), combo 0.7 (met);
    # W4A4: best column (CR) 0.905 >= FP (met); LSQ's W2A2 seeds all at 0.80 (spread 0: met)
    fp = {s: 0.90 for s in range(3)}
    fp[3] = 0.99  # a seed without W2A2 / W4A4 runs must not enter the W4A4 comparison
    w2 = {"lsq": [0.80, 0.80, 0.80], "cr": [0.84, 0.839, 0.841], "fpq": [0.90, 0.90, 0.75],
          "br": [0.82, 0.821, 0.819], "combo": [0.87, 0.871, 0.869]}
    w4 = {"lsq": [0.89, 0.89, 0.89], "cr": [0.905, 0.905, 0.905]}
    acc = {m: {2: dict(enumerate(v))} for m, v in w2.items()}
    for m, v in w4.items():
        acc[m][4] = dict(enumerate(v))
    got = {t["target"]: t["met"] for t in evaluate_targets({"fp": fp, "acc": acc}, [2, 4],
                                                           ["lsq", "cr", "fpq", "br", "combo"])}
    assert got == {"W2A2 +CR closes >= 0.33 of LSQ's gap, CI > 0": True,
                   "W2A2 +FPQ closes >= 0.33 of LSQ's gap, CI > 0": False,
                   "W2A2 +BR closes >= 0.33 of LSQ's gap, CI > 0": False,
                   "W2A2 +CR+FPQ+BR closes >= 0.67 of LSQ's gap, CI > 0": True,
                   "W4A4: best column >= FP": True,
                   "W2A2 LSQ seed spread <= 1 point": True}
    acc["lsq"][2][2] = 0.8101  # spread 1.01 points
    got = {t["target"]: t["met"] for t in evaluate_targets({"fp": fp, "acc": acc}, [2, 4], ["lsq"])}
    assert got["W2A2 LSQ seed spread <= 1 point"] is False


def test_default_output_is_a_scratch_directory():
    from qat_plugins.bench.main import DEFAULT_OUT, parse_args

    assert parse_args([]).out == DEFAULT_OUT == "bench-results"
    assert parse_args(["--quick"]).out == DEFAULT_OUT
    gitignore = Path(__file__).resolve().parents[2] / ".gitignore"
    assert "bench-results/" in gitignore.read_text().split()


def test_bench_missing_fashion(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("qat_plugins.data.FASHION_MNIST_DIR", str(tmp_path / "nope"))
    monkeypatch.delenv("QAT_PLUGINS_BENCH_TINY", raising=False)
    rc = main(["--datasets", "fashion-mnist", "--out", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "apt-get update && apt-get install -y dataset-fashion-mnist" in err
    assert not (tmp_path / "r").exists()


def test_bench_bad_args(capsys, tmp_path):
    assert main(["--datasets", "imagenet", "--out", str(tmp_path)]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert main(["--bits", "9", "--out", str(tmp_path)]) == 2
    assert main(["--models", "vgg", "--out", str(tmp_path)]) == 2
    assert "unknown model 'vgg'" in capsys.readouterr().err
    assert main(["--seeds", "2=x", "--out", str(tmp_path)]) == 2
    assert method_label("combo") == "+CR+FPQ+BR" and ACC_METHODS[0] == "lsq"
    assert os.listdir(tmp_path) == []
