"""Export a torch.ao QAT model (``qat_plugins.prepare_qat``, eager or FX) to a QDQ ONNX model.

Pipeline: :func:`~qat_plugins.export.lowering.lower_qat_model` (deep copy in eval mode, fake
quantizers -> QDQ modules, BatchNorm folded) -> ``torch.onnx.export(..., dynamo=False)`` (the
TorchScript exporter, opset <= 20, dynamic batch axis) -> post-processing with ``onnx`` (constants
to initializers, opset move via ``onnx.version_converter``, INT4 repacking, metadata,
``onnx.checker``) -> atomic write (temp file in the target directory + ``os.replace``).

Graph form (numbers measured with ONNX Runtime 1.32, CPU provider, on this AVX2 machine, for
``SmallResNet(width=16)`` on digits; the optimized graph read back from ORT):

* **Weights**: integer initializers -> ``DequantizeLinear`` (per-channel scale and zero point,
  ``axis=0``) -> ``Conv`` / ``Gemm``. Grids of up to 7 bits are INT8. Full 8-bit signed grids
  (e.g. the first/last layer kept at 8 bit) are stored by default as **UINT8 with zero point + 128**
  (``int8_weight_type="auto"``) -- the same dequantized values, but ORT then runs its U8U8 kernels:
  its x86 U8S8 kernels on CPUs without VNNI add pairs of ``u8 * s8`` products in saturating int16,
  which 8-bit weights (``|w| > 64``) overflow. Measured: a W8A8 eager SmallResNet agreed with
  PyTorch on 97.6 % of the test images with INT8 weights, 100 % with UINT8 + 128.
  ``int8_weight_type="int8"`` writes pure INT8 (symmetric, zero point 0) for VNNI / ARM CPUs or
  other runtimes.
* **Activations**: ``QuantizeLinear -> DequantizeLinear`` pairs (UINT8 for ``quint8`` quantizers,
  INT8 for ``qint8``). At A8 FX models fuse completely: 9x ``QLinearConv``, 3x ``QLinearAdd``,
  ``QLinearGlobalAveragePool``, ``QGemm``; only the input ``QuantizeLinear`` and output
  ``DequantizeLinear`` stay. Eager torch.ao models compute a float ReLU after the quantized residual
  add and leave the pooled features unquantized (the exported graph does what the fake-quant model
  does); a value-preserving Q/DQ with the add's grid is inserted after such a ReLU, so all 9 convs
  still fuse, while ``GlobalAveragePool`` and the classifier ``Gemm`` run in float.
* **Sub-8-bit activation grids** (2..7 bit): a UINT8 ``QuantizeLinear`` saturates at 0..255, not at
  ``quant_max``, so an integer ``Clip(quant_min, quant_max)`` runs between Q and DQ
  (``clip_mode="int"``). That is exactly the fake quantizer's clamp and keeps ORT's fusions: at
  W4A4 the optimized graph still has 9x ``QLinearConv`` + 3x ``QLinearAdd`` (+ ``QGemm``,
  ``QLinearGlobalAveragePool`` for FX), with 11-12 ``Clip`` nodes on uint8 tensors in between.
  A float ``Clip`` before Q (``"before"``: ORT fuses it into a float ``FusedConv``, 8 of 9 convs
  float) or after DQ (``"after"``: 7 of 9 convs float) gives the same values but ran 3-5x slower.
  8-bit grids get no Clip.
* **INT4** (``weight_format="int4"``): weights whose quantizer has ``bits <= 4`` become opset-21
  INT4 initializers (packed ``raw_data``, two values per byte) feeding the standard
  ``DequantizeLinear``; the model's opset becomes 21. Weights with more bits (the first/last layer
  that ``prepare_qat(keep_first_last_8bit=True)`` keeps at 8 bit) stay 8-bit in the same file. A
  <= 4-bit grid that fits neither INT4 nor UINT4 is an error. Chosen over ORT's 4-bit contrib ops
  because those cover only MatMul (``MatMulNBits``, block-wise along K) while these models are
  conv-dominated, and the standard op keeps the file portable and the per-channel grids bit-exact.
  Measured: ORT does not fuse INT4 weights into an integer kernel (8 of 9 convs run as
  ``DequantizeLinear`` + float ``Conv`` every call), 3-4.5x slower than FP32 here -- INT4 is a
  storage/download format. :func:`unpack_int4` widens the weights to INT8 (same values) at the
  deployment site and brings the fused kernels back.
* **Sizes** (SmallResNet(16), 77k weights): FP32 306 KB; INT8 94-98 KB (0.31x: the int8 weights
  are 77 KB, the rest is per-channel scales, float biases and ~150 graph nodes); INT4 58-61 KB
  (0.19-0.20x). Weight-dominated models approach 1/4 and 1/8.
* ``weight_format="fp32"`` exports the same graph with all quantization removed (BN folded), the
  float reference for size/latency comparisons; it also accepts plain float models.

Numerics: integer weights are derived from the fake quantizer's own output, so
``(q - z) * s`` in the file equals the PyTorch fake-quantized (BN-folded) weight bit for bit.
Activations use ``QuantizeLinear``'s ``round(x / s) + z`` (half to even, like ``torch.round``) plus
the clamp; with ORT's QDQ fusion off the file reproduces every fake-quantized activation except
where float summation order decides a rounding boundary (~1e-5 of the elements after a conv; often
after average pooling, whose means of grid values land on exact .5 ties). The fused integer kernels
requantize with their own rounding: top-1 agreement with PyTorch measured 99.8-100 %.

Limitations: models already converted to quantized kernels (``torch.ao.quantization.convert`` /
``convert_fx``) are rejected -- their modules no longer carry the quantizers' ``quant_min`` /
``quant_max``, so sub-8-bit grids cannot be reproduced; export the prepared (fake-quant) model.
Models whose weight quantizers are not ``weight_fake_quant`` modules of QAT Conv/Linear layers
(PT2E models from ``prepare_qat_pt2e``, custom layers) export with float weights followed by
Q/DQ (same values, no integer storage, fused BatchNorm unfolded, a warning) and cannot be INT4.
Supported weight layers: Conv1d/2d/3d and Linear, plain or fused with BatchNorm / ReLU.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
import torch

from .._io import atomic_write_bytes
from onnx import numpy_helper
from torch import nn

from .int4 import int4_weights_to_int8, to_int4_weights
from .onnx_graph import (constant_tensors, dequantize_linear_inputs, requantize_relu_outputs, set_opset,
                         simplify_constants, weight_key)
from .lowering import LoweredModel, is_converted_model, lower_qat_model
from .qdq import CLIP_MODES, DEFAULT_CLIP_MODE

__all__ = ["export_onnx", "decode_onnx_weights", "unpack_int4", "WEIGHT_FORMATS", "DEFAULT_OPSET",
           "INT4_OPSET", "TORCHSCRIPT_MAX_OPSET", "read_metadata"]

WEIGHT_FORMATS = ("int8", "int4", "fp32")
DEFAULT_OPSET = 17
INT4_OPSET = 21
MIN_OPSET = 13  # per-axis DequantizeLinear
TORCHSCRIPT_MAX_OPSET = 20
META_PREFIX = "qat_plugins."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")
        warnings.filterwarnings("ignore", message=r".*dynamo=False.*")
        warnings.filterwarnings("ignore", message=r".*TorchScript.*")
        yield


def _as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs \
            or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError("example_inputs must be a tensor or a non-empty tuple of tensors (a batch "
                        f"shaped like the model's input), got {type(example_inputs).__name__}")
    for t in example_inputs:
        if not t.is_floating_point():
            raise TypeError(f"example_inputs must be float tensors, got {t.dtype}")
        if t.dim() == 0 or t.shape[0] == 0:
            raise ValueError(f"example_inputs need a non-empty batch dimension, got shape {tuple(t.shape)}")
    return tuple(t.detach().float().cpu() for t in example_inputs)


def _resolve_opset(weight_format: str, opset: Any) -> int:
    if opset is None:
        return INT4_OPSET if weight_format == "int4" else DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int or None, got {opset!r}")
    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise ValueError(f"opset must be in {MIN_OPSET}..{max_opset} (per-channel DequantizeLinear "
                         f"needs >= {MIN_OPSET}), got {opset}")
    if weight_format == "int4" and opset < INT4_OPSET:
        raise ValueError(f"weight_format='int4' needs opset >= {INT4_OPSET} (INT4 DequantizeLinear), "
                         f"got opset={opset}; pass opset=None or {INT4_OPSET}")
    return opset


def _check_target(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"path {p} is a directory; pass a file path such as {p / 'model.onnx'}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise FileNotFoundError(f"directory {parent} does not exist; create it first "
                                f"(e.g. Path({str(parent)!r}).mkdir(parents=True))")
    if not parent.is_dir():
        raise NotADirectoryError(f"{parent} is not a directory, so {p.name} cannot be written there")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"cannot write to directory {parent} ({e.strerror or e}); choose a "
                              "writable location for the ONNX file") from None
    return p


def _outputs_of(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[str]:
    with torch.no_grad(), _quiet():
        try:
            out = module(*inputs)
        except Exception as e:  # noqa: BLE001 - any failure here is a wrong example input
            shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
            raise ValueError(
                f"the model cannot run on example_inputs of shape {shapes}: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}; pass a batch shaped like "
                "the model's training inputs, e.g. torch.zeros(1, 1, 8, 8) for 8x8 digits") from None
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return [f"output_{i}" for i in range(len(out))]
    raise TypeError(f"the model must return a tensor or a tuple of tensors, got {type(out).__name__}")


def _torch_export(lowered: LoweredModel, inputs: tuple[torch.Tensor, ...], opset: int) -> onnx.ModelProto:
    input_names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    output_names = _outputs_of(lowered.module, inputs)
    dynamic_axes = {n: {0: "batch"} for n in input_names + output_names}
    buf = io.BytesIO()
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(lowered.module, inputs, buf, dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, do_constant_folding=True,
                              training=torch.onnx.TrainingMode.EVAL)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise RuntimeError(
            f"torch.onnx.export (TorchScript exporter) failed on the lowered QAT model: "
            f"{type(e).__name__}: {msg}. Check that example_inputs match the model's input and that "
            "the model's forward is traceable (no data-dependent Python control flow)") from None
    return onnx.load_from_string(buf.getvalue())


def export_onnx(model: nn.Module, path: str | os.PathLike[str], example_inputs: torch.Tensor | Sequence[torch.Tensor],
                *, weight_format: str = "int8", opset: int | None = None,
                clip_mode: str = DEFAULT_CLIP_MODE, int8_weight_type: str = "auto",
                requantize_relu: bool = True) -> Path:
    """Write a QDQ ONNX model of a QAT model and return its path.

    Args:
        model: a torch.ao QAT model from :func:`qat_plugins.prepare_qat` (``mode="eager"`` or
            ``"fx"``) whose fake quantizers have seen at least one batch. The model is not
            modified (a deep copy in eval mode is exported). An NNCF QAT model
            (:func:`qat_plugins.integrations.nncf.is_nncf_model`) is handed to
            :func:`~qat_plugins.integrations.nncf.export_nncf_onnx` (``weight_format`` ``"int8"`` /
            ``"int4"``; ``opset``, ``clip_mode``, ``int8_weight_type``, ``requantize_relu`` do not apply).
        path: the ``.onnx`` file to write (parent directory must exist); written atomically.
        example_inputs: a batch (tensor or tuple of tensors) shaped like the model's input; the
            batch axis is exported as dynamic.
        weight_format: ``"int8"`` (INT8 weights + QDQ activations), ``"int4"`` (weights of <= 4-bit
            quantizers as packed INT4, opset 21; wider weights stay INT8) or ``"fp32"`` (all
            quantization stripped: the float reference).
        opset: ONNX opset; default 17 (``int8``/``fp32``) or 21 (``int4``, also the minimum there).
        clip_mode: where the clamp of sub-8-bit activation grids goes: ``"int"`` (integer ``Clip``
            between Q and DQ, default, keeps ORT fusion), ``"before"`` / ``"after"`` (float Clip).
        int8_weight_type: storage of weights kept at 8 bit: ``"auto"`` (default) stores full 8-bit
            signed grids as UINT8 with zero point + 128 (same values; ORT's U8U8 kernels, no int16
            saturation on x86 without VNNI) and narrower grids as INT8; ``"int8"`` forces INT8
            (symmetric signed weights, e.g. for VNNI/ARM CPUs or other runtimes); ``"uint8"``
            forces UINT8.
        requantize_relu: add a value-preserving Q/DQ after a float ``Relu`` that follows a
            ``DequantizeLinear`` (eager models apply ReLU after the quantized residual add), so
            the next conv is fused by ORT.

    Raises:
        TypeError / ValueError: not a model, not a QAT model (no fake quantizers), uninitialised
            quantizers, unsupported ``weight_format`` / ``opset`` / layer type, example inputs the
            model cannot run on, a model already converted to quantized kernels.
        FileNotFoundError / NotADirectoryError / PermissionError: the target directory is missing,
            not a directory or not writable.
        RuntimeError: the exporter itself failed (message says why).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a QAT model from qat_plugins.prepare_qat), "
                        f"got {type(model).__name__}")
    from ..integrations.nncf import export_nncf_onnx, is_nncf_model  # does not import NNCF itself

    if is_nncf_model(model):  # NNCF QAT model: NNCF's strip + QDQ export (int8 / int4; opset 20 / 21)
        return export_nncf_onnx(model, _check_target(path), _as_inputs(example_inputs), weight_format=weight_format)
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"unsupported weight_format {weight_format!r}; choose one of {WEIGHT_FORMATS}")
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"unsupported clip_mode {clip_mode!r}; choose one of {CLIP_MODES}")
    target_opset = _resolve_opset(weight_format, opset)
    inputs = _as_inputs(example_inputs)
    p = _check_target(path)
    if is_converted_model(model):
        raise ValueError(
            "this model was already converted to quantized kernels (torch.ao convert / convert_fx); "
            "its sub-8-bit grids and fake-quant numerics are no longer recoverable: export the "
            "prepared (fake-quant) model instead, i.e. the model returned by qat_plugins.prepare_qat "
            "after training")

    with _quiet():
        lowered = lower_qat_model(model, weight_format, clip_mode=clip_mode, int8_weight_type=int8_weight_type)
    if weight_format != "fp32" and not lowered.weights:
        # e.g. PT2E models (torchao prepare_qat_pt2e) or custom layers: the weight quantizers are
        # not torch.ao ``weight_fake_quant`` modules of Conv/Linear layers, so they were lowered
        # like activation quantizers (float weight -> Q -> DQ: right values, float storage)
        if weight_format == "int4":
            raise ValueError(
                f"weight_format='int4' needs QAT Conv/Linear layers with a weight_fake_quant (eager or FX "
                f"prepare_qat); {type(model).__name__} quantizes its weights some other way (a PT2E "
                "model?), so they cannot be stored as INT4; use weight_format='int8' or prepare the "
                "model with mode='eager' or 'fx'")
        warnings.warn(
            f"{type(model).__name__} has no QAT Conv/Linear layers with a weight_fake_quant (a PT2E "
            "model?): its weights are exported as float initializers followed by QuantizeLinear/"
            "DequantizeLinear (same values, no integer storage) and fused BatchNorm stays unfolded; "
            "prepare with mode='eager' or 'fx' for integer weights", stacklevel=2)
    int4_names: list[str] = []
    if weight_format == "int4":
        for w in lowered.weights:
            if w.bits is not None and w.bits <= 4 and not w.int4_eligible:
                raise ValueError(
                    f"layer '{w.name}' ({w.layer_type}) has a {w.bits}-bit weight grid ({w.quant_min}, "
                    f"{w.quant_max}) that fits neither INT4 [-8, 7] nor UINT4 [0, 15], so it cannot be "
                    "stored as INT4; use weight_format='int8' or a symmetric/unsigned weight grid")
        int4_names = [w.name for w in lowered.weights if w.int4_eligible]
        if not int4_names:
            warnings.warn("weight_format='int4' but no weight quantizer has <= 4 bits; all weights "
                          "are stored as INT8 (prepare the model with weight_bits <= 4)", stacklevel=2)

    proto = _torch_export(lowered, inputs, min(target_opset, TORCHSCRIPT_MAX_OPSET))
    proto = simplify_constants(set_opset(proto, target_opset))
    if requantize_relu and weight_format != "fp32":
        requantize_relu_outputs(proto)
    if int4_names:
        done = to_int4_weights(proto, {w.name: w.offset for w in lowered.weights if w.name in int4_names})
        missing = sorted(set(int4_names) - set(done))
        if missing:
            raise RuntimeError(f"internal error: INT4 weights not found in the exported graph for {missing}")
    _add_metadata(proto, weight_format, lowered, int4_names)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise RuntimeError(f"the exported ONNX model failed onnx.checker: {e}") from None
    atomic_write_bytes(p, proto.SerializeToString())
    return p


def _add_metadata(proto: onnx.ModelProto, weight_format: str, lowered: LoweredModel,
                  int4_names: list[str]) -> None:
    bits = sorted({w.bits for w in lowered.weights if w.bits is not None})
    meta = {
        "weight_format": weight_format,
        "weight_bits": ",".join(map(str, bits)),
        "int4_layers": ",".join(int4_names),
        "uint8_offset_layers": ",".join(w.name for w in lowered.weights if w.offset and w.name not in int4_names),
        "activation_quantizers": str(lowered.num_activation_quantizers),
    }
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + k, v
    proto.producer_name = "qat_plugins"


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """``qat_plugins.*`` metadata written by :func:`export_onnx` (without the prefix)."""
    m = onnx.load(str(path), load_external_data=False)
    return {p.key[len(META_PREFIX):]: p.value for p in m.metadata_props if p.key.startswith(META_PREFIX)}


def _load_onnx(p: Path) -> onnx.ModelProto:
    """``onnx.load`` with errors that name the file (missing, or not an ONNX model)."""
    if not p.is_file():
        raise FileNotFoundError(f"ONNX file {p} does not exist")
    try:
        return onnx.load(str(p))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{p} is not a readable ONNX model ({type(e).__name__}: {e})") from None


def decode_onnx_weights(path: str | os.PathLike[str], *, dequantize: bool = False) -> dict[str, np.ndarray]:
    """Integer weights of a QDQ ONNX file, by module path (e.g. ``"layer1.conv1"``).

    Every ``DequantizeLinear`` whose data input is a constant INT8/UINT8/INT4/UINT4 tensor counts as
    a weight. Values are decoded with ``onnx.numpy_helper.to_array`` and returned on the
    quantizer's own integer grid as ``int8`` (signed grids; the +128 shift of 8-bit weights stored
    as UINT8 is undone) or ``uint8`` arrays, INT4 included. With ``dequantize=True`` the float32 weights
    ``(q - zero_point) * scale`` are returned instead, computed as ``DequantizeLinear`` does.
    """
    p = Path(path)
    model = _load_onnx(p)
    consts = constant_tensors(model.graph)
    meta = {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
    shifted = set(filter(None, meta.get("uint8_offset_layers", "").split(",")))
    out: dict[str, np.ndarray] = {}
    for node, wt in dequantize_linear_inputs(model.graph):
        key = weight_key(node.input[0])
        off = 128 if key in shifted and wt.data_type == onnx.TensorProto.UINT8 else 0
        q16 = numpy_helper.to_array(wt).astype(np.int16) - off
        signed = off != 0 or wt.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)
        q = q16.astype(np.int8 if signed else np.uint8)
        if not dequantize:
            out[key] = q
            continue
        scale = numpy_helper.to_array(consts[node.input[1]]).astype(np.float32)
        zp = (numpy_helper.to_array(consts[node.input[2]]).astype(np.float32) - off
              if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1:
            shape = [1] * q.ndim
            shape[axis % q.ndim] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        out[key] = ((q.astype(np.float32) - zp) * scale).astype(np.float32)
    return out



def unpack_int4(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write a copy of an INT4 export with its INT4 weights widened to INT8 (same values).

    ONNX Runtime's CPU provider runs INT4 ``DequantizeLinear`` weights as ``DequantizeLinear`` +
    float ``Conv`` on every call; the widened copy gets the fused ``QLinearConv`` / ``QGemm``
    kernels of an INT8 export back (4-bit weight values cannot trigger the U8S8 saturation issue).
    Ship the small INT4 file, unpack it where it is deployed.
    """
    s = Path(src)
    model = _load_onnx(s)
    int4_weights_to_int8(model)
    for entry in model.metadata_props:
        if entry.key == META_PREFIX + "weight_format" and entry.value == "int4":
            entry.value = "int4-unpacked"
    onnx.checker.check_model(model)
    d = _check_target(dst)
    atomic_write_bytes(d, model.SerializeToString())
    return d
