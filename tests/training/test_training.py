"""Training: config validation, determinism, exact resume, NaN handling, atomic checkpoints."""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import qat_plugins as qp
from host_reads import HostReads
from qat_plugins.regularizers import REGISTRY, NonFiniteLossError, Regularizer, register
from qat_plugins.training import (
    NNCFStyleConfig,
    TrainConfig,
    build_loader,
    config_hash,
    evaluate,
    is_nncf_config,
    load_checkpoint,
    load_config,
    load_data,
    prepare_student,
    run,
    save_checkpoint,
    train_step,
    update_config,
)

# 192 training samples, batch 64: 3 steps per epoch, 6 QAT steps; CR (EMA teacher state) and
# augmented student inputs so that every RNG and regularizer state matters for exactness.
TINY: dict[str, Any] = {
    "data": {"limit_train": 192, "batch_size": 64},
    "model": {"name": "cnn", "width": 4},
    "fp": {"epochs": 1},
    "qat": {"epochs": 2, "augment": True},
    "regularizers": [{"name": "cr"}],
    "output_dir": None,
    "progress": False,
}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _no_time(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


# --- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, field", [
    ({"qat": {"weight_bits": 9}}, "qat.weight_bits"),
    ({"qat": {"act_bits": 1}}, "qat.act_bits"),
    ({"qat": {"mode": "onnx"}}, "qat.mode"),
    ({"qat": {"lr": 0}}, "qat.lr"),
    ({"qat": {"momentum": 1.0}}, "qat.momentum"),
    ({"qat": {"schedule": "step"}}, "qat.schedule"),
    ({"qat": {"augment": "yes"}}, "qat.augment"),
    ({"qat": {"epochs": 0}}, "qat.epochs"),
    ({"data": {"name": "cifar"}}, "data.name"),
    ({"data": {"batch_size": 0}}, "data.batch_size"),
    ({"data": {"name": "idx"}}, "data.data_dir"),
    ({"data": {"limit_train": -1}}, "data.limit_train"),
    ({"data": {"name": "fashion-mnist", "size": 16}}, "data.size"),
    ({"model": {"name": "vgg"}}, "model.name"),
    ({"model": {"width": True}}, "model.width"),
    ({"fp": {"optimizer": "lamb"}}, "fp.optimizer"),
    ({"fp": {"epochs": 1.5}}, "fp.epochs"),
    ({"fp": {"lr": float("nan")}}, "fp.lr"),
    ({"seed": -1}, "seed"),
    ({"nan_policy": "ignore"}, "nan_policy"),
    ({"max_skipped": "3"}, "max_skipped"),
    ({"checkpoint_every": -5}, "checkpoint_every"),
    ({"num_threads": 0}, "num_threads"),
    ({"progress": 1}, "progress"),
    ({"output_dir": ""}, "output_dir"),
    ({"qat": [4, 4]}, "qat"),
    ({"regularizers": [{"name": "nope"}]}, "regularizers[0].name"),
    ({"regularizers": [{"name": "cr", "weight": -1}]}, "regularizers[0].weight"),
    ({"regularizers": [{"name": "cr"}, {"name": "cr", "bogus": 1}]}, "regularizers[1].bogus"),
    ({"regularizers": {"name": "cr"}}, "regularizers"),
])
def test_config_errors_name_the_field(raw, field):
    with pytest.raises(ValueError) as e:
        load_config(raw)
    assert str(e.value).startswith(f"{field}:"), str(e.value)


def test_config_error_message_says_what_is_allowed():
    with pytest.raises(ValueError, match=r"^qat\.weight_bits: must be an int from 2 to 8, got 9$"):
        load_config({"qat": {"weight_bits": 9}})
    with pytest.raises(ValueError, match=r"^qat\.lrr: unknown key; allowed keys in qat: weight_bits, act_bits"):
        load_config({"qat": {"lrr": 0.1}})
    with pytest.raises(ValueError, match=r"^epochs: unknown key; allowed keys: seed, .*qat.*regularizers"):
        load_config({"epochs": 3})


def test_config_defaults_round_trip_and_hash():
    cfg = load_config({})
    assert isinstance(cfg, TrainConfig) and cfg.kind == "qat_plugins"
    assert cfg.qat.weight_bits == 4 and cfg.data.name == "digits" and cfg.regularizers == []
    assert load_config(cfg.to_dict()) == cfg
    moved = update_config(cfg, {"output_dir": "elsewhere", "progress": False, "checkpoint_every": 7})
    assert config_hash(moved) == config_hash(cfg)  # result-neutral fields
    assert config_hash(update_config(cfg, {"qat.lr": 0.02})) != config_hash(cfg)
    with pytest.raises(ValueError, match=r"^qat\.lr: must be"):
        update_config(cfg, {"qat.lr": -1})


def test_config_files(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("seed: 3\nqat:\n  weight_bits: 3\nregularizers:\n  - name: cr\n    weight: 0.5\n")
    cfg = load_config(y)
    assert cfg.seed == 3 and cfg.qat.weight_bits == 3 and cfg.regularizers == [{"name": "cr", "weight": 0.5}]
    j = tmp_path / "c.json"
    j.write_text(json.dumps(cfg.to_dict()))
    assert load_config(j) == cfg
    examples = Path(__file__).resolve().parents[2] / "examples" / "train_config.yaml"
    assert isinstance(load_config(examples), TrainConfig)

    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("qat: [1, 2\n")
    with pytest.raises(ValueError, match=r"cannot parse config file .*bad\.yaml"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.yaml is empty"):
        load_config(empty)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("qat:\n  mode: fast\n")
    with pytest.raises(ValueError, match=r"wrong\.yaml: qat\.mode: must be one of eager, fx, pt2e"):
        load_config(wrong)


def test_nncf_style_config_is_tagged(tmp_path):
    raw = {"input_info": {"sample_size": [1, 1, 8, 8]}, "compression": {"algorithm": "quantization"}}
    assert is_nncf_config(raw) and not is_nncf_config({"qat": {}})
    p = tmp_path / "nncf.json"
    p.write_text(json.dumps(raw))
    out = load_config(p)
    assert isinstance(out, NNCFStyleConfig) and out.kind == "nncf" and out.raw == raw and out.path == str(p)
    with pytest.raises(ValueError, match="NNCF-style"):
        run(raw)


# --- data / evaluation --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data():
    return load_data(TINY)


def test_loader_is_deterministic_and_resumable(tiny_data):
    ds = tiny_data.train
    before = torch.get_rng_state()
    order = [y.tolist() for _, y in build_loader(ds, 64, seed=5, epoch=1)]
    assert torch.equal(before, torch.get_rng_state())  # iterating does not touch the global RNG
    assert order == [y.tolist() for _, y in build_loader(ds, 64, seed=5, epoch=1)]
    assert order != [y.tolist() for _, y in build_loader(ds, 64, seed=5, epoch=2)]
    assert [y.tolist() for _, y in build_loader(ds, 64, seed=5, epoch=1, skip_batches=2)] == order[2:]


def test_evaluate_inputs_agree_and_restore_mode(tiny_data, fp_cnn):
    x, y = tiny_data.test.tensors
    model = copy.deepcopy(fp_cnn)  # switched to train mode below: never the shared model
    model.train()
    a = evaluate(model, tiny_data.test)
    assert model.training
    model.eval()
    loader = torch.utils.data.DataLoader(tiny_data.test, batch_size=100)
    assert a == evaluate(model, loader) == evaluate(model, (x, y)) == evaluate(model, tiny_data)
    with torch.no_grad():  # by hand: eval-mode top-1 over the whole split
        assert a == pytest.approx((model(x).argmax(1) == y).sum().item() / len(y), abs=1e-12)


# --- determinism and resume ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run with checkpoints (the reference for resume)."""
    out = tmp_path_factory.mktemp("ref")
    return run(TINY, output_dir=out), out


def test_same_config_twice_gives_identical_weights(reference):
    ref, out = reference
    again = run(TINY)
    assert _same_weights(ref.model.state_dict(), again.model.state_dict())
    assert _same_weights(ref.fp_model.state_dict(), again.fp_model.state_dict())
    assert _no_time(ref.history) == _no_time(again.history)
    assert ref.steps == 6 and len(ref.history) == 2 and ref.history[-1]["reg_losses"].keys() == {"cr"}
    assert ref.mean_step_time > 0
    # the reported accuracy is the trained model's eval-mode top-1 on the test split, by hand
    x, y = load_data(load_config(TINY)).test.tensors
    model = copy.deepcopy(ref.model).eval()
    with torch.no_grad():
        assert ref.test_accuracy == pytest.approx((model(x).argmax(1) == y).sum().item() / len(y), abs=1e-12)
    results = json.loads((out / "results.json").read_text())
    assert results["test_accuracy"] == ref.test_accuracy and results["config"]["qat"]["epochs"] == 2
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "results.json"]  # no temp files left
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["progress"]["step"] == 6 and ckpt["config_hash"] == config_hash(load_config(TINY))
    assert ckpt["package_version"] == qp.__version__
    assert {"torch", "numpy", "python", "generators"} <= set(ckpt["rng"])
    assert ckpt["regularizers"]["regularizers"][0]["config"]["name"] == "cr"
    assert any(k.endswith(".scale") for k in ckpt["model"])  # fake-quant state


@pytest.mark.parametrize("stop_at", [4, 3])  # mid-epoch (epoch 2, batch 1) and at an epoch boundary
def test_interrupted_then_resumed_run_equals_uninterrupted(reference, tmp_path, stop_at):
    ref, _ = reference
    part = run(TINY, output_dir=tmp_path, max_steps=stop_at)
    assert part.interrupted and part.steps == stop_at
    assert not (tmp_path / "results.json").exists()
    resumed = run(TINY, output_dir=tmp_path, resume=True)
    assert not resumed.interrupted and resumed.steps == 6
    assert _same_weights(ref.model.state_dict(), resumed.model.state_dict())
    assert _no_time(ref.history) == _no_time(resumed.history)
    assert resumed.test_accuracy == ref.test_accuracy
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "results.json"]


def test_resume_after_callback_raises(reference, tmp_path):
    ref, _ = reference

    def crash(step: int, metrics: dict) -> None:
        assert metrics["step"] == step and "loss" in metrics
        if step == 2:
            raise KeyboardInterrupt

    cfg = update_config(TINY, {"checkpoint_every": 1})
    with pytest.raises(KeyboardInterrupt):
        run(cfg, output_dir=tmp_path, callback=crash)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["progress"]["step"] == 2
    resumed = run(cfg, output_dir=tmp_path, resume=True)
    assert _same_weights(ref.model.state_dict(), resumed.model.state_dict())


def test_resume_with_another_config_names_the_fields(reference, tmp_path):
    run(TINY, output_dir=tmp_path, max_steps=1)
    other = update_config(TINY, {"qat.lr": 0.05, "seed": 1, "output_dir": "ignored"})
    with pytest.raises(ValueError, match=r"different config: qat\.lr: checkpoint 0\.01, config 0\.05; seed"):
        run(other, output_dir=tmp_path, resume=True)


def test_output_dir_is_never_overwritten(reference, tmp_path):
    _, finished = reference
    with pytest.raises(FileExistsError, match="--resume"):
        run(TINY, output_dir=finished)
    with pytest.raises(FileExistsError, match="already finished"):
        run(TINY, output_dir=finished, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(TINY, output_dir=tmp_path / "fresh", resume=True)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot write to output directory"):
        run(TINY, output_dir=blocker / "sub")


# --- checkpoints --------------------------------------------------------------------------------
def test_checkpoint_write_is_atomic(tmp_path):
    p = tmp_path / "ckpt.pt"
    save_checkpoint(p, {"model": {"w": torch.ones(2)}})
    # the pickler's own error (a local lambda: AttributeError on Python 3.11, PicklingError later)
    with pytest.raises((pickle.PicklingError, AttributeError), match="[Pp]ickle"):
        save_checkpoint(p, {"model": {"w": torch.zeros(2)}, "bad": lambda: None})  # unpicklable
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    assert torch.equal(torch.load(p, weights_only=True)["model"]["w"], torch.ones(2))  # old one intact


def test_corrupt_checkpoint_gives_a_clear_error(reference, tmp_path):
    _, out = reference
    good = (out / "checkpoint.pt").read_bytes()
    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"checkpoint .*truncated\.pt is truncated or corrupt"):
        load_checkpoint(trunc)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"junk\.pt is truncated or corrupt"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.pt is not a qat_plugins training checkpoint"):
        load_checkpoint(foreign)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(good[:1000])
    with pytest.raises(ValueError, match=r"run/checkpoint\.pt is truncated or corrupt"):
        run(TINY, output_dir=run_dir, resume=True)


# --- non-finite losses --------------------------------------------------------------------------
class NaNRegularizer(Regularizer):
    """Test regularizer: NaN on every ``every``-th call, zero otherwise."""

    name = "nan_test"

    def __init__(self, weight: float = 1.0, every: int = 1) -> None:
        super().__init__(weight)
        self.every, self.calls = every, 0

    def _attach(self) -> None:
        pass

    def _loss(self, inputs, targets, outputs, ctx):
        self.calls += 1
        bad = self.calls % self.every == 0
        return outputs.sum() * (float("nan") if bad else 0.0)


@pytest.fixture()
def nan_registered():
    register("nan_test", NaNRegularizer)
    yield
    REGISTRY.pop("nan_test", None)


def test_nan_regularizer_raises_naming_it(nan_registered):
    cfg = update_config(TINY, {"regularizers": [{"name": "nan_test"}]})
    with pytest.raises(NonFiniteLossError, match=r"regularizer 'nan_test'.*nan_policy=raise"):
        run(cfg)


def test_nonfinite_loss_stops_before_the_optimizer_step(tiny_data, fp_cnn):
    cfg = load_config({"model": {"name": "cnn", "width": 8}, "qat": {"epochs": 1}, "output_dir": None})
    student = prepare_student(fp_cnn, tiny_data, cfg)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in student.state_dict().items() if "bn" not in k}
    x, y = tiny_data.train.tensors[0][:32], tiny_data.train.tensors[1][:32]
    with qp.attach(student, [NaNRegularizer()], fp_model=fp_cnn) as regs:
        with pytest.raises(NonFiniteLossError, match="nan_test"):
            train_step(student, regs, (x, y), opt)
    bad_x = x.clone()
    bad_x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"task loss \(cross-entropy\)"):
        train_step(student, None, (bad_x, y), opt)
    after = student.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # weights and scales untouched
    assert not opt.state  # the optimizer never stepped


def test_skip_policy_counts_and_gives_up(nan_registered):
    cfg = update_config(TINY, {"regularizers": [{"name": "nan_test", "every": 2}], "nan_policy": "skip"})
    res = run(cfg)
    assert res.skipped_batches == 3 and sum(h["skipped_batches"] for h in res.history) == 3
    assert res.steps == 6 and all(torch.isfinite(p).all() for p in res.model.parameters())
    strict = update_config(cfg, {"regularizers": [{"name": "nan_test"}], "max_skipped": 2})
    with pytest.raises(NonFiniteLossError, match=r"3 batches skipped .* max_skipped=2"):
        run(strict)


@pytest.mark.parametrize("mode", ["eager", "fx", "pt2e"])
def test_a_training_step_reads_the_device_once(fp_resnet, batch, mode):
    """Issue 11, item 5: one host sync per step (the finite check and the logged values together);
    the quantizers' flags and the regularizers read nothing else from the device. The FPQ coins and
    BR's block choice are host RNG draws (CPU generator), counted apart."""
    if mode == "pt2e":
        pytest.importorskip("torchao")
    x, y = batch
    torch.manual_seed(0)
    q = qp.prepare_qat(fp_resnet, weight_bits=4, act_bits=4, mode=mode, example_inputs=(x,))
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    train_step(q, None, (x, y), opt)  # quantizers initialise
    train_step(q, None, (x, y), opt)
    with HostReads() as reads:
        info = train_step(q, None, (x, y), opt)
    assert reads.syncs == 1 and reads.draws == 0, reads.where
    assert info["reg_losses"] == {} and 0 <= info["correct"] <= info["n"] == len(y)

    regs = [qp.ConsistencyRegularizer(), qp.FeaturePerturbationRegularizer(),
            qp.BlockReplacementRegularizer(["layer1", "layer2", "layer3"]), qp.KnowledgeDistillationRegularizer()]
    with qp.attach(q, regs, fp_model=copy.deepcopy(fp_resnet)) as rs:
        train_step(q, rs, (x, y), opt)  # CSD compiles
        for _ in range(2):
            with HostReads() as reads:
                info = train_step(q, rs, (x, y), opt)
            assert reads.syncs == 1, reads.where
            assert 1 <= reads.draws <= 1 + 9  # BR's block, FPQ's coin per conv
            assert info["reg_losses"] == rs.last_losses and list(info["reg_losses"]) == ["cr", "fpq", "br", "kd"]
            assert info["loss"] == pytest.approx(info["task_loss"] + sum(info["reg_losses"].values()), rel=1e-5)


# --- CR's ramp-up inside training ---------------------------------------------------------------
class _RecordingCR(qp.ConsistencyRegularizer):
    """CR that records the ramp-up factor each training step uses."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.factors: list[float] = []

    def rampup(self) -> float:
        f = super().rampup()
        self.factors.append(f)
        return f


def test_cr_rampup_follows_the_training_steps_and_survives_resume(tmp_path, fp_cnn, tiny_data):
    """The trainer calls CR once per QAT step; the factor at step t is exp(-5 (1 - t/L)^2) (t < L),
    then 1 -- written out by hand here -- and a resumed run continues the schedule where it stopped
    (the step counter is checkpointed), so the resumed factors are the uninterrupted run's tail."""
    import math

    cfg = {**TINY, "regularizers": [], "qat": {"epochs": 2, "augment": False}}  # 3 steps per epoch, 6 in all
    length = 4
    expected = [math.exp(-5 * (1 - t / length) ** 2) for t in range(length)] + [1.0, 1.0]

    whole = _RecordingCR(rampup_steps=length)
    from qat_plugins.training import train_qat

    train_qat(copy.deepcopy(fp_cnn), tiny_data, cfg, regularizers=[whole])
    assert whole.factors == pytest.approx(expected, rel=1e-12, abs=0)  # same formula, float64 both sides

    ckpt = tmp_path / "ckpt.pt"
    first = _RecordingCR(rampup_steps=length)
    train_qat(copy.deepcopy(fp_cnn), tiny_data, cfg, regularizers=[first], checkpoint_path=ckpt, max_steps=2)
    second = _RecordingCR(rampup_steps=length)
    train_qat(copy.deepcopy(fp_cnn), tiny_data, cfg, regularizers=[second], checkpoint_path=ckpt, resume=True)
    assert first.factors == pytest.approx(expected[:2], rel=1e-12, abs=0)
    assert second.factors == pytest.approx(expected[2:], rel=1e-12, abs=0)


def test_trainer_snaps_biases_unless_told_not_to(reference):
    """The evaluated (and exported) model has its biases on ORT's int32 grid; ``qat.snap_biases: false`` keeps
    the float biases."""
    ref, _ = reference
    x = load_data(load_config(TINY)).test.tensors[0][:2]
    assert all(s.max_shift_steps < 2e-3 for s in qp.snap_biases(copy.deepcopy(ref.model), x))
    off = run(update_config(TINY, {"qat.snap_biases": False}))
    snaps = qp.snap_biases(copy.deepcopy(off.model), x)
    assert snaps and max(s.max_shift_steps for s in snaps) > 0.05
