"""``benchmarks/cost_floor.py`` (issue 11's cost table): the bootstrap interval and the summary over
processes against hand computations, and ``--processes`` end to end in real child processes."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qat_plugins.regularizers import StepContext

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cost_floor.py"


@pytest.fixture(scope="module")
def cost_floor():
    spec = importlib.util.spec_from_file_location("cost_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(lsq_ms, **ratios):
    return {"SmallResNet": {"LSQ": {"ms": lsq_ms}, **{m: {"ratio": r} for m, r in ratios.items()}}}


def test_ratio_interval_by_hand(cost_floor):
    # every round the same ratio: every resample gives exactly that ratio
    assert cost_floor.ratio_interval([0.3, 0.3, 0.3], [0.1, 0.1, 0.1]) == pytest.approx((3.0, 3.0), rel=1e-12)
    # two rounds: a resample is {a, a}, {a, b} or {b, b}; the ratio of medians lies between
    # 0.2 / 0.1 = 2 and 0.6 / 0.2 = 3, and with 2000 resamples both extremes ({a, a} and {b, b},
    # probability 1/4 each) fall inside the 2.5 % tails, so the interval is exactly (2, 3)
    lo, hi = cost_floor.ratio_interval([0.2, 0.6], [0.1, 0.2])
    assert (lo, hi) == pytest.approx((2.0, 3.0), rel=1e-12)
    assert cost_floor.ratio_interval([0.2, 0.6], [0.1, 0.2]) == (lo, hi)  # seeded: the same times, the same interval
    with pytest.raises(ValueError, match="one entry per round"):
        cost_floor.ratio_interval([0.1, 0.2], [0.1])


def test_summary_over_processes_by_hand(cost_floor):
    runs = [_run(60.0, CR=2.00, **{"CR+FPQ+BR": 2.39}),
            _run(80.0, CR=1.98, **{"CR+FPQ+BR": 2.41}),
            _run(70.0, CR=2.10, **{"CR+FPQ+BR": 2.37})]
    lines = cost_floor.summarize_processes(runs).splitlines()
    assert lines[0] == "| SmallResNet, process | LSQ | CR | CR+FPQ+BR |"
    assert lines[2:5] == ["| 1 | 60 ms | 2.000x | 2.390x |", "| 2 | 80 ms | 1.980x | 2.410x |",
                          "| 3 | 70 ms | 2.100x | 2.370x |"]
    # medians 70 ms, CR 2.00 (2.10 misses 2.05), combination 2.39 (2.41 misses 2.4): judged on the median
    assert lines[5] == ("| median [range] | 70 ms | 2.000x [1.980, 2.100] 2/3 met ok | "
                        "2.390x [2.370, 2.410] 2/3 met ok |")
    missed = cost_floor.summarize_processes(runs[1:]).splitlines()[-1]
    assert "2.040x [1.980, 2.100] 1/2 met ok" in missed and "2.390x [2.370, 2.410] 1/2 met ok" in missed
    worse = [_run(60.0, KD=1.16), _run(60.0, KD=1.14), _run(60.0, KD=1.17)]
    assert cost_floor.summarize_processes(worse).splitlines()[-1].endswith("1.160x [1.140, 1.170] 1/3 met MISSED |")


def test_table_args_rebuild_the_tables_options_only(cost_floor):
    """A child of ``--processes`` gets the table's options from the parsed arguments (so an abbreviated
    ``--proc 3`` cannot reach it and make it spawn processes of its own), never ``--processes``,
    ``--out`` or ``--json``."""
    args = argparse.Namespace(rounds=5, mode="fx", models=["SmallResNet"], methods=["KD", "CR+FPQ+BR"],
                              glibc_defaults=True, processes=3, out="t.md", json="x.json")
    assert cost_floor._table_args(args) == ["--rounds", "5", "--mode", "fx", "--models", "SmallResNet",
                                            "--methods", "KD", "CR+FPQ+BR", "--glibc-defaults"]
    args = argparse.Namespace(rounds=20, mode="eager", models=["SmallResNet", "ResNet20"], methods=None,
                              glibc_defaults=False, processes=2, out=None, json=None)
    assert cost_floor._table_args(args) == ["--rounds", "20", "--mode", "eager", "--models", "SmallResNet", "ResNet20"]


def test_processes_end_to_end_in_fresh_processes(tmp_path):
    """Two real child processes time LSQ and KD; the summary lists both and their median, and nothing
    but ``--out`` is written (the children's JSON goes to a temporary directory). ``--proc``, argparse's
    abbreviation, must not reach the children (they would each spawn processes again)."""
    out = tmp_path / "summary.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--proc", "2", "--rounds", "2", "--models", "SmallResNet",
                           "--methods", "KD", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]
    lines = out.read_text().splitlines()
    assert lines[0] == "| SmallResNet, process | LSQ | KD | KD floor |"
    rows = [line.split(" | ") for line in lines[2:4]]
    assert [r[0] for r in rows] == ["| 1", "| 2"]
    kd = sorted(float(r[2].rstrip(" |x")) for r in rows)
    lsq = sorted(float(r[1].removesuffix(" ms")) for r in rows)
    med = lines[4].split(" | ")
    # the median of two processes is their mean (3 decimals: rounding of the printed ratios)
    assert float(med[2].split("x")[0]) == pytest.approx(sum(kd) / 2, abs=1e-3)
    assert float(med[1].removesuffix(" ms")) == pytest.approx(sum(lsq) / 2, abs=1)
    assert med[2].endswith((" ok", " MISSED")) and "/2 met" in med[2]
    # KD's floor: no target of its own, a median like any column
    floors = sorted(float(r[3].rstrip(" |x")) for r in rows)
    assert float(med[3].split("x")[0]) == pytest.approx(sum(floors) / 2, abs=1e-3) and "met" not in med[3]


def test_kd_floor_is_kds_own_fp_forward_timed_with_the_methods(cost_floor):
    """The "KD floor" column: KD's frozen FP model, forwarded as the step's shared FP forward runs it
    (the same logits KD distils to), timed in the same rounds as the methods; the floor is
    ``1 + its median / LSQ's median``, by hand from the returned milliseconds."""
    fp, x, y = cost_floor._small_case()
    runs = cost_floor._setups(fp, x, cost_floor.BLOCKS, "eager", ["LSQ", "KD"])
    try:
        regs = runs["KD"][1]
        teacher = StepContext(x, regs.fp_model, []).fp_forward()  # the logits KD distils to
        assert torch.equal(cost_floor._fp_forward(runs["KD"], x)(), teacher)
        extra = {"FP": (cost_floor._fp_forward(runs["KD"], x), [])}
        cost_floor._interleave(runs, x, y, rounds=2, warmup=1, extra=extra)
        assert len(extra["FP"][1]) == 2 and len(runs["LSQ"][3]) == 2 and len(runs["KD"][3]) == 2
    finally:
        for _, r, _, _ in runs.values():
            r.detach()
    table, results = cost_floor.main_table(["SmallResNet"], ["LSQ", "KD"], "eager", rounds=2)
    lines = table.splitlines()
    assert lines[0] == "| model | LSQ | KD | KD floor |" and lines[-1] == "| target | 1 | <= 1.15x | - |"
    floor, lsq = results["SmallResNet"]["KD floor"], results["SmallResNet"]["LSQ"]
    assert floor["ratio"] == pytest.approx(1 + floor["ms"] / lsq["ms"], rel=1e-12)
    assert f"{floor['ratio']:.3f}x (FP forward {floor['ms']:.0f} ms)" in lines[2]
    _, without_kd = cost_floor.main_table(["SmallResNet"], ["LSQ", "BR"], "eager", rounds=1)
    assert "KD floor" not in without_kd["SmallResNet"]


def test_processes_must_be_positive(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--processes", "0"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--processes must be >= 1" in proc.stderr
