"""Small ``onnx`` graph helpers: constants, quantized-weight lookup, opset moves, clean-up."""

from __future__ import annotations

import onnx
import onnx.version_converter
from onnx import TensorProto

__all__ = ["QWEIGHT_SUFFIX", "weight_key", "constant_tensors", "dequantize_linear_inputs", "set_opset",
           "simplify_constants", "drop_unused_initializers", "requantize_relu_outputs",
           "clip_on_grid"]

QWEIGHT_SUFFIX = ".w.qweight"
_INT_TYPES = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4)


def weight_key(initializer_name: str) -> str:
    """Module path of an exported integer weight (``layer1.conv1.w.qweight`` -> ``layer1.conv1``)."""
    for suffix in (QWEIGHT_SUFFIX, QWEIGHT_SUFFIX + "_int4"):
        if initializer_name.endswith(suffix):
            return initializer_name[: -len(suffix)]
    return initializer_name


def constant_tensors(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """Initializers and ``Constant`` node values of ``graph`` by name."""
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = a.t
    return out


def dequantize_linear_inputs(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, TensorProto]]:
    """``DequantizeLinear`` nodes whose data input is a constant integer tensor (quantized weights)."""
    consts = constant_tensors(graph)
    out = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in consts \
                and consts[node.input[0]].data_type in _INT_TYPES:
            out.append((node, consts[node.input[0]]))
    return out


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def set_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Move the default-domain opset to ``opset``.

    Uses ``onnx.version_converter``; between opsets 17 and 21 the operators the exporter emits here
    (Conv, Gemm, Relu, Add, Clip, Flatten, pooling, Q/DQ, ...) only gained input types, so when the
    converter has no adapter for some step the import is bumped directly.
    """
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current == opset:
        return model
    try:
        return onnx.version_converter.convert_version(model, opset)
    except Exception:  # noqa: BLE001 - fall back to the direct bump (see docstring)
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = opset
        return model


def simplify_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shrink the TorchScript exporter's output without changing what it computes.

    * ``Identity`` nodes of initializers (the exporter's by-value initializer de-duplication) are
      bypassed;
    * ``Constant`` nodes become initializers, and identical small constants (the scales / zero
      points / clip bounds of the QDQ pairs) are stored once;
    * ``value_info`` left by the version converter and unused initializers are dropped.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    keep_nodes = []
    new_inits: list[TensorProto] = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in graph_outputs:
            rename[node.output[0]] = node.input[0]
            continue
        if node.op_type == "Constant" and node.output[0] not in graph_outputs and len(node.attribute) == 1 \
                and node.attribute[0].name == "value":
            t = TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            new_inits.append(t)
            continue
        keep_nodes.append(node)
    # de-duplicate small constants by value
    by_value: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    for t in new_inits:
        if not t.HasField("raw_data") or len(t.raw_data) > 64:
            graph.initializer.append(t)
            continue
        k = (t.data_type, tuple(t.dims), t.raw_data)
        if k in by_value:
            rename[t.name] = by_value[k]
        else:
            by_value[k] = t.name
            graph.initializer.append(t)
    for name in list(rename):  # resolve chains
        target = rename[name]
        while target in rename:
            target = rename[target]
        rename[name] = target
    for node in keep_nodes:
        for i, inp in enumerate(node.input):
            if inp in rename:
                node.input[i] = rename[inp]
    del graph.node[:]
    graph.node.extend(keep_nodes)
    del graph.value_info[:]
    drop_unused_initializers(graph)
    return model


def _graph_index(graph: onnx.GraphProto) -> tuple[dict[str, TensorProto], dict[str, onnx.NodeProto],
                                                  dict[str, list[onnx.NodeProto]], set[str]]:
    """Constants, producer and consumers of each value, and the graph's output names."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return constant_tensors(graph), producers, consumers, {o.name for o in graph.output}


def requantize_relu_outputs(model: onnx.ModelProto) -> int:
    """``DQ -> Relu -> consumers`` becomes ``DQ -> Relu -> Q -> DQ -> consumers`` (same scale and
    zero point as the first DQ, per-tensor grids only). Returns the number of Relu nodes changed.

    A ReLU of values on a grid that contains zero stays on that grid, so the extra Q/DQ pair changes
    no value; it gives the consumers (eager torch.ao models apply a float ``ReLU`` after the
    quantized residual add) the ``DQ -> Conv`` pattern ONNX Runtime needs to fuse ``QLinearConv``.
    """
    graph = model.graph
    consts, producers, consumers, graph_outputs = _graph_index(graph)
    new_nodes: list[onnx.NodeProto] = []
    changed = 0
    for node in graph.node:
        new_nodes.append(node)
        if node.op_type != "Relu":
            continue
        dq = producers.get(node.input[0])
        out = node.output[0]
        users = consumers.get(out, [])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in consts or out in graph_outputs \
                or not users or all(u.op_type == "QuantizeLinear" for u in users):
            continue
        scale = consts.get(dq.input[1])
        if scale is None or len(scale.dims) > 0 or len(dq.input) < 3 or dq.input[2] not in consts:
            continue
        q_out, dq_out = out + "_requant_q", out + "_requant"
        new_nodes.append(onnx.helper.make_node("QuantizeLinear", [out, dq.input[1], dq.input[2]], [q_out],
                                               name=node.name + "_requant_Q"))
        new_nodes.append(onnx.helper.make_node("DequantizeLinear", [q_out, dq.input[1], dq.input[2]], [dq_out],
                                               name=node.name + "_requant_DQ"))
        for u in users:
            for i, inp in enumerate(u.input):
                if inp == out:
                    u.input[i] = dq_out
        changed += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    return changed


def _scalar(consts: dict[str, TensorProto], name: str) -> float | None:
    t = consts.get(name)
    if t is None:
        return None
    arr = onnx.numpy_helper.to_array(t)
    return float(arr) if arr.size == 1 else None


def clip_on_grid(model: onnx.ModelProto) -> int:
    """``DQ(s, z) -> Clip(lo, hi) -> Q(s, z)`` (ReLU6 / hardtanh between two quantizers of one grid,
    FX's and PT2E's shared-qparams pattern) becomes an integer ``Clip(q, round(lo/s)+z, round(hi/s)+z)``
    on the quantized tensor. Exact: clamping a grid value and re-rounding on the same grid equals
    clamping its integer (0 is on the grid, ``x <= hi`` means ``q - z <= floor(hi/s)``). ORT then keeps
    the integer path instead of dequantizing, clipping in float and quantizing again. The ``Clip`` takes
    the ``QuantizeLinear``'s name and output. Returns the number of patterns rewritten.
    """
    import numpy as np

    graph = model.graph
    consts, producers, consumers, graph_outputs = _graph_index(graph)
    replace: dict[int, onnx.NodeProto] = {}
    new_inits: list[TensorProto] = []
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or len(q.input) < 3:
            continue
        clip = producers.get(q.input[0])
        if clip is None or clip.op_type != "Clip" or len(clip.input) < 3 or clip.output[0] in graph_outputs \
                or len(consumers.get(clip.output[0], [])) != 1:
            continue
        dq = producers.get(clip.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or dq.input[0] in consts:
            continue
        s_q, s_dq = _scalar(consts, q.input[1]), _scalar(consts, dq.input[1])
        z_q, z_dq = consts.get(q.input[2]), consts.get(dq.input[2])
        lo, hi = _scalar(consts, clip.input[1]), _scalar(consts, clip.input[2])
        if None in (s_q, s_dq, lo, hi) or z_q is None or z_dq is None or s_q != s_dq \
                or z_q.data_type != z_dq.data_type or _scalar(consts, q.input[2]) != _scalar(consts, dq.input[2]):
            continue
        z = int(_scalar(consts, q.input[2]))
        dtype = np.uint8 if z_q.data_type == TensorProto.UINT8 else np.int8
        info = np.iinfo(dtype)
        s32 = np.float32(s_q)
        qlo = int(np.clip(np.round(np.float32(lo) / s32) + z, info.min, info.max))
        qhi = int(np.clip(np.round(np.float32(hi) / s32) + z, info.min, info.max))
        lo_name, hi_name = f"{q.name}_clip_lo", f"{q.name}_clip_hi"
        new_inits += [onnx.numpy_helper.from_array(np.array(qlo, dtype=dtype), lo_name),
                      onnx.numpy_helper.from_array(np.array(qhi, dtype=dtype), hi_name)]
        replace[id(q)] = onnx.helper.make_node("Clip", [dq.input[0], lo_name, hi_name], [q.output[0]], name=q.name)
    if not replace:
        return 0
    nodes = [replace.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    # the float DQ -> Clip pair is dead unless something else reads it
    used = {i for n in graph.node for i in n.input} | graph_outputs
    changed = True
    while changed:
        changed = False
        keep = [n for n in graph.node if any(o in used for o in n.output) or not n.output]
        if len(keep) != len(graph.node):
            del graph.node[:]
            graph.node.extend(keep)
            used = {i for n in graph.node for i in n.input} | graph_outputs
            changed = True
    drop_unused_initializers(graph)
    return len(replace)
