"""ONNX export of NNCF QAT models through the core exporter (``qat_plugins.export``).

NNCF's quantizers are lowered to the fake-quant representation of the torch.ao path (fixed
``LSQFakeQuantize`` grids, conv weights with ``weight_fake_quant``, BatchNorm folded), so the core
exporter writes the same fusable QDQ graph as for torch.ao models (docs/nncf.md).
"""

from __future__ import annotations

import copy
import os
import pathlib
from typing import Any

import torch
from torch import nn

from ...export import export_onnx
from ...quant.bias import BiasSnap, snap_to_grid
from ...quant.fake_quantize import LSQFakeQuantize
from ._compat import hook_storage, require_nncf
from .quantizers import NNCFQuantizerFinder, QuantizerInfo, nncf_quantizers, op_module_name, resolve

__all__ = ["to_fake_quant_model", "export_nncf_onnx", "snap_nncf_biases", "EXPORTER_NAME"]

EXPORTER_NAME = "nncf"


def _fixed_fake_quant(q: nn.Module, *, axis: int | None, activation: bool, scale: torch.Tensor | None = None
                      ) -> LSQFakeQuantize:
    """An ``LSQFakeQuantize`` with the NNCF quantizer's grid, frozen (no learning, no re-init)."""
    lo, hi, s, zp = q.get_parameters_for_torch_fq()
    s = (s if scale is None else scale).detach().float().reshape(-1)
    zp = zp.detach().float().reshape(-1)
    zp = zp.expand_as(s).clone() if zp.numel() == 1 else zp
    if activation and lo < 0:
        # a signed activation grid [lo, hi] with zero point z is the unsigned grid [0, hi - lo] with zero
        # point z - lo (same values); UINT8 activations are what ORT fuses into QLinearConv / QLinearAdd
        zp, lo, hi = zp - lo, 0, hi - lo
    if axis is None:
        qscheme = torch.per_tensor_affine
    else:
        qscheme = torch.per_channel_symmetric if bool((zp == 0).all()) else torch.per_channel_affine
    fq = LSQFakeQuantize(int(lo), int(hi), dtype=torch.qint8 if lo < 0 else torch.quint8, qscheme=qscheme,
                         ch_axis=axis or 0, learn_scale=False)
    # loading sizes per-channel qparams; initialized=1: no first-batch re-initialisation
    fq.load_state_dict({"scale": s, "zero_point": zp, "initialized": torch.tensor([1], dtype=torch.uint8)},
                       strict=False)
    return fq


def _channel_axis(q: nn.Module) -> int | None:
    shape = tuple(q.scale_shape)
    big = [i for i, d in enumerate(shape) if d > 1]
    return big[0] if big else None


def _following_batch_norm(graph: Any, hs: nn.Module, m: nn.Module, op_name: str) -> tuple[str, nn.Module] | None:
    """The BatchNorm op that alone consumes ``op_name``'s output, when nothing quantizes in between."""
    try:
        edges = graph.get_output_edges(graph.get_node_by_name(op_name))
    except Exception:  # noqa: BLE001 - an op NNCF's graph does not know: no fold
        return None
    if len(edges) != 1 or edges[0].to_node.node_type != "batch_norm" or f"{op_name}__0" in hs.post_hooks:
        return None
    bn_op = edges[0].to_node.node_name
    if any(k.startswith(f"{bn_op}__") for k in hs.pre_hooks):
        return None
    try:
        bn = resolve(m, bn_op)
    except KeyError:
        return None
    ok = isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.affine and bn.running_var is not None
    return (bn_op, bn) if ok else None


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _bn_fold(graph: Any, hs: nn.Module, m: nn.Module, qi: QuantizerInfo, layer: nn.Module
             ) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(bn op, k, folded weight scale, folded bias)`` when the BatchNorm alone after ``layer`` folds into it
    (``k = gamma / sqrt(var + eps)`` positive, weight grid per output channel or per tensor)."""
    folded = _following_batch_norm(graph, hs, m, qi.op_name)
    if folded is None:
        return None
    bn_op, bn = folded
    k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    if not (bool((k > 0).all()) and _channel_axis(qi.module) in (None, 0)):
        return None
    _, _, s, _ = qi.module.get_parameters_for_torch_fq()
    b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    # (q - z) * s * k: the grid of the folded weight
    return bn_op, k, s.reshape(-1).float() * k, bn.bias + (b - bn.running_mean) * k


@torch.no_grad()
def _lower_weight(m: nn.Module, hs: nn.Module, graph: Any, qi: QuantizerInfo, float_weights: bool) -> None:
    from nncf.torch.function_hook.hook_storage import decode_hook_name  # noqa: PLC0415

    layer = resolve(m, qi.module_name) if qi.module_name else None
    if not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) or getattr(layer, "transposed", False):
        raise ValueError(f"cannot export the NNCF weight quantizer of {qi.op_name!r}: its layer is not a "
                         "Conv1d/2d/3d or Linear module")
    q = qi.module
    # NNCF's own quantized values (exact); the float weights for an fp32 reference export
    w_hat = layer.weight.detach().clone() if float_weights else q.quantize(layer.weight.detach())
    axis = _channel_axis(q)
    scale = None
    fold = _bn_fold(graph, hs, m, qi, layer)
    if fold is not None:
        bn_op, k, scale, bias = fold
        axis = 0
        w_hat = w_hat * k.reshape([-1] + [1] * (w_hat.dim() - 1))
        layer.bias = nn.Parameter(bias)
        for name, hook in list(hs.named_hooks(remove_duplicate=False)):
            htype, op, port = decode_hook_name(name)
            if htype == "post_hooks" and op == bn_op:  # the BN output is the conv output now
                hs.delete_hook(name)
                hs.insert_hook_by_name(f"post_hooks.{qi.op_name}__{port}.{name.rsplit('.', 1)[1]}", hook)
        _set_module(m, op_module_name(bn_op), nn.Identity())
    layer.weight = nn.Parameter(w_hat.detach().clone(), requires_grad=False)
    layer.weight_fake_quant = _fixed_fake_quant(q, axis=axis, activation=False, scale=scale)
    hs.delete_hook(qi.hook_name)


def to_fake_quant_model(model: nn.Module, example_input: Any, *, float_weights: bool = False) -> nn.Module:
    """An eval-mode copy of an NNCF QAT model whose quantizers are torch.ao fake quantizers.

    Weights become NNCF's quantized values with a fixed ``weight_fake_quant`` on their layer (a
    BatchNorm that alone follows a conv is folded into it, its output quantizers moved to the conv);
    activation quantizers become fixed ``LSQFakeQuantize`` grids in NNCF's hook storage. The result
    computes what the NNCF model computes in eval mode and is what ``qat_plugins.export`` lowers.
    ``float_weights=True`` keeps the float weights (for ``weight_format="fp32"``, the float reference).
    """
    require_nncf()
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph  # noqa: PLC0415

    m = copy.deepcopy(model).eval()
    hs = hook_storage(m)
    graph = build_nncf_graph(m, example_input)
    infos = nncf_quantizers(m)
    for qi in infos:
        if qi.kind == "weight":
            _lower_weight(m, hs, graph, qi, float_weights)
    fixed: dict[int, nn.Module] = {}
    for name, q in list(hs.named_hooks(remove_duplicate=False)):
        if not (type(q).__module__.startswith("nncf.") and hasattr(q, "num_bits")):
            continue
        if getattr(q, "_half_range", False):
            raise ValueError(f"activation quantizer {name} uses NNCF's half range; it cannot be exported")
        if id(q) not in fixed:
            # per-channel activation grids (NNCF's choice for e.g. depthwise-conv inputs) stay per channel
            fixed[id(q)] = _fixed_fake_quant(q, axis=_channel_axis(q), activation=True) \
                if q.is_enabled_quantization() else nn.Identity()
        _set_module(hs, name, fixed[id(q)])
    return m


def export_nncf_onnx(model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, *,
                     weight_format: str = "int8", **options: Any) -> pathlib.Path:
    """Export an NNCF QAT model to QDQ ONNX with the core exporter (same graph as the torch.ao path).

    ``weight_format`` ``"int8"`` / ``"int4"`` / ``"fp32"`` and ``**options`` (``opset``, ``clip_mode``,
    ``int8_weight_type``, ``requantize_relu``) are those of :func:`qat_plugins.export.export_onnx`.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
    lowered = to_fake_quant_model(model, inputs[0] if len(inputs) == 1 else inputs,
                                  float_weights=weight_format == "fp32")
    return export_onnx(lowered, path, inputs, weight_format=weight_format, **options)


@torch.no_grad()
def snap_nncf_biases(model: nn.Module, example_inputs: Any) -> list[BiasSnap]:
    """:func:`qat_plugins.snap_biases` for NNCF models: each weight layer whose input one per-tensor
    activation quantizer produces gets its effective bias (a BatchNorm alone after it folded, as the
    export folds it) on the grid ``s_in * s_w`` of the exported file; the change goes into the
    BatchNorm's ``beta`` or the layer's bias. ``example_inputs``: a batch (NNCF's graph is traced)."""
    require_nncf()
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph  # noqa: PLC0415

    if example_inputs is None:
        raise ValueError("snap_biases(nncf_model, example_inputs): NNCF models need an example batch")
    inputs = example_inputs[0] if isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 1 \
        else example_inputs
    was = model.training
    model.eval()
    try:
        hs = hook_storage(model)
        graph = build_nncf_graph(model, inputs)
        finder = NNCFQuantizerFinder()
        done = []
        for qi in nncf_quantizers(model):
            layer = resolve(model, qi.module_name) if qi.kind == "weight" and qi.module_name else None
            qin = finder.input_quantizer(model, qi.module_name) if layer is not None else None
            if qin is None or not qi.module.is_enabled_quantization() or not qin.is_enabled_quantization():
                continue
            s_in = qin.get_parameters_for_torch_fq()[2]  # the scale the export writes
            fold = _bn_fold(graph, hs, model, qi, layer)
            if fold is not None:
                bn = resolve(model, fold[0])
                snapped = snap_to_grid(qi.module_name, fold[3], s_in, fold[2], bn.bias)
            elif _following_batch_norm(graph, hs, model, qi.op_name) is None and layer.bias is not None:
                s_w = qi.module.get_parameters_for_torch_fq()[2]
                snapped = snap_to_grid(qi.module_name, layer.bias, s_in, s_w, layer.bias)
            else:
                snapped = None  # a BatchNorm that does not fold: the layer's output is not requantized
            if snapped is not None:
                done.append(snapped)
        return done
    finally:
        model.train(was)
