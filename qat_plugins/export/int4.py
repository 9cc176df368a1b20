"""INT4 weight storage for QDQ ONNX models.

ONNX opset 21 lets ``DequantizeLinear`` take ``INT4`` / ``UINT4`` inputs. The initializers are
written as packed ``raw_data`` (two values per byte, first value in the low nibble), which is what
makes an INT4 file about half the size of the INT8 one (``int32_data`` storage, what
``onnx.helper.make_tensor`` does with a Python list, spends four bytes per value).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .onnx_graph import QWEIGHT_SUFFIX, constant_tensors, dequantize_linear_inputs, drop_unused_initializers, weight_key

__all__ = ["pack_int4_tensor", "to_int4_weights", "int4_weights_to_int8"]


def pack_int4_tensor(values: np.ndarray, name: str, signed: bool = True) -> TensorProto:
    """An ONNX INT4 (``signed``) or UINT4 initializer of ``values`` (integers in [-8, 7] / [0, 15]),
    packed two values per byte in ``raw_data``. Raises ``ValueError`` for values out of range.

    The one INT4 packer of the package (exporters of integrations call it too).
    """
    import ml_dtypes

    lo, hi = (-8, 7) if signed else (0, 15)
    if values.size and (values.min() < lo or values.max() > hi):
        raise ValueError(f"{name}: values outside [{lo}, {hi}] cannot be stored as 4-bit")
    arr = values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4)
    t = numpy_helper.from_array(arr, name)  # packed raw_data, two values per byte
    assert t.data_type == (TensorProto.INT4 if signed else TensorProto.UINT4) and t.HasField("raw_data")
    return t


def to_int4_weights(model: onnx.ModelProto, weight_names: Iterable[str] | Mapping[str, int]) -> list[str]:
    """Re-type the integer weights (and their zero points) of the listed layers to INT4/UINT4.

    ``weight_names`` are module paths (``layer1.conv1``), or a mapping of module path to the storage
    offset (128 for a signed grid stored as UINT8 + 128, else 0). Each converted
    ``DequantizeLinear`` gets its own INT4 weight and zero-point initializers (the TorchScript
    exporter may share identical zero-point tensors between an 8-bit and a 4-bit layer). Returns
    the module paths converted.
    """
    offsets = dict(weight_names) if isinstance(weight_names, Mapping) else dict.fromkeys(weight_names, 0)
    wanted = set(offsets)
    graph = model.graph
    consts = constant_tensors(graph)
    converted = []
    new_inits: list[TensorProto] = []
    for node, wt in dequantize_linear_inputs(graph):
        key = weight_key(node.input[0])
        if key not in wanted:
            continue
        off = offsets[key]
        q = numpy_helper.to_array(wt).astype(np.int16) - off
        signed = wt.data_type == TensorProto.INT8 or off != 0
        if len(node.input) < 3 or node.input[2] not in consts:
            zp = np.zeros(() if len(node.input) < 2 else numpy_helper.to_array(consts[node.input[1]]).shape,
                          dtype=np.int16)
        else:
            zp = numpy_helper.to_array(consts[node.input[2]]).astype(np.int16) - off
        w_name, zp_name = key + QWEIGHT_SUFFIX + "_int4", key + QWEIGHT_SUFFIX + "_int4_zero_point"
        new_inits.append(pack_int4_tensor(q, w_name, signed))
        new_inits.append(pack_int4_tensor(zp, zp_name, signed))
        node.input[0] = w_name
        if len(node.input) < 3:
            node.input.append(zp_name)
        else:
            node.input[2] = zp_name
        converted.append(key)
    graph.initializer.extend(new_inits)
    drop_unused_initializers(graph)
    return converted


def int4_weights_to_int8(model: onnx.ModelProto, *, factor: int = 1) -> list[str]:
    """The reverse of :func:`to_int4_weights`: INT4/UINT4 weight initializers (and zero points)
    become INT8/UINT8 with the same values. Returns the module paths converted.

    ``factor`` (1, 2, 4, 8 or 16) stores ``q * factor`` and ``zero_point * factor`` with the scale
    divided by ``factor``: the same dequantized weights (power-of-two scaling is exact), and ONNX
    Runtime's int32 bias at scale ``s_in * s_weight`` becomes ``factor`` times more exact.

    ONNX Runtime 1.32's CPU provider fuses ``DequantizeLinear`` only for 8-bit weights; a file
    shipped with INT4 weights (half the download) can be widened at load time to get the
    ``QLinearConv`` / ``QGemm`` integer kernels back.
    """
    if factor not in (1, 2, 4, 8, 16):
        raise ValueError(f"factor must be 1, 2, 4, 8 or 16 (INT4 values times it must fit 8 bits), got {factor}")
    graph = model.graph
    consts = constant_tensors(graph)
    taken = set(consts)
    new_inits: list[TensorProto] = []
    done: list[str] = []
    for node, wt in dequantize_linear_inputs(graph):
        if wt.data_type not in (TensorProto.INT4, TensorProto.UINT4):
            continue
        dtype = np.int8 if wt.data_type == TensorProto.INT4 else np.uint8
        key = weight_key(node.input[0])
        for idx, name, mult in ((0, key + QWEIGHT_SUFFIX, factor), (2, key + QWEIGHT_SUFFIX + "_zero_point", factor),
                                (1, key + QWEIGHT_SUFFIX + "_scale", 1.0 / factor)):
            if idx >= len(node.input) or node.input[idx] not in consts or (idx == 1 and factor == 1):
                continue
            while name in taken:
                name += "_int8"
            taken.add(name)
            src = numpy_helper.to_array(consts[node.input[idx]])
            arr = (src.astype(np.float32) * np.float32(mult)).astype(np.float32) if idx == 1 else \
                (src.astype(np.int16) * int(mult)).astype(dtype)
            new_inits.append(numpy_helper.from_array(arr, name))
            node.input[idx] = name
        done.append(key)
    graph.initializer.extend(new_inits)
    drop_unused_initializers(graph)
    return done
