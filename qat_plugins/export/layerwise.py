"""Layer-by-layer comparison of an exported QDQ file in ONNX Runtime with its PyTorch model.

Every activation quantizer is a ``QuantizeLinear`` node in the file and an
:class:`~qat_plugins.export.qdq.ActivationQDQ` call in the lowered PyTorch model, in the same (traced)
order. The integer outputs of those ``QuantizeLinear`` nodes are made extra graph outputs -- ORT's
fused kernels (``QLinearConv`` ...) still produce them under the same name, so the optimized graph
is the one that runs -- and compared with the integers PyTorch computes. The first quantizer whose
integers differ by more than ``tolerance`` grid steps while every quantizer feeding it agrees exactly
names the node where ORT and PyTorch part (a rounding tie upstream moves everything after it).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from .int4 import int4_weights_to_int8
from .lowering import lower_qat_model
from .qdq import ActivationQDQ

__all__ = ["LayerDiff", "LayerComparison", "compare_layers"]


@dataclass
class LayerDiff:
    """One activation quantizer: ONNX node, the op feeding it, torch module, max |step| difference."""

    index: int
    onnx_node: str
    producer_op: str
    torch_module: str
    max_step_diff: int
    mismatch_fraction: float


@dataclass
class LayerComparison:
    """All compared quantizers in graph order and the first one beyond ``tolerance`` (or ``None``)."""

    layers: list[LayerDiff]
    tolerance: int
    first_divergence: LayerDiff | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        if self.first_divergence is None:
            worst = max((d.max_step_diff for d in self.layers), default=0)
            if worst <= self.tolerance:
                return f"all {len(self.layers)} quantized tensors agree within {worst} grid step(s)"
            return (f"no root divergence: every difference beyond {self.tolerance} grid step(s) (up to {worst}) "
                    "follows a rounding tie in a quantizer feeding it")
        d = self.first_divergence
        return (f"ORT and PyTorch part at quantizer #{d.index} '{d.onnx_node}' (after {d.producer_op}; torch "
                f"module '{d.torch_module}'): up to {d.max_step_diff} grid steps, {d.mismatch_fraction:.2%} "
                "of the elements")


def _torch_integers(model: nn.Module, x: torch.Tensor) -> list[tuple[str, np.ndarray]]:
    lowered = lower_qat_model(model, "int8").module
    names: dict[int, str] = {}
    for n, m in lowered.named_modules(remove_duplicate=False):
        if isinstance(m, ActivationQDQ):
            names.setdefault(id(m), n)
    out: list[tuple[str, np.ndarray]] = []

    def hook(mod: ActivationQDQ, args: tuple[Any, ...], _y: Any) -> None:
        out.append((names.get(id(mod), "?"), mod.integers(args[0]).numpy()))

    handles = [m.register_forward_hook(hook) for m in lowered.modules() if isinstance(m, ActivationQDQ)]
    try:
        with torch.no_grad():
            lowered(x)
    finally:
        for h in handles:
            h.remove()
    return out


_VALUE_PRESERVING = {"Flatten", "Reshape", "Relu", "Clip", "MaxPool", "GlobalAveragePool", "AveragePool",
                     "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout"}


def _scale_of(name: str, consts: dict[str, onnx.TensorProto]) -> float | None:
    t = consts.get(name)
    if t is None:
        return None
    return float(np.max(onnx.numpy_helper.to_array(t)))


def _requant_ratio(q: onnx.NodeProto, producers: dict[str, onnx.NodeProto], consts: dict[str, onnx.TensorProto]) -> int:
    """``ceil(s_upstream / s_q)`` when ``q`` re-quantizes a dequantized tensor (through value-preserving
    ops only) onto a finer grid, else 1."""
    if q.op_type != "QuantizeLinear":
        return 1
    node = producers.get(q.input[0])
    for _ in range(16):
        if node is None or node.op_type not in _VALUE_PRESERVING | {"DequantizeLinear"}:
            return 1
        if node.op_type == "DequantizeLinear":
            up, mine = _scale_of(node.input[1], consts), _scale_of(q.input[1], consts)
            return max(1, int(np.ceil(up / mine - 1e-6))) if up and mine else 1
        node = producers.get(node.input[0])
    return 1


def _upstream(q: onnx.NodeProto, producers: dict[str, onnx.NodeProto], q_index: dict[str, int]) -> set[int]:
    """Indices of the activation quantizers whose values reach ``q`` without passing another quantizer."""
    seen: set[str] = set()
    out: set[int] = set()
    stack = [q.input[0]]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in q_index:
            out.add(q_index[name])
            continue
        node = producers.get(name)
        if node is not None:
            stack.extend(i for i in node.input if i)
    return out


def compare_layers(path: str | os.PathLike[str], model: nn.Module, x: torch.Tensor, *, tolerance: int = 1,
                   providers: Sequence[str] | None = None, num_threads: int | None = 1,
                   optimize: bool = True, widen_int4: bool = True) -> LayerComparison:
    """Run ``x`` through the file (ORT, all graph optimizations) and the model; compare every
    activation quantizer's integers (``optimize=False``: ORT without graph optimizations, i.e. the
    file's own semantics without fused kernels). ``tolerance`` grid steps are allowed (1: a rounding tie or a
    requantization rounding in a fused integer kernel); a quantizer that re-quantizes a coarser grid
    (e.g. 4-bit pooled features read by an 8-bit classifier) allows ``tolerance`` steps of that grid.

    Raises ``ValueError`` when the file's quantizers cannot be matched to the model's (a file from
    another model, or an exporter that is not the built-in one).
    """
    import onnxruntime as ort

    proto = onnx.load(str(path))
    if widen_int4:  # as deployed (qat_plugins.export.ort_session): INT4 weights widened to INT8
        int4_weights_to_int8(proto, factor=16)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    # activation quantizers: QuantizeLinear nodes, and the integer Clips that replaced the second
    # quantizer of a DQ -> Clip -> Q pattern (:func:`~qat_plugins.export.onnx_graph.clip_on_grid`)
    qnodes = [n for n in graph.node if (n.op_type == "QuantizeLinear" and not n.name.endswith("_requant_Q")
                                        or n.op_type == "Clip" and n.name.endswith("QuantizeLinear"))
              and n.input[0] not in inits]
    ref = _torch_integers(copy.deepcopy(model).eval(), x.detach().float().cpu())
    if len(ref) != len(qnodes):
        raise ValueError(f"{path}: {len(qnodes)} activation QuantizeLinear nodes but the model runs {len(ref)} "
                         "activation quantizers; is this the model the file was exported from?")
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # the integer tensor of each quantizer: Q's output, or the integer Clip right after it (sub-8-bit grids)
    taps = []
    for n in qnodes:
        users = consumers.get(n.output[0], [])
        sub8 = len(users) == 1 and users[0].op_type == "Clip" and not users[0].name.endswith("QuantizeLinear")
        taps.append(users[0].output[0] if sub8 else n.output[0])
    existing = {o.name for o in graph.output}
    for n, tap in zip(qnodes, taps):
        if tap not in existing:
            zp = inits.get(n.input[2]) if len(n.input) > 2 else None
            elem = zp.data_type if zp is not None else onnx.TensorProto.UINT8
            graph.output.append(onnx.helper.make_tensor_value_info(tap, elem, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:  # the file's own semantics, no fused kernels (tells ORT's fusions from the export)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if num_threads is not None:
        so.intra_op_num_threads = num_threads
    sess = ort.InferenceSession(proto.SerializeToString(), so,
                                providers=list(providers or ["CPUExecutionProvider"]))
    outs = sess.run(taps, {sess.get_inputs()[0].name: x.detach().float().cpu().numpy()})
    consts = {t.name: t for t in graph.initializer}
    q_index = {n.output[0]: i for i, n in enumerate(qnodes)}
    layers: list[LayerDiff] = []
    first = None
    for i, (n, o, (tname, t)) in enumerate(zip(qnodes, outs, ref)):
        # a requantization (DQ -> [pool / reshape / relu ...] -> Q onto a finer grid) turns one step
        # of the coarser grid (a rounding tie upstream) into several steps here: allow that many
        allowed = tolerance * _requant_ratio(n, producers, consts)
        if o.shape != t.shape:
            raise ValueError(f"quantizer #{i} '{n.name}': ORT shape {o.shape} vs torch {t.shape} ('{tname}'); "
                             "the file and the model do not match")
        diff = np.abs(o.astype(np.int32) - t.astype(np.int32))
        src = producers.get(n.input[0])
        d = LayerDiff(i, n.name, src.op_type if src is not None else "graph input", tname, int(diff.max(initial=0)),
                      float((diff > 0).mean()) if diff.size else 0.0)
        layers.append(d)
        # a root divergence: beyond the tolerance although every quantizer feeding it agreed exactly
        # (a rounding tie upstream legitimately moves everything downstream)
        if first is None and d.max_step_diff > allowed and \
                all(layers[j].max_step_diff == 0 for j in _upstream(n, producers, q_index)):
            first = d
    return LayerComparison(layers, tolerance, first)
