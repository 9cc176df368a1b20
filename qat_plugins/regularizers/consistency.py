"""CR: consistency regularization (Zhang, Wu, Pang, Cai, Tao; arXiv 2402.13497)."""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..data import default_augment
from ..taps import FeatureTap, default_feature_layers, exclusive, first_tensor, strip_hooks, unwrap
from ._losses import feature_mse, kd_kl, sigmoid_rampup
from .base import Regularizer, StepContext
from .options import OptionError, check_choice, check_int, check_names, check_number

__all__ = ["ConsistencyRegularizer"]

_TEACHERS = ("ema", "none")


class ConsistencyRegularizer(Regularizer):
    """Two views of a sample must agree in the quantized model's outputs and latent features.

    Loss, with ``v1`` the inputs of the training forward (the user's batch, the weak view) and
    ``v2 = augment(v1)`` (the strong view)::

        w(t) * [ T^2 KL(softmax(z_T(v1)/T) || softmax(z_S(v2)/T)) + feature_weight * sum_l MSE(f_S^l(v2), f_T^l(v1)) ]

    ``S`` is the quantized student (gradient flows through its ``v2`` forward). The target side ``T``
    carries no gradient: with ``teacher="none"`` (default; the paper's version 1, "augmented samples
    should be consistent in the latent feature space") it is the student's own training forward on
    ``v1``, so CR costs one extra forward and backward; with ``teacher="ema"`` (version 2) it is an
    exponential moving average of the student run on ``v1`` (one more no-grad forward).

    The weight ramps up as ``w(t) = weight * exp(-5 (1 - t/L)^2)`` for ``t < L = rampup_steps``
    (``t`` counts ``loss()`` calls; 1 afterwards): the sigmoid ramp-up of mean-teacher consistency
    training; 0 disables it. The strong-view forward records only CR's own features and is not
    perturbed by other regularizers (e.g. FPQ's SFP), so CR's term is the same alone and combined.

    Defaults: layers=None: the logits (``"output"``, KL) and the input of the last linear layer
    (MSE) (project choice; version 1 names latent features); weight=1.0 (project choice);
    augment: :func:`qat_plugins.data.default_augment` (1-pixel shift + N(0, 0.1^2) noise; project
    choice); teacher="none" (version 1; ``"ema"`` is version 2); ema_decay=0.99 (project choice in
    the usual 0.99-0.999; updated from the student at the start of each step, the EMA normalising
    with batch statistics like the training student); temperature=1.0 (project choice);
    rampup_steps=200 (schedule: paper; its length: project choice); feature_weight=1.0 (project
    choice). Weak view as target and strong view as learner follows the usual consistency recipe
    (project choice).
    """

    name = "cr"
    extra_student_forward = True

    def __init__(self, layers: Sequence[str] | None = None, weight: float = 1.0,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None, *, teacher: str = "none",
                 ema_decay: float = 0.99, temperature: float = 1.0, rampup_steps: int = 200,
                 feature_weight: float = 1.0) -> None:
        super().__init__(weight)
        self.teacher = check_choice("teacher", teacher, _TEACHERS)
        self.ema_decay = check_number("ema_decay", ema_decay, low=0.0, high=1.0, high_open=True)
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True)
        self.rampup_steps = check_int("rampup_steps", rampup_steps, low=0)
        self.feature_weight = check_number("feature_weight", feature_weight, low=0.0)
        if augment is not None and not callable(augment):
            raise OptionError("augment", "must be a callable on batched tensors")
        self.layers = check_names("layers", layers)
        self.augment = augment if augment is not None else default_augment()
        self.ema: nn.Module | None = None
        self._student_tap: FeatureTap | None = None
        self._teacher_tap: FeatureTap | None = None
        self._features: list[str] = []

    def _attach(self) -> None:
        assert self.model is not None
        student = unwrap(self.model)
        layers = self.layers if self.layers is not None else default_feature_layers(student)
        self._features = [n for n in layers if n != "output"]
        self._student_tap = self.tap(student, self._features)
        if self.teacher == "ema":
            self.ema = strip_hooks(copy.deepcopy(student))
            self.ema.requires_grad_(False)
            # The teacher normalises with batch statistics like the training student: the running
            # statistics inherited from the FP model do not fit a freshly quantized network, and an
            # eval-mode teacher gives poor targets early in QAT. Its buffers are copied from the
            # student at every update, so nothing it computes in train mode persists.
            self.ema.train()
            self._teacher_tap = FeatureTap(self.ema, self._features, always=True)
            self._taps.append(self._teacher_tap)

    def _detach(self) -> None:
        self.ema = None
        self._student_tap = self._teacher_tap = None

    @torch.no_grad()
    def _update_ema(self) -> None:
        assert self.ema is not None and self.model is not None
        student = unwrap(self.model)
        d = self.ema_decay if self.steps > 0 else 0.0
        for pt, ps in zip(self.ema.parameters(), student.parameters()):
            if pt.shape != ps.shape:  # lazily sized quantizer parameters
                pt.data = ps.detach().clone()
            elif not pt.is_floating_point():  # e.g. NNCF's integer bookkeeping parameters
                pt.copy_(ps)
            else:
                pt.mul_(d).add_(ps.detach(), alpha=1.0 - d)
        for bt, bs in zip(self.ema.buffers(), student.buffers()):
            if bt.shape != bs.shape:
                bt.data = bs.detach().clone()
            else:
                bt.copy_(bs)

    def _loss(self, inputs: Any, targets: torch.Tensor | None, outputs: torch.Tensor,
              ctx: StepContext) -> torch.Tensor:
        assert self._student_tap is not None and self.model is not None
        weak_feats = dict(self._student_tap.features)
        missing = [n for n in self._features if n not in weak_feats]
        if missing:
            raise RuntimeError(f"no features recorded for {missing}: call loss() right after the model's "
                               "training forward on the same inputs")
        if self.teacher == "ema":
            self._update_ema()
            assert self.ema is not None and self._teacher_tap is not None
            with torch.no_grad():
                target_out = first_tensor(self.ema(inputs))
            weak_feats = dict(self._teacher_tap.features)
            self._teacher_tap.clear()
        else:
            target_out = outputs
        self._student_tap.clear()
        with exclusive(self.model, [self._student_tap]):  # only CR's own tap sees the strong view
            strong_out = first_tensor(unwrap(self.model)(self.augment(inputs)))
        strong_feats = dict(self._student_tap.features)
        loss = kd_kl(strong_out, target_out, self.temperature)
        for name in self._features:
            loss = loss + self.feature_weight * feature_mse(strong_feats[name].flatten(1), weak_feats[name].flatten(1))
        return self.rampup() * loss

    def rampup(self) -> float:
        """The current ramp-up factor ``exp(-5 (1 - t/L)^2)`` (1 after ``rampup_steps`` steps)."""
        return sigmoid_rampup(self.steps, self.rampup_steps)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.ema is not None:
            state["ema"] = {k: v.clone() for k, v in self.ema.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])

    def config(self) -> dict[str, Any]:
        return {**super().config(), "layers": self.layers, "teacher": self.teacher, "ema_decay": self.ema_decay,
                "temperature": self.temperature, "rampup_steps": self.rampup_steps,
                "feature_weight": self.feature_weight}

