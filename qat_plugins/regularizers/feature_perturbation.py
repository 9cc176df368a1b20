"""FPQ: feature-perturbed quantization (Pang & Cai, arXiv 2503.11159) = SFP + CSD."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import nn

from ..quant.step_size import input_quantizer, step_size
from ..taps import FeatureTap, GraphSplice, TapSite, conv_layers, find_site, graph_convs, preact_site, unwrap
from ._losses import csd_distance
from .base import Regularizer, StepContext
from .options import check_bool, check_choice, check_names, check_number

__all__ = ["FeaturePerturbationRegularizer"]


class FeaturePerturbationRegularizer(Regularizer):
    """Stochastic feature perturbation (SFP) plus channel-wise standardization distillation (CSD).

    SFP: in the training forward, each listed conv layer's *input* gets, with probability ``p`` (an
    independent coin per layer per forward), element-wise noise ``delta ~ U[-s/2, s/2]``, where ``s`` is
    the step size of the activation fake quantizer that produced that input, found from the model's
    structure (:func:`qat_plugins.quant.step_size.input_quantizer`). Only where no quantizer produces
    the input (a warning names those convs at attach) ``s = fallback_ratio * std(input)``. Extra
    forwards of other regularizers (CR's strong view, ...) are not perturbed.

    CSD (when ``fp_model`` is given and ``distill=True``)::

        L_CSD = mean_l mean_{c,n,h,w} (std_c(z_Q^l) - std_c(z_FP^l))^2,  std_c(z) = (z - mu_c) / sqrt(var_c + eps)

    with ``z^l`` the conv output *before* BatchNorm in the quantized student (perturbed training
    forward) and the frozen FP model (clean input; where its BatchNorm is folded while attached, the
    folded conv's output mapped back per channel, see
    :class:`~qat_plugins.regularizers.frozen_fp.FrozenFP`); mean/variance per channel over batch and
    spatial axes. ``reduction="sum"`` is the paper's sum over layers and channels (of the per-channel mean
    over batch and positions). The paper adds ``L_CSD`` to the task loss with weight 1. Each layer's
    term is computed in the step's shared clean FP forward, as the FP model produces the teacher
    feature (whichever regularizer runs that forward), so the FP feature is read before anything
    after the conv (an in-place ReLU) can change it and is not kept.

    Defaults: layers=None (every conv layer; paper), weight=1.0 (paper), p=0.1 (paper's best),
    distill=True (paper), reduction="mean" (project choice, measured: the paper's sum is ~C*L times
    larger and at weight 1 wrecked 20-step W4A4 runs on digits, 0.15-0.33 vs 0.98 test accuracy; see
    BENCHMARKS.md "CSD reduction"), eps=1e-5 (project choice),
    fallback_ratio=0.1 (project choice, used only without a quantizer), compiled=True (project choice:
    CSD from per-channel moments through ``torch.compile``, one pass over the features per direction,
    3-4x faster than ATen's batch-norm kernels on CPU, same value within float rounding; the first
    training step compiles for some seconds, and a failure to compile warns once and runs the same
    formula uncompiled; ``False`` keeps the batch-norm kernels). Open choices made here
    (project choice): noise after the activation quantizer, a coin per layer per forward.

    On PT2E graphs (convs are aten ops) an identity module is spliced into the graph edge into each
    conv (SFP) and into its batch norm (CSD's pre-BN feature) while attached; detach restores the graph.
    """

    name = "fpq"

    def __init__(self, layers: Sequence[str] | None = None, weight: float = 1.0, *, p: float = 0.1,
                 distill: bool = True, eps: float = 1e-5, reduction: str = "mean",
                 fallback_ratio: float = 0.1, compiled: bool = True) -> None:
        super().__init__(weight)
        self.layers = check_names("layers", layers)
        self.p = check_number("p", p, low=0.0, high=1.0)
        self.distill = check_bool("distill", distill)
        self.eps = check_number("eps", eps, low=0.0, low_open=True)
        self.reduction = check_choice("reduction", reduction, ("mean", "sum"))
        self.fallback_ratio = check_number("fallback_ratio", fallback_ratio, low=0.0)
        self.compiled = check_bool("compiled", compiled)
        self._quantizers: dict[str, nn.Module | None] = {}
        self._student_pre: FeatureTap | None = None
        self._fp_pre: FeatureTap | None = None
        self._names: list[str] = []
        self._splices: list[GraphSplice] = []
        self._teacher_scales: dict[str, torch.Tensor | None] = {}
        self._csd: dict[str, torch.Tensor] = {}  # this step's CSD term per layer, filled in the FP forward
        self.fallback_layers: list[str] = []
        self.perturbed = 0  # layers perturbed since the last loss() (for tests and logs)
        self.last_perturbed = 0  # layers perturbed in the training forward before the latest loss()

    # -- SFP ------------------------------------------------------------------------------
    def _perturb(self, name: str, x: torch.Tensor) -> torch.Tensor:
        # the coin is a host RNG draw (CPU generator): reading it never waits for the device
        if self.p <= 0 or (self.p < 1 and float(torch.rand((), device="cpu")) >= self.p):
            return x
        q = self._quantizers.get(name)
        s = step_size(q) if q is not None else None
        if s is None:
            s = self.fallback_ratio * x.detach().std()
        elif s.numel() > 1:  # a per-channel activation grid
            shape = [1] * x.dim()
            shape[1] = -1
            s = s.reshape(shape)
        else:
            s = s.reshape(())
        self.perturbed += 1
        # x + U[-1/2, 1/2) * s in two passes over x (draw, fused multiply-add)
        return torch.addcmul(x, torch.empty_like(x).uniform_(-0.5, 0.5), s.detach().to(x.dtype))

    def _attach(self) -> None:
        assert self.model is not None
        student = unwrap(self.model)
        convs = graph_convs(student) if isinstance(student, torch.fx.GraphModule) and not conv_layers(student) else {}
        self._names = self.layers if self.layers is not None else (list(convs) or conv_layers(student))
        if not self._names:
            raise ValueError("FeaturePerturbationRegularizer found no conv layers; pass layers=[...]")
        for n in self._names:
            if convs and n not in convs:
                raise ValueError(f"layer {n!r} is not a conv of this graph; convs: {list(convs)}")
            if not convs:
                find_site(student, n)  # validates names (ValueError with close matches)
        self._quantizers = {n: input_quantizer(student, n) for n in self._names}
        self.fallback_layers = [n for n, q in self._quantizers.items() if q is None]
        if self.fallback_layers:
            warnings.warn(f"FPQ: no activation quantizer produces the input of {self.fallback_layers}; SFP noise there "
                          f"is scaled by {self.fallback_ratio} * std(input) instead of the quantization step",
                          stacklevel=4)
        if convs:  # PT2E: splice identities into the graph edges the taps need
            in_sites, pre_sites = [], []
            for n in self._names:
                node = convs[n]
                self._splices.append(GraphSplice(student, node.args[0], node))
                in_sites.append(TapSite(n, self._splices[-1].module, 0, "output"))
                src, dst = _pre_bn_edge(node)
                self._splices.append(GraphSplice(student, src, dst))
                pre_sites.append(TapSite(n, self._splices[-1].module, 0, "output"))
        else:
            in_sites = [find_site(student, n, side="input") for n in self._names]
            pre_sites = [preact_site(student, n) for n in self._names]
        # perturb conv inputs (in the training forward only: loss() and extra forwards run exclusive)
        self.tap(student, sites=in_sites, record=False, transform=self._perturb)
        # CSD: pre-BN conv outputs of the student (recorded) and the FP model (distilled as produced)
        if self.distill and self.fp_model is not None:
            self._require_in_fp(self._names, "layer")
            self._student_pre = self.tap(student, sites=pre_sites)
            self._fp_pre = self.fp_tap(sites=[preact_site(self.fp_model, n) for n in self._names], record=False,
                                       transform=self._distill)
            # a folded FP BatchNorm makes the conv output post-BN: CSD maps it back per channel
            self._teacher_scales = {n: self.fp_pre_bn_scale(n) for n in self._names}

    def _distill(self, name: str, teacher: torch.Tensor) -> torch.Tensor:
        """CSD of layer ``name`` as the clean FP forward produces its teacher feature (still in cache,
        and not kept afterwards), against the student feature of the training forward; the FP
        feature passes on unchanged."""
        student = self._student_pre.features.get(name) if self._student_pre is not None else None
        if student is not None:
            with torch.enable_grad():  # the FP forward runs under no_grad; the term's graph is the student's
                self._csd[name] = csd_distance(student, teacher, self.eps, self.reduction, compiled=self.compiled,
                                               teacher_scale=self._teacher_scales.get(name))
        return teacher

    def _detach(self) -> None:
        for splice in reversed(self._splices):
            splice.remove()
        self._splices = []
        self._quantizers = {}
        self._teacher_scales = {}
        self._csd = {}
        self._student_pre = self._fp_pre = None

    def _loss(self, inputs: Any, targets: torch.Tensor | None, outputs: torch.Tensor,
              ctx: StepContext) -> torch.Tensor:
        self.last_perturbed, self.perturbed = self.perturbed, 0
        if self._student_pre is None or self._fp_pre is None:
            return outputs.new_zeros(())
        # Student features are cleared after every step: with all of them present, this step's clean FP
        # forward (run by whichever regularizer needed it first) computed every term from them
        recorded = self._student_pre.features
        ctx.fp_forward()
        terms, self._csd = self._csd, {}
        missing = [n for n in self._names if n not in recorded or n not in terms]
        if missing:
            raise RuntimeError(f"no features recorded for {missing}: call loss() right after the model's "
                               "training forward on the same inputs")
        total = outputs.new_zeros(())
        for n in self._names:
            total = total + terms[n]
        return total / len(self._names) if self.reduction == "mean" else total

    def config(self) -> dict[str, Any]:
        return {**super().config(), "layers": self.layers, "p": self.p, "distill": self.distill, "eps": self.eps,
                "reduction": self.reduction, "fallback_ratio": self.fallback_ratio, "compiled": self.compiled}


_BN_OPS = {torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default,
           torch.ops.aten._native_batch_norm_legit_no_training.default, torch.ops.aten.native_batch_norm.default}
_SCALE_OPS = {torch.ops.aten.div.Tensor, torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor}


def _pre_bn_edge(conv: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node | None]:
    """The graph edge carrying a conv's pre-BN output: into the batch norm after the QAT conv-bn
    rewrite's rescaling (``conv(x, w * k) / k (+ b)``), or the conv output itself without one."""
    cur = conv
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if user.op == "call_function" and user.target in _BN_OPS:
            return cur, user
        if user.op != "call_function" or user.target not in _SCALE_OPS:
            break
        cur = user
    return conv, None
