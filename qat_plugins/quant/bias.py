"""Biases on the int32 grid of integer kernels, so the fake-quant model computes what ORT computes.

Integer kernels (ORT ``QLinearConv`` / ``QGemm``, fbgemm) add the bias as int32 at scale
``s_in * s_w``; :func:`snap_biases` moves each quantized layer's effective (BN-folded) bias onto that
grid in the model itself. Why: ``docs/onnx_export.md`` ("Biases on the int32 grid").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase

from ..taps import unwrap
from .fold import bn_fold_pattern, fold_bn, graph_attr, is_pt2e_graph
from .step_size import input_quantizer, quantizer_feeding, step_size

__all__ = ["snap_biases", "BiasSnap", "register_bias_snapper", "unregister_bias_snapper", "snap_to_grid"]


@dataclass
class BiasSnap:
    """One layer whose bias was put on its int32 grid, and the largest shift in steps of that grid (<= 0.5)."""

    layer: str
    max_shift_steps: float


# plugins (NNCF) register (applies(model), snap(model, example_inputs) -> list[BiasSnap])
_SNAPPERS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module, Any], list[BiasSnap]]]] = []


def register_bias_snapper(applies: Callable[[nn.Module], bool],
                          snap: Callable[[nn.Module, Any], list[BiasSnap]]) -> None:
    """Let :func:`snap_biases` hand models for which ``applies(model)`` is true to ``snap``."""
    if (applies, snap) not in _SNAPPERS:
        _SNAPPERS.append((applies, snap))


def unregister_bias_snapper(applies: Callable[[nn.Module], bool],
                            snap: Callable[[nn.Module, Any], list[BiasSnap]]) -> None:
    """Undo :func:`register_bias_snapper`."""
    if (applies, snap) in _SNAPPERS:
        _SNAPPERS.remove((applies, snap))


@torch.no_grad()
def snap_to_grid(name: str, bias: torch.Tensor, input_step: torch.Tensor, weight_step: torch.Tensor,
                 target: torch.Tensor) -> BiasSnap | None:
    """Round the effective ``bias`` (per output channel) to ``input_step * weight_step`` by adding the
    change to ``target`` in place (the parameter that carries it: BN's ``beta`` or the layer's bias);
    ``None`` (nothing changed) for a per-channel input grid, which ORT runs in float."""
    if input_step.numel() != 1:
        return None
    grid = input_step.detach().float().reshape(()) * weight_step.detach().float().reshape(-1)
    bias = bias.detach().float().reshape(-1)
    delta = torch.round(bias / grid) * grid - bias
    target.data.add_(delta.to(target.dtype).reshape(target.shape))
    return BiasSnap(name, float((delta / grid).abs().max()) if delta.numel() else 0.0)


# (name, effective bias, weight step, input activation quantizer, parameter that carries the bias)
_Layer = tuple[str, torch.Tensor, torch.Tensor, nn.Module, torch.Tensor]


def _module_layers(model: nn.Module) -> Iterator[_Layer]:
    """torch.ao eager / FX QAT layers: (name, folded bias, weight step, input quantizer, carrier)."""
    for name, mod in model.named_modules():
        fq = getattr(mod, "weight_fake_quant", None)
        if not isinstance(fq, FakeQuantizeBase) or not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        if not bool(fq.fake_quant_enabled[0]):
            continue
        qin = input_quantizer(model, name)
        _, bias = fold_bn(mod)
        bn = getattr(mod, "bn", None)
        target = bn.bias if bn is not None else mod.bias
        ws = step_size(fq)
        if qin is None or bias is None or target is None or ws is None:
            continue  # a float input: the layer runs in float and its bias is not rounded
        yield name, bias, ws, qin, target


def _pt2e_layers(gm: torch.fx.GraphModule) -> Iterator[_Layer]:
    """torchao PT2E conv / linear nodes with a fake-quantized weight (eval-mode graph)."""
    # quant.pt2e imports the optional torchao at import time: only PT2E graphs (torchao installed) get here
    from .pt2e import is_fake_quant_node, pt2e_module_name

    aten = torch.ops.aten
    layers = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in layers or len(node.args) < 2:
            continue
        fq_node = node.args[1]
        if not isinstance(fq_node, torch.fx.Node) or not is_fake_quant_node(fq_node):
            continue
        qin = quantizer_feeding(gm, node)
        ws = step_size(gm.get_submodule(str(fq_node.target)))
        if qin is None or ws is None:
            continue
        name = pt2e_module_name(node) or node.name
        conv_bias = node.args[2] if len(node.args) > 2 else None
        own = graph_attr(gm, str(conv_bias.target)) if isinstance(conv_bias, torch.fx.Node) \
            and conv_bias.op == "get_attr" else None
        found = bn_fold_pattern(gm, node) if node.target is not aten.linear.default else None
        if found is not None:
            bias, bn = found
            beta = bn.args[2]
            if not (isinstance(beta, torch.fx.Node) and beta.op == "get_attr"):
                continue
            if own is not None:  # a conv bias ahead of torchao's pattern passes through it unchanged
                bias = bias + own.float().reshape(-1)
            yield name, bias, ws, qin, graph_attr(gm, str(beta.target))
        elif own is not None:
            yield name, own, ws, qin, graph_attr(gm, str(conv_bias.target))


@torch.no_grad()
def snap_biases(model: nn.Module, example_inputs: Any = None) -> list[BiasSnap]:
    """Round every quantized layer's effective bias to the int32 grid ``s_in * s_w`` (in place).

    A layer qualifies when its weight fake quantizer is on and one per-tensor activation quantizer
    produces its input (found from the model's structure): the layers ONNX Runtime runs as integer
    kernels, which add the bias as int32 at scale ``s_in * s_w`` (ORT quantizes the exported float
    bias itself). The change per channel is at most half a step of that grid, far below an output
    step, and goes into BatchNorm's ``beta`` (fused or torchao conv-bn) or the layer's own bias.
    Afterwards PyTorch and ORT's fused kernels compute the same integers up to float summation order.

    Call it after the last update of weights, quantizer steps and BN statistics (after
    :func:`~qat_plugins.training.bn.reestimate_bn_stats`), before evaluating and exporting; the
    trainer does (``qat.snap_biases``, *project choice*: on). Works on eager / FX torch.ao models,
    torchao PT2E graphs and registered plugins (NNCF, which needs ``example_inputs`` to read its
    graph). Returns one :class:`BiasSnap` per layer changed.
    """
    m = unwrap(model)
    for applies, snap in reversed(_SNAPPERS):
        if applies(m):
            return snap(m, example_inputs)
    was_training = m.training
    m.eval()  # eval-mode BN statistics (PT2E models rewrite their graph: torchao's move_to_eval)
    try:
        layers = list(_pt2e_layers(m)) if is_pt2e_graph(m) else list(_module_layers(m))  # type: ignore[arg-type]
        done = []
        for name, bias, weight_step, qin, target in layers:
            s_in = step_size(qin)
            snapped = snap_to_grid(name, bias, s_in, weight_step, target) if s_in is not None else None
            if snapped is not None:
                done.append(snapped)
        return done
    finally:
        m.train(was_training)
