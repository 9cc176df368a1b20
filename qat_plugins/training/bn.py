"""BatchNorm statistics in low-bit QAT: freeze them on a schedule, re-estimate them on clean data.

Works on eager / FX models (torch.ao fused ``ConvBn*`` modules and plain BatchNorm), torchao PT2E
graphs (``aten.batch_norm`` nodes) and NNCF models (plain BatchNorm). Why and which default:
``docs/bn.md``.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase

from ..taps import first_tensor, unwrap

__all__ = ["BNSchedule", "freeze_bn_stats", "unfreeze_bn_stats", "bn_stats_frozen", "reestimate_bn_stats",
           "count_bn_layers"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _bn_targets() -> tuple[Any, ...]:
    aten = torch.ops.aten
    return (aten.batch_norm.default, aten._native_batch_norm_legit.default,
            aten._native_batch_norm_legit_no_training.default)


# --- one handle per BatchNorm, whatever the flow -------------------------------------------------
class _ModuleBN:
    """A BatchNorm module; ``fused`` is its torch.ao ``ConvBn*`` parent (weights folded with running std)."""

    def __init__(self, bn: nn.Module, fused: nn.Module | None) -> None:
        self.bn, self.fused, self.eps = bn, fused, float(bn.eps)  # type: ignore[arg-type]

    @property
    def weight_quantizer(self) -> nn.Module | None:
        return getattr(self.fused, "weight_fake_quant", None) if self.fused is not None else None

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bn.running_mean, self.bn.running_var  # type: ignore[return-value]

    def frozen(self) -> bool:
        return not self.bn.training

    def set_frozen(self, frozen: bool, model_training: bool) -> None:
        if self.fused is not None:  # torch.ao's own flag: ConvBn.train() keeps a frozen BN in eval
            (self.fused.freeze_bn_stats if frozen else self.fused.update_bn_stats)()
            if not frozen:
                self.bn.train(model_training)
        else:
            self.bn.train(not frozen and model_training)

    def begin_estimate(self) -> Any:
        saved = (self.bn.training, self.bn.momentum)
        self.bn.training, self.bn.momentum = True, 1.0  # running stats := this batch's statistics
        return saved

    def end_estimate(self, saved: Any) -> None:
        self.bn.training, self.bn.momentum = saved


class _GraphBN:
    """An ``aten.batch_norm`` node of a PT2E graph (torchao folds the conv weight with its running std)."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
        self.gm, self.node = gm, node
        if node.target is not torch.ops.aten.batch_norm.default:
            raise ValueError(f"BatchNorm node {node.name} is {node.target}; only aten.batch_norm.default graphs "
                             "(torchao 0.18 prepare_qat_pt2e) are supported")
        self.eps = float(node.args[7])
        self.mean_attr, self.var_attr = node.args[3].target, node.args[4].target  # type: ignore[union-attr]

    @property
    def weight_quantizer(self) -> nn.Module | None:
        # bn(div(conv(x, fq(w * gamma / running_std)), scale_factor)): the conv's weight quantizer
        cur = self.node.args[0]
        for _ in range(4):
            if not isinstance(cur, torch.fx.Node):
                return None
            if cur.op == "call_function" and "conv" in str(cur.target):
                w = cur.args[1]
                if isinstance(w, torch.fx.Node) and w.op == "call_module":
                    return self.gm.get_submodule(str(w.target))
                return None
            cur = cur.args[0] if cur.args else None
        return None

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gm.get_buffer(str(self.mean_attr)), self.gm.get_buffer(str(self.var_attr))

    def frozen(self) -> bool:
        return not self.node.args[5]

    def _set_args(self, training: bool, momentum: float) -> bool:
        args = list(self.node.args)
        if args[5] == training and args[6] == momentum:
            return False
        args[5], args[6] = training, momentum
        self.node.args = tuple(args)
        return True

    def set_frozen(self, frozen: bool, model_training: bool) -> bool:
        return self._set_args(not frozen and model_training, self.node.args[6])

    def begin_estimate(self) -> Any:
        saved = (self.node.args[5], self.node.args[6])
        self._set_args(True, 1.0)
        return saved

    def end_estimate(self, saved: Any) -> None:
        self._set_args(*saved)


def _is_pt2e_graph(m: nn.Module) -> bool:
    return isinstance(m, torch.fx.GraphModule) and any(
        n.op == "call_function" and n.target in _bn_targets() for n in m.graph.nodes)


def _handles(model: nn.Module) -> list[_ModuleBN | _GraphBN]:
    m = unwrap(model)
    if _is_pt2e_graph(m):
        assert isinstance(m, torch.fx.GraphModule)
        return [_GraphBN(m, n) for n in m.graph.nodes if n.op == "call_function" and n.target in _bn_targets()]
    fused_of: dict[int, nn.Module] = {}
    for mod in m.modules():
        child = getattr(mod, "bn", None)
        if isinstance(child, _BN_TYPES) and hasattr(mod, "freeze_bn_stats") and hasattr(mod, "weight_fake_quant"):
            fused_of[id(child)] = mod
    return [_ModuleBN(mod, fused_of.get(id(mod))) for mod in m.modules() if isinstance(mod, _BN_TYPES)
            and mod.track_running_stats]


def _recompile(model: nn.Module, changed: bool) -> None:
    m = unwrap(model)
    if changed and isinstance(m, torch.fx.GraphModule):
        m.recompile()


def count_bn_layers(model: nn.Module) -> int:
    """Number of BatchNorm layers (with running statistics) that the functions here handle."""
    return len(_handles(model))


def _set_all_frozen(model: nn.Module, frozen: bool) -> int:
    hs = _handles(model)
    changed = False
    for h in hs:
        changed |= bool(h.set_frozen(frozen, unwrap(model).training))
    _recompile(model, changed)
    return len(hs)


# --- freeze -------------------------------------------------------------------------------------
def freeze_bn_stats(model: nn.Module) -> int:
    """Normalize with the running statistics and stop updating them, in every BatchNorm of ``model``.

    torch.ao fused ``ConvBn*`` modules use torch.ao's own ``freeze_bn_stats`` (it survives
    ``model.train()``); plain BatchNorm (NNCF, unfused eager) is put in eval mode and PT2E graphs get
    ``training=False`` in their ``aten.batch_norm`` nodes: both are undone by the next
    ``model.train()`` (:class:`BNSchedule` re-applies it every step). Returns the number of layers.
    """
    return _set_all_frozen(model, True)


def unfreeze_bn_stats(model: nn.Module) -> int:
    """Undo :func:`freeze_bn_stats`: BatchNorm follows the model's train / eval mode again."""
    return _set_all_frozen(model, False)


def bn_stats_frozen(model: nn.Module) -> bool:
    """True when every BatchNorm of a model in train mode uses (and keeps) its running statistics."""
    hs = _handles(model)
    return bool(hs) and all(h.frozen() for h in hs)


class BNSchedule:
    """Freeze BatchNorm statistics after a number of QAT steps; call it once per step.

    ``freeze_after_steps=None`` (*project choice*, docs/bn.md) never freezes. Each call sets the state the step needs (idempotent,
    cheap), so it also re-applies a freeze that a ``model.train()`` (plain BN, PT2E) undid::

        sched = BNSchedule(freeze_after_steps=len(loader))   # project choice: after QAT epoch 1
        for step, (x, y) in enumerate(batches):
            sched(qat_model, step)
            ...

    Freezing from step 0 is harmful (docs/bn.md): the running statistics of the FP model do not fit
    the quantized weights.
    """

    def __init__(self, freeze_after_steps: int | None = None) -> None:
        if freeze_after_steps is not None and (isinstance(freeze_after_steps, bool)
                                               or not isinstance(freeze_after_steps, int) or freeze_after_steps < 0):
            raise ValueError(f"freeze_after_steps must be an int >= 0 or None, got {freeze_after_steps!r}")
        self.freeze_after_steps = freeze_after_steps

    @classmethod
    def from_epochs(cls, freeze_after_epochs: int | None, steps_per_epoch: int) -> "BNSchedule":
        """``freeze_after_epochs`` whole epochs of ``steps_per_epoch`` steps (None: never)."""
        if freeze_after_epochs is None:
            return cls(None)
        return cls(int(freeze_after_epochs) * int(steps_per_epoch))

    def frozen_at(self, step: int) -> bool:
        """Whether BN statistics are frozen during step ``step`` (0-based)."""
        return self.freeze_after_steps is not None and step >= self.freeze_after_steps

    def __call__(self, model: nn.Module, step: int) -> bool:
        """Put ``model``'s BatchNorm layers in the state of step ``step``; returns whether frozen."""
        frozen = self.frozen_at(step)
        if frozen:
            freeze_bn_stats(model)
        elif step == 0:
            unfreeze_bn_stats(model)
        return frozen

    def __repr__(self) -> str:
        return f"BNSchedule(freeze_after_steps={self.freeze_after_steps})"


# --- re-estimation ------------------------------------------------------------------------------
def _inputs(batches: Iterable[Any], num_batches: int | None) -> Iterator[Any]:
    for i, b in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            return
        yield b[0] if isinstance(b, (tuple, list)) else b


def _set_mode(model: nn.Module, training: bool) -> None:
    m = unwrap(model)
    if m.training != training:
        m.train(training)


@torch.no_grad()
def _estimate(m: nn.Module, batches: Iterable[Any], num_batches: int | None, keep_weight_grid: bool) -> None:
    """The body of :func:`reestimate_bn_stats` on a model in eval mode."""
    hs = _handles(m)
    fqs = [q for q in m.modules() if isinstance(q, FakeQuantizeBase)]
    fq_state = [(q.observer_enabled.clone(), {k: v.clone() for k, v in q.state_dict().items()}) for q in fqs]
    for q in fqs:
        q.disable_observer()
    old = [tuple(t.clone() for t in h.stats()) for h in hs]
    counters = [(b, b.clone()) for name, b in m.named_buffers() if name.endswith("num_batches_tracked")]
    sums = [[torch.zeros_like(o[0]), torch.zeros_like(o[1])] for o in old]
    saved = [h.begin_estimate() for h in hs]
    _recompile(m, True)
    n = 0
    try:
        for x in _inputs(batches, num_batches):
            first_tensor(m(x))
            for h, o, acc in zip(hs, old, sums):
                mean, var = h.stats()
                acc[0] += mean
                acc[1] += var
                mean.copy_(o[0])  # the next batch folds the same running std as the first
                var.copy_(o[1])
            n += 1
    finally:
        for h, sv in zip(hs, saved):
            h.end_estimate(sv)
        _recompile(m, True)
        for q, (obs, state) in zip(fqs, fq_state):
            q.load_state_dict(state)
            q.observer_enabled.copy_(obs)
        for b, v in counters:  # re-estimation is not training: batch counters stay
            b.copy_(v)
    if n == 0:
        raise ValueError("reestimate_bn_stats: no batches")
    if not all(bool(torch.isfinite(a[0]).all() and torch.isfinite(a[1]).all()) for a in sums):
        raise ValueError("reestimate_bn_stats: non-finite BatchNorm statistics (the running statistics were left "
                         "as they were); check the batches for NaN/inf")
    for h, o, acc in zip(hs, old, sums):
        mean, var = h.stats()
        new_mean, new_var = acc[0] / n, acc[1] / n
        q = h.weight_quantizer if keep_weight_grid else None
        scale = getattr(q, "scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() == new_var.numel() > 1:
            ratio = torch.sqrt(o[1] + h.eps) / torch.sqrt(new_var + h.eps)
            scale.mul_(ratio.to(scale.dtype))
        mean.copy_(new_mean)
        var.copy_(new_var)


@torch.no_grad()
def reestimate_bn_stats(model: nn.Module, batches: Iterable[Any], num_batches: int | None = 10, *,
                        keep_weight_grid: bool = True) -> int:
    """Replace every BatchNorm's running statistics by their average over clean batches.

    Each batch is run through ``model`` under ``no_grad`` with BatchNorm in training mode and
    everything else in eval mode (fake quantizers' observers disabled, their state restored
    afterwards): the running mean / variance become the plain average of the per-batch statistics
    (PyTorch's cumulative average, ``momentum=None``). The model's train / eval mode and any BN freeze
    are restored. ``batches``: an iterable of tensors or ``(inputs, targets)`` pairs, no augmentation
    (*project choice*: clean data); ``num_batches``: how many to use (*project choice*: 10; None: all).

    ``keep_weight_grid`` (*project choice*: True): torch.ao ``ConvBn*`` modules and torchao PT2E graphs quantize
    ``w * gamma / running_std``; changing the running std would move every weight on its grid. The
    per-channel weight step sizes are rescaled by ``old_std / new_std`` so the quantized weights keep
    exactly their values (per-tensor weight scales cannot be; they are left as they are).
    Returns the number of BatchNorm layers updated.
    """
    m = unwrap(model)
    hs = _handles(m)
    if not hs:
        return 0
    was_training = m.training
    frozen = [h.frozen() for h in hs]
    try:
        _set_mode(m, False)
        _estimate(m, batches, num_batches, keep_weight_grid)
    finally:
        _set_mode(m, was_training)
        hs = _handles(m)  # PT2E: train() rewrote the batch-norm nodes
        changed = False
        for h, f in zip(hs, frozen):
            if f and was_training:
                changed |= bool(h.set_frozen(True, True))
        _recompile(m, changed)
    return len(hs)
