"""DDP training on CPU (gloo, 2 processes on 127.0.0.1): ranks stay identical, match a single process.

``test_two_ranks_stay_identical_and_match_one_process`` -- ``torch.multiprocessing.spawn`` of 2 ranks
running :func:`train_qat` (which wraps the student in DDP after the calibration forward) with CR (EMA
teacher), CR (teacher-free, an extra student forward outside DDP) and BR attached:

* A: identical parameters (weights, LSQ step sizes) and buffers on both ranks; identical EMA teacher;
  the same BR block every step (BR without a seed samples from torch's global generator, seeded alike
  on every rank; the trainer also broadcasts rank 0's regularizer state before the first step);
* B: a BN ResNet from a config (CR with random views, augmented inputs, BR): identical ranks (BN
  running statistics included) and interrupted + resumed == uninterrupted DDP run, bit for bit;
* C: a non-finite loss on rank 1 only skips the step on both ranks (no rank left in an all-reduce);
* E: ``qat_plugins.attach(ddp_model, ...)`` hooks the wrapped module once, by its own names;
* only rank 0 writes checkpoints and logs.

Against one process on the same global batch (2 x 32 vs 64 samples), tolerance and why: the
comparison uses a BN-free model, deterministic CR views (a fixed 1-pixel roll) and the BR block
sequence of the DDP run. BatchNorm is left out because per-shard batch statistics (32 instead of 64
samples) change every normalised activation by O(1/sqrt(32)); on the BN ResNet DDP and one process
differed by about 1.2x the size of the weight update itself, so there is nothing tight to assert.

* 6 steps with the activation step sizes frozen: weights, biases and weight step sizes must agree
  within ``RTOL = 1e-3`` of the single-process update (max |DDP - single| / max |single - init| per
  tensor). Measured: most tensors bit-identical, the rest <= 9e-5 (float summation order of the
  all-reduce average of two half-batch gradients; an occasional 4-bit rounding flip).
* 1 step with learned activation step sizes: same for weights; activation step sizes move sqrt(2)
  times as far as in one process (accepted 1.30..1.53, measured 1.41..1.46), because LSQ's gradient
  scale ``g = 1/sqrt(numel(x) * Q_P)`` sees the local half-size activation tensor. One-step updates
  below 20 float32 ulps are only sanity-checked (their ratio is quantised).

``test_cli_under_torchrun`` -- ``torchrun --nproc_per_node 2 -m qat_plugins train --config ...`` with
FP training, CR and BR: one results line, one log line per epoch, one checkpoint and results file.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
BATCH = 32  # per rank; the single-process reference uses WORLD * BATCH
STEPS = 6
SMALL: dict[str, Any] = {
    "data": {"limit_train": WORLD * BATCH * STEPS, "batch_size": BATCH},  # divisible: no sampler padding
    "model": {"name": "resnet", "width": 4},
    "fp": {"epochs": 0},
    # snap_biases off: its per-channel rounding amplifies the float gap between DDP and one process
    # that the comparison below measures (each rank snaps identically; tests/quant/test_bias.py)
    "qat": {"epochs": 1, "augment": False, "snap_biases": False},
    "output_dir": None,
    "progress": False,
}
RESNET_CFG: dict[str, Any] = {  # the realistic flow: BN, random CR views, augmented student inputs
    **SMALL,
    "data": {"limit_train": 256, "batch_size": BATCH},
    "qat": {"epochs": 1, "augment": True},
    "regularizers": [{"name": "cr"}, {"name": "br", "blocks": ["layer1", "layer2"], "seed": 3}],
}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NoBN(nn.Module):
    """conv -> layer1 -> layer2 -> layer3 -> pool -> fc without BatchNorm (per-shard BN stats aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.conv1(x)))))
        return self.fc(self.flatten(self.pool(x)))


def _roll(x: torch.Tensor) -> torch.Tensor:
    """A deterministic per-sample 'augmentation' (the same on a shard as on the global batch)."""
    return torch.roll(x, 1, dims=-1)


class _Replay(random.Random):
    """BR's RNG replaying a recorded block sequence (the single-process reference)."""

    def __init__(self, blocks: list[str]) -> None:
        super().__init__(0)
        self.blocks = list(blocks)

    def choice(self, seq):  # type: ignore[no-untyped-def, override]
        return self.blocks.pop(0)


def _regularizers(br_rng: list[str] | None = None) -> list:
    from qat_plugins import BlockReplacementRegularizer, ConsistencyRegularizer

    br = BlockReplacementRegularizer(["layer1", "layer2", "layer3"])  # seed=None: torch's global generator
    if br_rng is not None:
        br._rng = _Replay(br_rng)
    return [ConsistencyRegularizer(augment=_roll, teacher="ema"),
            ConsistencyRegularizer(augment=_roll, weight=0.5), br]


def _prepare_fixed_act_scales(fp_model, data, cfg):  # type: ignore[no-untyped-def]
    """``prepare_student`` with the activation step sizes frozen (their LSQ gradient scale sees the local batch)."""
    from qat_plugins.training import prepare_student

    student = prepare_student(fp_model, data, cfg)
    for name, p in student.named_parameters():
        if name.endswith("activation_post_process.scale"):
            p.requires_grad_(False)
    return student


def _nan_regularizer_class():  # type: ignore[no-untyped-def]
    from qat_plugins import Regularizer

    class NaNOnRank1(Regularizer):
        """Non-finite on rank 1's 2nd step only: both ranks must skip that step."""

        name = "nan_rank1"

        def _attach(self) -> None:
            pass

        def _loss(self, inputs, targets, outputs, ctx):  # type: ignore[no-untyped-def]
            bad = torch.distributed.get_rank() == 1 and self.steps == 1
            return outputs.sum() * (float("nan") if bad else 0.0)

    return NaNOnRank1


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    import qat_plugins.training.trainer as trainer
    from qat_plugins.training import load_data, train_qat, update_config
    from qat_plugins.training.distributed import distributed_session

    saves: list[str] = []
    real_save = trainer.save_checkpoint

    def counting_save(path, state):  # type: ignore[no-untyped-def]
        saves.append(str(path))
        return real_save(path, state)

    trainer.save_checkpoint = counting_save
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("qat_plugins")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    result: dict[str, Any] = {}
    with distributed_session():
        assert torch.distributed.get_world_size() == WORLD and torch.distributed.get_backend() == "gloo"
        # A: BN-free model, CR (EMA) + CR (teacher-free) + BR on the DDP-wrapped student
        data = load_data(SMALL)
        fp = NoBN()
        fp.load_state_dict(torch.load(Path(out) / "fp_nobn.pt", weights_only=True))
        regs = _regularizers()
        snap: dict[str, Any] = {"blocks": [], "losses": []}

        def cb(step: int, metrics: dict) -> None:
            snap["blocks"].append(regs[2].last_blocks[0])
            snap["losses"].append(metrics["loss"])
            snap["ema"] = _state(regs[0].ema)
            snap["wrapped"] = type(regs[0].model).__name__

        res = train_qat(fp, data, SMALL, regularizers=regs, callback=cb, prepare_fn=_prepare_fixed_act_scales)
        result["A"] = {"model": _state(res.model), **snap, "steps": res.steps}
        # D: one step with learnable activation step sizes (LSQ gradient scale of the local batch)
        res_d = train_qat(fp, data, SMALL, regularizers=_regularizers(br_rng=snap["blocks"][:1]), max_steps=1)
        result["D"] = _state(res_d.model)

        # B: BN ResNet from the config (CR default, BR), checkpoints; interrupted + resumed == uninterrupted
        data_b = load_data(RESNET_CFG)
        from qat_plugins.training import build_fp_model

        fp_b = build_fp_model(RESNET_CFG, data_b)
        full = train_qat(fp_b, data_b, RESNET_CFG, checkpoint_path=Path(out) / "full.pt")
        part = train_qat(fp_b, data_b, RESNET_CFG, checkpoint_path=Path(out) / "part.pt", max_steps=2)
        resumed = train_qat(fp_b, data_b, RESNET_CFG, checkpoint_path=Path(out) / "part.pt", resume=True)
        result["B"] = {"full": _state(full.model), "resumed": _state(resumed.model), "part_steps": part.steps,
                       "steps": resumed.steps, "history": [h["test_acc"] for h in full.history]}

        # C: a non-finite loss on rank 1 only, nan_policy skip
        cfg_c = update_config(SMALL, {"nan_policy": "skip", "data.limit_train": WORLD * BATCH * 3})
        res_c = train_qat(fp, load_data(cfg_c), cfg_c, regularizers=[_nan_regularizer_class()()])
        result["C"] = {"model": _state(res_c.model), "skipped": res_c.skipped_batches, "steps": res_c.steps}

        # E: qat_plugins.attach on a DDP wrapper: unwrapped names, each hook once, all gone on detach
        import qat_plugins as qp
        from qat_plugins.taps import find_site
        from qat_plugins.training import prepare_student
        from qat_plugins.training.distributed import wrap_ddp

        student = prepare_student(fp, data, SMALL)
        plain = copy.deepcopy(student)
        ddp = wrap_ddp(student)
        base = _hooks(ddp)
        with qp.attach(ddp, _regularizers(), fp_model=fp):
            on_ddp = _hooks(ddp) - base
        with qp.attach(plain, _regularizers(), fp_model=fp):
            on_plain = _hooks(plain) - base
        try:
            find_site(ddp, "module.layer1")
            wrapped_name = "accepted"
        except ValueError as e:
            wrapped_name = str(e)
        result["E"] = {"on_ddp": on_ddp, "on_plain": on_plain, "after": _hooks(ddp) - base,
                       "site": find_site(ddp, "layer1").module is student.layer1, "wrapped_name": wrapped_name}
    result["saves"] = saves
    result["log"] = records
    torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    fp = NoBN()
    torch.save(fp.state_dict(), out / "fp_nobn.pt")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return out, fp, ranks


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    diff = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not diff, f"{what}: {diff[:5]}"


def test_two_ranks_stay_identical_and_match_one_process(ddp_results):
    out, fp, (r0, r1) = ddp_results
    a0, a1 = r0["A"], r1["A"]
    # every parameter (weights, LSQ step sizes) and buffer (zero points, flags) identical on both ranks
    _assert_same(a0["model"], a1["model"], "student")
    assert any(k.endswith("activation_post_process.scale") for k in a0["model"])
    # the EMA teacher was built and updated on the DDP-wrapped student, identically on both ranks
    assert a0["wrapped"] == "DistributedDataParallel"
    _assert_same(a0["ema"], a1["ema"], "EMA teacher")
    # both ranks replaced the same block at every step
    assert a0["blocks"] == a1["blocks"] and len(a0["blocks"]) == STEPS == a0["steps"]
    assert len(set(a0["blocks"])) > 1

    # B: BN model: identical ranks (BN running stats synced at the end) and exact DDP resume
    b0, b1 = r0["B"], r1["B"]
    _assert_same(b0["full"], b1["full"], "BN student")
    assert b0["part_steps"] == 2 and b0["steps"] == 256 // (WORLD * BATCH)
    _assert_same(b0["full"], b0["resumed"], "rank 0 resumed vs uninterrupted")
    _assert_same(b1["full"], b1["resumed"], "rank 1 resumed vs uninterrupted")
    assert b0["history"] == b1["history"]

    # C: the NaN on rank 1 skipped the step on both ranks, which stayed identical
    assert r0["C"]["skipped"] == r1["C"]["skipped"] == 1 and r0["C"]["steps"] == 3
    _assert_same(r0["C"]["model"], r1["C"]["model"], "after a skipped step")

    # E: attach(ddp_model, ...) hooks the wrapped module once, by its own names, and detaches cleanly
    e0 = r0["E"]
    assert e0["on_ddp"] == e0["on_plain"] > 0 and e0["after"] == 0 and e0["site"]
    assert "layer 'module.layer1' not found" in e0["wrapped_name"]

    # only rank 0 writes checkpoints and logs
    assert r0["saves"] and not r1["saves"]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pt" and p.name[:4] in ("full", "part")) == \
        ["full.pt", "part.pt"]
    assert any("qat epoch 1/1" in m for m in r0["log"]) and not r1["log"]

    # against one process on the same global batch (see the module docstring for the tolerance)
    from qat_plugins.training import load_data, prepare_student, train_qat, update_config

    cfg1 = update_config(SMALL, {"data.batch_size": WORLD * BATCH})
    data = load_data(cfg1)
    init = _state(prepare_student(fp, data, cfg1))
    single = train_qat(fp, data, cfg1, regularizers=_regularizers(br_rng=a0["blocks"]),
                       prepare_fn=_prepare_fixed_act_scales)
    assert single.steps == STEPS
    one = train_qat(fp, data, cfg1, regularizers=_regularizers(br_rng=a0["blocks"][:1]), max_steps=1)
    rows = _compare(a0["model"], _state(single.model), init, act_ratio=None) + \
        _compare(r0["D"], _state(one.model), init, act_ratio=(1.30, 1.53))
    print(f"\nDDP ({WORLD} x {BATCH}) vs one process ({WORLD * BATCH}), relative to the single-process update:")
    for run_name, k, what, r, ok in rows:
        print(f"  {run_name:28s} {k:46s} {what:22s} {r:.2e}{'' if ok else '  <-- out of tolerance'}")
    assert all(row[-1] for row in rows)


RTOL = 1e-3  # gap / update for weights, biases, weight step sizes (measured: see the test output)


def _compare(ddp: dict, single: dict, init: dict, act_ratio: tuple[float, float] | None) -> list:
    name = f"{STEPS} steps, act. scales fixed" if act_ratio is None else "1 step, act. scales learned"
    rows = []
    for k, v in single.items():
        if not v.is_floating_point() or k.endswith("zero_point") or torch.equal(v, init[k]):
            ok = torch.equal(v, ddp[k])  # flags, zero points, untouched (frozen) step sizes: bit-identical
            if not ok:
                rows.append((name, k, "unchanged, differs", float("nan"), False))
            continue
        moved = (v - init[k]).abs().max().item()
        gap = (ddp[k] - v).abs().max().item()
        if act_ratio is not None and k.endswith("activation_post_process.scale"):
            # LSQ gradient scale 1/sqrt(numel * Q_P) of the half-size local batch: sqrt(2) x the update.
            # A one-step update of a step size is a few float32 ulps; below 20 ulps only sanity-check it.
            ulps = moved / (torch.finfo(torch.float32).eps * v.abs().max().item())
            if ulps < 20:
                # too few ulps for a ratio; instead the DDP update must lie in the same ratio band
                # around the single-process update, up to the rounding of the two stored values
                # (half an ulp each, the second scaled by <= 1.53: 1.5 ulp of slack)
                du, su = ddp[k] - init[k], v - init[k]
                slack = 1.5 * torch.finfo(torch.float32).eps * v.abs().max().item()
                lo = torch.minimum(act_ratio[0] * su, act_ratio[1] * su) - slack
                hi = torch.maximum(act_ratio[0] * su, act_ratio[1] * su) + slack
                rows.append((name, k, f"tiny update ({ulps:.0f} ulp)", gap / moved, bool(((du >= lo) & (du <= hi)).all())))
                continue
            ratio = ((ddp[k] - init[k]) / (v - init[k])).mean().item()
            rows.append((name, k, "act. scale update ratio", ratio, act_ratio[0] <= ratio <= act_ratio[1]))
        else:
            rows.append((name, k, "gap / update", gap / moved, gap <= RTOL * moved))
    return rows


def test_cli_under_torchrun(tmp_path):
    cfg = {**RESNET_CFG, "fp": {"epochs": 1}, "output_dir": str(tmp_path / "run"), "checkpoint_every": 1}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun picks a free port and a random rendezvous id itself (a port chosen here may be
    # taken by another job before torchrun binds it, and a shared default id joins a foreign rendezvous)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "qat_plugins", "train", "--config", str(path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("QAT W4A4 test top-1") == 1, proc.stdout  # rank 0 prints, rank 1 does not
    assert proc.stderr.count("fp epoch 1/1") == 1 and proc.stderr.count("qat epoch 1/1") == 1, proc.stderr
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint.pt", "results.json"]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["steps"] == 256 // (WORLD * BATCH) and set(res["history"][0]["reg_losses"]) == {"cr", "br"}
