"""``prepare_qat``: one call from an ordinary ``nn.Module`` to a torch.ao QAT model.

Modes:

* ``"eager"`` -- ``torch.ao.quantization.prepare_qat`` on a deep copy. conv-bn(-relu) runs found by
  tracing are fused first; an input ``QuantStub`` and output ``DeQuantStub`` are attached as
  submodules ``qat_input_quant`` / ``qat_output_dequant`` driven by hooks, so the user's module tree
  and names stay as they were.
* ``"fx"`` -- ``torch.ao.quantization.quantize_fx.prepare_qat_fx`` (needs ``example_inputs``).
* ``"pt2e"`` -- torchao's ``prepare_qat_pt2e`` with :class:`qat_plugins.quant.pt2e.LowBitQuantizer`.

With ``keep_first_last_8bit`` the first and last conv/linear layers (in execution order) keep 8-bit
weights and outputs, as the papers do.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .fake_quantize import quant_range
from .qconfig import qconfig as make_qconfig

__all__ = ["prepare_qat", "quantizable_layers", "quiet_deprecation", "MODES"]

MODES = ("eager", "fx", "pt2e")
_QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@contextlib.contextmanager
def quiet_deprecation() -> Iterator[None]:
    """Silence torch.ao.quantization's deprecation notice (noise for users of this package)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecat.*")
        warnings.filterwarnings("ignore", message=r".*erminology.*")
        yield


def _trace(model: nn.Module) -> torch.fx.GraphModule | None:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - untraceable models fall back to registration order
        return None


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of conv/linear modules in execution order (registration order if not traceable)."""
    gm = _trace(model)
    mods = dict(model.named_modules())
    if gm is not None:
        names = [n.target for n in gm.graph.nodes if n.op == "call_module"]
        return [str(n) for n in names if isinstance(mods.get(str(n)), _QUANTIZABLE)]
    return [n for n, m in model.named_modules() if isinstance(m, _QUANTIZABLE)]


def _fusion_groups(model: nn.Module) -> list[list[str]]:
    """conv->bn(->relu) runs where each intermediate output has one user (traced when possible)."""
    mods = dict(model.named_modules())
    gm = _trace(model)
    groups: list[list[str]] = []
    if gm is not None:
        for node in gm.graph.nodes:
            if node.op != "call_module" or not isinstance(mods.get(node.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                continue
            group, cur = [node.target], node
            for want in ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), (nn.ReLU,)):
                users = list(cur.users)
                if len(users) != 1 or users[0].op != "call_module" or not isinstance(mods.get(users[0].target), want):
                    break
                cur = users[0]
                group.append(cur.target)
            if len(group) > 1:
                groups.append(group)
        return groups
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if isinstance(child, nn.Conv2d) and i + 1 < len(children) and isinstance(children[i + 1][1], nn.BatchNorm2d):
                prefix = f"{parent_name}." if parent_name else ""
                group = [prefix + name, prefix + children[i + 1][0]]
                if i + 2 < len(children) and isinstance(children[i + 2][1], nn.ReLU):
                    group.append(prefix + children[i + 2][0])
                groups.append(group)
    return groups


def _input_quant_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (module.qat_input_quant(args[0]),) + tuple(args[1:])


def _output_dequant_hook(module: nn.Module, args: Any, output: Any) -> Any:
    return module.qat_output_dequant(output)


def _check_args(weight_bits: Any, act_bits: Any, mode: Any) -> None:
    for name, bits, signed in (("weight_bits", weight_bits, True), ("act_bits", act_bits, False)):
        try:
            quant_range(bits, signed)
        except (TypeError, ValueError) as e:  # name the argument
            raise type(e)(f"{name}: {e}") from None
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")


def prepare_qat(
    model: nn.Module,
    *,
    weight_bits: int = 8,
    act_bits: int = 8,
    mode: str = "eager",
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    keep_first_last_8bit: bool = True,
    per_channel: bool = True,
    learnable: bool = True,
) -> nn.Module:
    """Return a QAT-prepared copy of ``model`` in train mode (``model`` itself is left unchanged).

    Args:
        model: an ordinary float ``nn.Module`` (no QuantStub edits needed).
        weight_bits, act_bits: bit widths 2..8.
        mode: ``"eager"``, ``"fx"`` or ``"pt2e"`` (torchao's PT2E flow).
        example_inputs: a tensor or tuple of inputs; required for ``"fx"`` and ``"pt2e"``.
        keep_first_last_8bit: keep the first and last conv/linear at 8 bit.
        per_channel: per-output-channel weight scales.
        learnable: LSQ learned step sizes (``False``: min/max baseline quantizers).

    Raises:
        ValueError / TypeError: bad bit widths or mode, missing ``example_inputs``, or a model FX
            cannot trace (the message says what to change).
    """
    _check_args(weight_bits, act_bits, mode)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if mode in ("fx", "pt2e") and example_inputs is None:
        raise ValueError(f"mode={mode!r} needs example_inputs (e.g. a batch of inputs as a tuple)")
    qc = make_qconfig(weight_bits, act_bits, per_channel=per_channel, learnable=learnable)
    qc8 = make_qconfig(8, 8, per_channel=per_channel, learnable=learnable)
    layers = quantizable_layers(model)
    keep8 = [layers[0], layers[-1]] if keep_first_last_8bit and layers else []

    if mode == "pt2e":
        from .pt2e import prepare_qat_pt2e_model

        return prepare_qat_pt2e_model(model, tuple(example_inputs), weight_bits=weight_bits,
                                      act_bits=act_bits, keep_8bit=keep8, per_channel=per_channel,
                                      learnable=learnable)
    m = copy.deepcopy(model).train()
    with quiet_deprecation():
        if mode == "fx":
            from torch.ao.quantization.quantize_fx import prepare_qat_fx

            mapping = torch.ao.quantization.QConfigMapping().set_global(qc)
            for name in keep8:
                mapping.set_module_name(name, qc8)
            try:
                prepared = prepare_qat_fx(m, mapping, tuple(example_inputs))
            except (torch.fx.proxy.TraceError, TypeError, NotImplementedError) as e:
                raise ValueError(
                    f"FX cannot trace {type(model).__name__} ({type(e).__name__}: {e}); use mode='eager', "
                    "or make forward free of data-dependent Python control flow") from e
            return prepared.train()

        from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules_qat, prepare_qat as ao_prepare_qat

        groups = _fusion_groups(m)
        if groups:
            m = fuse_modules_qat(m, groups, inplace=False)
        m.qconfig = qc  # type: ignore[assignment]
        for name in keep8:
            m.get_submodule(name).qconfig = qc8  # type: ignore[assignment]
        m.qat_input_quant = QuantStub(qc8)
        m.qat_output_dequant = DeQuantStub()
        ao_prepare_qat(m, inplace=True)
        m.register_forward_pre_hook(_input_quant_hook)
        m.register_forward_hook(_output_dequant_hook)
        return m.train()
