"""The regularizer protocol, the per-step shared context and ``attach``.

A regularizer attaches to a QAT model (and, when its method needs one, the frozen full-precision
model), adds a loss term each training step, and detaches without a trace::

    reg = FeaturePerturbationRegularizer().attach(qat_model, fp_model=fp_model)
    out = qat_model(x)
    loss = F.cross_entropy(out, y) + reg.loss(x, y, out)
    reg.detach()

or, for several at once with shared work (one clean FP-teacher forward per step)::

    with qat_plugins.attach(qat_model, [cr, fpq, br], fp_model=fp_model) as regs:
        out = qat_model(x)
        loss = F.cross_entropy(out, y) + regs.loss(x, y, out)

Data flows model -> taps (:mod:`qat_plugins.taps`) -> regularizer loss -> trainer.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import nn

from ..taps import FeatureTap, exclusive, find_site, first_tensor, unwrap
from .frozen_fp import FrozenFP
from .options import check_number

__all__ = ["Regularizer", "StepContext", "RegularizerSet", "attach", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the term."""


class StepContext:
    """Work shared by the regularizers of one training step.

    :meth:`fp_forward` runs the frozen FP model once on the clean inputs (no grad), with every
    FP-side recording tap of the participating regularizers enabled, and caches the result.
    """

    def __init__(self, inputs: Any, fp_model: nn.Module | None, fp_taps: Iterable[FeatureTap] = ()) -> None:
        self.inputs = inputs
        self.fp_model = fp_model
        self.fp_taps = list(fp_taps)
        self._fp_out: torch.Tensor | None = None

    def fp_forward(self) -> torch.Tensor:
        """FP logits on the clean inputs; FP taps hold their features afterwards."""
        if self._fp_out is None:
            if self.fp_model is None:
                raise RuntimeError("this regularizer needs fp_model=...; pass it to attach()")
            for t in self.fp_taps:
                t.enabled = True
            frozen = FrozenFP.lookup(self.fp_model)
            inputs = frozen.inputs_for(self.inputs) if frozen is not None else self.inputs
            try:
                with torch.no_grad():
                    self._fp_out = first_tensor(self.fp_model(inputs))
            finally:
                for t in self.fp_taps:
                    t.enabled = False
        return self._fp_out


class Regularizer(ABC):
    """Base class: ``attach`` -> per-step ``loss`` -> ``detach``.

    Subclasses set :attr:`name` (the config/registry key) and :attr:`needs_fp_model`, and implement
    :meth:`_attach`, :meth:`_loss` and optionally :meth:`_detach`, :meth:`state_dict`,
    :meth:`load_state_dict`. ``loss`` returns ``weight * term``, or a zero tensor when the model is
    in eval mode or gradients are disabled.
    """

    name: ClassVar[str] = "base"
    needs_fp_model: ClassVar[bool] = False
    #: its term runs an extra forward of the student whose graph lives until backward (CR's strong
    #: view); :class:`RegularizerSet` computes such terms after the others (see its docstring)
    extra_student_forward: ClassVar[bool] = False

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = check_number("weight", weight, low=0.0)
        self.model: nn.Module | None = None
        self.fp_model: nn.Module | None = None
        self.fp_taps: list[FeatureTap] = []
        self._taps: list[FeatureTap] = []
        self._frozen_fp: FrozenFP | None = None
        self.last_loss: torch.Tensor | None = None
        self.steps = 0

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self.model is not None

    def attach(self, model: nn.Module, *, fp_model: nn.Module | None = None) -> "Regularizer":
        """Register this regularizer's hooks on ``model`` (and ``fp_model``); returns ``self``."""
        if self.attached:
            raise RuntimeError(f"{type(self).__name__} is already attached; call detach() before attaching again")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if self.needs_fp_model and fp_model is None:
            raise ValueError(f"{type(self).__name__} needs the full-precision model: attach(model, fp_model=...)")
        if fp_model is not None and not isinstance(fp_model, nn.Module):
            raise TypeError(f"fp_model must be a torch.nn.Module, got {type(fp_model).__name__}")
        if fp_model is not None and unwrap(fp_model) is unwrap(model):
            raise ValueError("fp_model must be a separate full-precision copy, not the QAT model itself")
        self.model = model
        self.fp_model = unwrap(fp_model) if fp_model is not None else None
        try:
            if self.fp_model is not None:
                self._frozen_fp = FrozenFP.acquire(self.fp_model)
            self._attach()
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook and helper this regularizer added; the models are as before attach."""
        self._detach()
        for tap in self._taps + self.fp_taps:
            tap.remove()
        self._taps, self.fp_taps = [], []
        if self._frozen_fp is not None:
            self._frozen_fp.release()
            self._frozen_fp = None
        self.model = self.fp_model = None
        self.last_loss = None

    def _require_in_fp(self, names: Sequence[str], what: str) -> None:
        """``ValueError`` naming the first of ``names`` the FP model does not have."""
        assert self.fp_model is not None
        for n in names:
            try:
                find_site(self.fp_model, n)
            except ValueError as e:
                raise ValueError(f"{what} {n!r} is not in the FP model: {e}; pass the FP model the QAT model was "
                                 "prepared from (same architecture)") from None

    def tap(self, model: nn.Module, names: Sequence[str] = (), **kw: Any) -> FeatureTap:
        """Create a tap on the QAT model owned (and removed) by this regularizer."""
        t = FeatureTap(model, names, **kw)
        self._taps.append(t)
        return t

    def fp_pre_bn_scale(self, conv: str) -> torch.Tensor | None:
        """Per-channel ``1 / a`` of an FP conv whose BatchNorm is folded while attached (its output is
        then the post-BN feature; times this, the pre-BN one up to a per-channel constant), else ``None``."""
        return self._frozen_fp.pre_bn_scale(conv) if self._frozen_fp is not None else None

    def fp_tap(self, names: Sequence[str] = (), **kw: Any) -> FeatureTap:
        """A recording tap on the FP model, enabled only during the shared clean FP forward."""
        assert self.fp_model is not None
        t = FeatureTap(self.fp_model, names, always=True, **kw)
        t.enabled = False
        self.fp_taps.append(t)
        return t

    # -- per step -------------------------------------------------------------------------
    def active(self) -> bool:
        """Training mode with gradients enabled."""
        return self.model is not None and unwrap(self.model).training and torch.is_grad_enabled()

    def loss(self, inputs: Any, targets: torch.Tensor | None, outputs: Any,
             *, context: StepContext | None = None) -> torch.Tensor:
        """``weight * term`` for this step; zero (and no extra work) in eval mode or under no_grad.

        Call it after the QAT model's forward on ``inputs`` that produced ``outputs``.
        """
        if not self.attached:
            raise RuntimeError(f"{type(self).__name__} is not attached; call attach(model) first")
        out = first_tensor(outputs)
        if not self.active():
            return out.new_zeros(())
        ctx = context if context is not None else StepContext(inputs, self.fp_model, self.fp_taps)
        # no tap of the student acts while a loss is computed: extra forwards open their own
        # exclusive() window, so the training forward's features stay as recorded (isolation)
        with exclusive(self.model):
            term = self._loss(inputs, targets, out, ctx)
        self.steps += 1
        self.last_loss = term.detach()
        # drop this step's recordings (the FP features too: held until the next step they would raise
        # the memory of the next forward and backward, and the allocator would return and re-fault it)
        for t in self._taps + self.fp_taps:
            t.clear()
        return self.weight * term

    # -- to implement ---------------------------------------------------------------------
    @abstractmethod
    def _attach(self) -> None: ...

    @abstractmethod
    def _loss(self, inputs: Any, targets: torch.Tensor | None, outputs: torch.Tensor,
              ctx: StepContext) -> torch.Tensor: ...

    def _detach(self) -> None:  # noqa: B027 - optional hook
        pass

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (e.g. an EMA teacher); default: the step counter."""
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))

    def config(self) -> dict[str, Any]:
        """Constructor arguments (for logs and checkpoints)."""
        return {"name": self.name, "weight": self.weight}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class RegularizerSet:
    """Several regularizers attached to one model; ``loss`` sums their weighted terms.

    The clean FP forward is shared (run once per step for all of them). Terms are computed in the
    order given, except that those of regularizers with :attr:`Regularizer.extra_student_forward`
    (CR) come after the others: the FP forward's temporaries and recordings are then freed before
    the extra student graph is allocated, instead of being allocated on top of it (design note:
    docs/regularizers.md, "Cost floors"); each term is the same in any order. A non-finite term raises
    :class:`NonFiniteLossError` naming the regularizer; the check reads all terms to the host in one
    sync per step, and :attr:`last_losses` then returns those values without another. A training loop
    that reads its own values too (task loss, accuracy) passes ``check_finite=False`` and hands the
    terms' values, read in its one sync, to :meth:`record` (as ``train_step`` does). Use as a context
    manager to detach on exit.
    """

    def __init__(self, regularizers: Sequence[Regularizer], model: nn.Module, fp_model: nn.Module | None) -> None:
        self.regularizers = list(regularizers)
        self.model = model
        self.fp_model = fp_model
        self._last_terms: dict[str, torch.Tensor] = {}
        self._last_values: list[float] | None = None  # host values of _last_terms, once read
        self.check_finite = True

    @property
    def last_losses(self) -> dict[str, float]:
        """``{name: weighted term}`` of the latest step (names repeated get their index appended)."""
        if not self._last_terms:
            return {}
        if self._last_values is None:
            self._last_values = torch.stack([t.float() for t in self._last_terms.values()]).tolist()  # one sync
        return dict(zip(self._last_terms, self._last_values))

    @property
    def last_terms(self) -> dict[str, torch.Tensor]:
        """``{name: weighted term}`` of the latest step as detached tensors (no host sync)."""
        return dict(self._last_terms)

    def record(self, values: Sequence[float]) -> None:
        """Take the host values of :attr:`last_terms` (in their order), read by the caller in its own
        sync: raises :class:`NonFiniteLossError` naming the first non-finite term's regularizer, and
        :attr:`last_losses` returns these values without reading the device again."""
        values = [float(v) for v in values]
        if len(values) != len(self._last_terms):
            raise ValueError(f"record() needs {len(self._last_terms)} values (one per term), got {len(values)}")
        self._last_values = values
        for i, value in enumerate(values):
            if not math.isfinite(value):
                r = self.regularizers[i]
                raise NonFiniteLossError(
                    f"regularizer {r.name!r} (#{i}) produced a non-finite loss ({value}); lower its weight "
                    "or the learning rate, or check the inputs")

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.regularizers)

    def __len__(self) -> int:
        return len(self.regularizers)

    def __enter__(self) -> "RegularizerSet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def detach(self) -> None:
        for r in reversed(self.regularizers):
            if r.attached:
                r.detach()

    def loss(self, inputs: Any, targets: torch.Tensor | None, outputs: Any, *,
             check_finite: bool | None = None) -> torch.Tensor:
        """Sum of ``weight * term`` of every regularizer for this step.

        ``check_finite``: ``None`` (default) follows :attr:`check_finite`; when checking, all terms are
        read to the host in one sync (kept for :attr:`last_losses`) and a non-finite one raises
        :class:`NonFiniteLossError`; ``False`` reads nothing (the caller may :meth:`record` them).
        """
        out = first_tensor(outputs)
        total = out.new_zeros(())
        if not self.regularizers:
            return total
        fp_taps = [t for r in self.regularizers for t in r.fp_taps]
        fp = self.regularizers[0].fp_model
        ctx = StepContext(inputs, fp, fp_taps)
        terms: list[torch.Tensor] = [total] * len(self.regularizers)
        for i in sorted(range(len(terms)), key=lambda i: self.regularizers[i].extra_student_forward):
            terms[i] = self.regularizers[i].loss(inputs, targets, outputs, context=ctx)
        self._last_terms, self._last_values = {}, None
        for i, (r, term) in enumerate(zip(self.regularizers, terms)):
            key = r.name if r.name not in self._last_terms else f"{r.name}{i}"
            self._last_terms[key] = term.detach()
            total = total + term
        if self.check_finite if check_finite is None else check_finite:
            self.record(torch.stack([t.detach().float() for t in terms]).tolist())  # the one host sync
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"regularizers": [{"config": r.config(), "state": r.state_dict()} for r in self.regularizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("regularizers", [])
        if [s["config"]["name"] for s in saved] != [r.name for r in self.regularizers]:
            raise ValueError("checkpoint regularizers "
                             f"{[s['config']['name'] for s in saved]} do not match the attached "
                             f"{[r.name for r in self.regularizers]}; use the config the checkpoint was made with")
        for r, s in zip(self.regularizers, saved):
            r.load_state_dict(s["state"])


def attach(model: nn.Module, regularizers: Regularizer | Sequence[Regularizer], *,
           fp_model: nn.Module | None = None) -> RegularizerSet:
    """Attach one or several regularizers to ``model``; returns a :class:`RegularizerSet`.

    Works directly or as a context manager (``with attach(...) as regs:``), which detaches all of
    them on exit. ``model`` may be a ``DistributedDataParallel`` wrapper; layers are addressed by the
    wrapped model's names. On failure, regularizers attached so far are detached again.
    """
    regs = [regularizers] if isinstance(regularizers, Regularizer) else list(regularizers)
    for r in regs:
        if not isinstance(r, Regularizer):
            raise TypeError(f"expected Regularizer instances, got {type(r).__name__}")
    if len({id(r) for r in regs}) != len(regs):
        raise ValueError("the same regularizer instance is listed twice")
    done: list[Regularizer] = []
    try:
        for r in regs:
            r.attach(model, fp_model=fp_model)
            done.append(r)
    except BaseException:
        for r in reversed(done):
            r.detach()
        raise
    return RegularizerSet(regs, model, unwrap(fp_model) if fp_model is not None else None)
