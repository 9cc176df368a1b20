"""The full-precision model while regularizers are attached: frozen, in channels_last, BatchNorm folded.

Shared by every regularizer attached to the same FP model (reference counted): the first attach
freezes it, the last detach restores it exactly. Design notes: docs/regularizers.md, "Cost floors".
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.prepare import fusion_groups

__all__ = ["FrozenFP"]


class FrozenFP:
    """One FP model frozen for as long as any regularizer is attached to it.

    While frozen (project choices, measured in BENCHMARKS.md "Cost"): eval mode, no parameter
    requires grad; on CPU its 4-d weights are in ``channels_last`` (oneDNN's faster layout); and each
    conv followed by an eval-mode BatchNorm (found from the traced graph; untraceable models are not
    folded) computes ``a * conv(x) + b`` with the BN folded into its weights while the BN returns its
    input: one pass fewer per conv in every FP forward and backward, the same outputs within float
    rounding. A folded conv's output is therefore the *post*-BN feature; :meth:`pre_bn_scale` gives
    ``1 / a`` per channel, which maps it back to the pre-BN feature up to a per-channel offset. With
    ``channels_last`` weights, an ``AdaptiveAvgPool2d`` to 1x1 averages with ``avg_pool2d`` (same
    values within float rounding), whose backward keeps the layout, and :meth:`feature_for` brings a
    QAT feature into the layout with its gradient returned in the feature's own: no op of a backward
    through the FP model mixes layouts.

    Parameters, buffers and the state_dict are never changed in value; the folded weights are held
    here and the modules get instance ``forward`` functions, removed on restore. The FP model must
    not be changed while attached (its folded weights are computed once).
    """

    _frozen: "weakref.WeakKeyDictionary[nn.Module, FrozenFP]" = weakref.WeakKeyDictionary()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.users = 0
        self._was_training = model.training
        self._grad_flags = [(p, p.requires_grad) for p in model.parameters()]
        self._restrided: list[torch.Tensor] = []
        self._patched: list[nn.Module] = []
        self._scales: dict[str, torch.Tensor] = {}

    @classmethod
    def acquire(cls, model: nn.Module) -> "FrozenFP":
        """Freeze ``model`` (first user) or join its freeze; pair every call with :meth:`release`."""
        frozen = cls._frozen.get(model)
        if frozen is None:
            frozen = cls(model)
            try:
                frozen._freeze()
            except BaseException:
                frozen._restore()  # a partial freeze leaves nothing behind
                raise
            cls._frozen[model] = frozen
        frozen.users += 1
        return frozen

    def release(self) -> None:
        """Leave the freeze; the last user restores the model as it was before the first acquire."""
        self.users -= 1
        if self.users <= 0 and self._frozen.get(self.model) is self:
            del self._frozen[self.model]
            self._restore()

    @classmethod
    def lookup(cls, model: nn.Module) -> "FrozenFP | None":
        """The active freeze of ``model``, if any regularizer holds one."""
        return cls._frozen.get(model)

    def inputs_for(self, inputs: Any) -> Any:
        """``inputs`` in the memory layout the frozen model computes in (see :meth:`feature_for`;
        else an input conversion inside every conv); anything but a tensor passes as it is."""
        return self.feature_for(inputs) if isinstance(inputs, torch.Tensor) else inputs

    def feature_for(self, feature: torch.Tensor) -> torch.Tensor:
        """``feature`` (the clean input, or a QAT block output fed into the FP model) in the layout
        the frozen model computes in: a 4-d CPU tensor goes ``channels_last`` when its weights were
        restrided. A gradient goes back in ``feature``'s own layout, so the QAT model's backward does
        not mix layouts (a slow elementwise path) after the FP suffix's."""
        if (self._restrided and feature.dim() == 4 and feature.device.type == "cpu"
                and not feature.is_contiguous(memory_format=torch.channels_last)):
            return _ChannelsLast.apply(feature)
        return feature

    def pre_bn_scale(self, conv: str) -> torch.Tensor | None:
        """``1 / a`` per output channel of a folded conv (its output times this is the pre-BN feature
        plus a per-channel constant); ``None`` when ``conv`` is not folded."""
        return self._scales.get(conv)

    # -- internals -----------------------------------------------------------------------------
    def _freeze(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)
        # ``to`` restrides explicitly: ``contiguous(memory_format=...)`` keeps the NCHW strides of a
        # 1-input-channel stem weight, whose conv then ran in NCHW and made the next conv convert its input
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if t.dim() == 4 and t.device.type == "cpu" and t.is_contiguous():
                t.data = t.data.to(memory_format=torch.channels_last)
                self._restrided.append(t)
        modules = dict(self.model.named_modules())
        for group in fusion_groups(self.model, traced_only=True):
            conv, bn = modules[group[0]], modules[group[1]]
            folded = _fold(conv, bn)
            if folded is None:
                continue
            weight, bias, scale = folded
            if any(conv.weight is t for t in self._restrided):
                weight = weight.to(memory_format=torch.channels_last)
            conv.forward = _folded_conv(conv, weight, bias)  # instance attribute: shadows Conv2d.forward
            bn.forward = _identity
            self._patched += [conv, bn]
            self._scales[group[0]] = scale
        if self._restrided:
            for mod in modules.values():
                if _global_average(mod):
                    mod.forward = _average_pool_all  # instance attribute: shadows AdaptiveAvgPool2d.forward
                    self._patched.append(mod)

    def _restore(self) -> None:
        for mod in self._patched:
            mod.__dict__.pop("forward", None)
        self._patched, self._scales = [], {}
        for t in self._restrided:
            t.data = t.data.clone(memory_format=torch.contiguous_format)
        self._restrided = []
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)
        if self._was_training:
            self.model.train()


def _fold(conv: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Folded weight and bias of ``bn(conv(x))`` and ``1 / a``; ``None`` where folding does not apply
    (not a plain 2-d conv with zero padding, no running statistics, hooks on either module, or a
    channel whose BN scale ``a`` is zero, where the pre-BN feature could not be recovered)."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or not isinstance(bn, nn.BatchNorm2d):
        return None
    if bn.running_mean is None or bn.running_var is None:
        return None
    if any("forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks for m in (conv, bn)):
        return None  # someone watches or replaces these modules: keep what they see
    with torch.no_grad():
        a = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            a = a * bn.weight
        if not bool(torch.isfinite(a).all()) or bool((a == 0).any()):
            return None
        b = -bn.running_mean * a + (bn.bias if bn.bias is not None else 0.0)
        if conv.bias is not None:
            b = b + conv.bias * a
        weight = conv.weight * a.reshape(-1, 1, 1, 1)
        return weight, b.to(conv.weight.dtype), (1.0 / a).to(conv.weight.dtype)


def _folded_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    stride, padding, dilation, groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return forward


def _global_average(mod: nn.Module) -> bool:
    """An ``AdaptiveAvgPool2d`` to 1x1 nobody watches or replaced."""
    size = getattr(mod, "output_size", None)
    return (type(mod) is nn.AdaptiveAvgPool2d and size in (1, (1, 1), [1, 1])
            and not ("forward" in mod.__dict__ or mod._forward_hooks or mod._forward_pre_hooks))


def _average_pool_all(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling whose backward keeps a ``channels_last`` input's layout (the mean's
    backward returns a contiguous gradient, and the ReLU backward before it then mixes layouts)."""
    if x.dim() == 4:
        return F.avg_pool2d(x, tuple(x.shape[-2:]))
    return F.adaptive_avg_pool2d(x, 1)


class _ChannelsLast(torch.autograd.Function):
    """``x`` in ``channels_last``; the gradient back in contiguous layout."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _identity(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x
