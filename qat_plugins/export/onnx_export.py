"""Export a QAT model (eager, FX or PT2E) to a QDQ ONNX model, plus the exporter table hook.

Pipeline: :func:`~qat_plugins.export.lowering.lower_qat_model` (copy in eval mode, fake quantizers ->
QDQ modules, BatchNorm folded) -> ``torch.onnx.export(..., dynamo=False)`` -> ``onnx`` post-processing
(constants, opset, INT4 packing, metadata, checker) -> atomic write. Graph form, numerics and the
storage choices (INT8 weights, INT4, sub-8-bit clamps) are explained in ``docs/onnx_export.md``.
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
from .onnx_graph import (clip_on_grid, constant_tensors, dequantize_linear_inputs, requantize_relu_outputs, set_opset,
                         simplify_constants, weight_key)
from .lowering import LoweredModel, is_converted_model, lower_qat_model
from .qdq import CLIP_MODES, DEFAULT_CLIP_MODE
from .registry import find_exporter

__all__ = ["export_onnx", "decode_onnx_weights", "grid_factors", "unpack_int4", "WEIGHT_FORMATS", "DEFAULT_OPSET",
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
                clip_mode: str = DEFAULT_CLIP_MODE, int8_weight_type: str = "int8",
                requantize_relu: bool = True, refine_weight_grid: bool = True, **options: Any) -> Path:
    """Write a QDQ ONNX model of a QAT model and return its path.

    Args:
        model: a torch.ao QAT model from :func:`qat_plugins.prepare_qat` (``mode="eager"`` or
            ``"fx"``) whose fake quantizers have seen at least one batch. The model is not
            modified (a deep copy in eval mode is exported). A model that a registered exporter
            applies to (:func:`~qat_plugins.export.registry.register_exporter`, e.g. NNCF QAT models
            once ``qat_plugins.integrations`` is imported) is handed to that exporter with
            ``weight_format`` and ``**options``; ``opset``, ``clip_mode``, ``int8_weight_type`` and
            ``requantize_relu`` belong to the built-in path.
        path: the ``.onnx`` file to write (parent directory must exist); written atomically.
        example_inputs: a batch (tensor or tuple of tensors) shaped like the model's input; the
            batch axis is exported as dynamic.
        weight_format: ``"int8"`` (INT8 weights + QDQ activations), ``"int4"`` (weights of <= 4-bit
            quantizers as packed INT4, opset 21; wider weights stay INT8) or ``"fp32"`` (all
            quantization stripped: the float reference).
        opset: ONNX opset; default 17 (``int8``/``fp32``) or 21 (``int4``, also the minimum there).
        clip_mode: where the clamp of sub-8-bit activation grids goes: ``"int"`` (integer ``Clip``
            between Q and DQ, default, keeps ORT fusion), ``"before"`` / ``"after"`` (float Clip).
        int8_weight_type: integer storage of the weights: ``"int8"`` (default, alias ``"s8"``):
            signed INT8, zero point 0 -- ORT's fast U8S8 kernels (VNNI / AVX-512 / ARM);
            ``"uint8"`` (``"u8"``): UINT8 with zero point +128 (same values; ORT's U8U8 kernels,
            about FP32 speed); ``"auto"``: UINT8 only for full 8-bit grids. For x86 CPUs without
            VNNI, where U8S8 kernels saturate an int16 sum for |w| > 64, prefer training with
            ``prepare_qat(..., reduce_range=True)`` (7-bit weights, INT8 storage, fast) over
            ``"uint8"``/``"auto"``.
        refine_weight_grid: store weight grids of fewer than 8 bits as ``q * 2^k`` with scale
            ``s / 2^k`` (same values; ``2^k`` the largest factor that fits INT8, ``|q| <= 64`` for
            models trained with ``reduce_range``): ORT's integer kernels add the bias as int32 at
            scale ``s_in * s_weight``, so it is ``2^k`` times more exact (W4: 16x). INT4-packed layers
            keep their grid (:func:`unpack_int4` / :func:`~qat_plugins.export.ort_session` refine
            them when widening).
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
    plugin = find_exporter(model)
    if plugin is not None:  # e.g. NNCF QAT models: the integration registered its own exporter
        return plugin.export(model, _check_target(path), _as_inputs(example_inputs), weight_format=weight_format,
                             **options)
    if options:
        raise TypeError(f"export_onnx() got unexpected keyword arguments {sorted(options)} (extra options "
                        "are passed only to a registered exporter, see qat_plugins.export.register_exporter)")
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
        lowered = lower_qat_model(model, weight_format, clip_mode=clip_mode, int8_weight_type=int8_weight_type,
                                  refine_weight_grid=refine_weight_grid)
    if weight_format != "fp32" and not lowered.weights:
        # custom layers whose weight quantizers are neither torch.ao ``weight_fake_quant`` modules of
        # Conv/Linear layers nor PT2E weight quantizers: lowered like activations (float weight -> Q -> DQ)
        if weight_format == "int4":
            raise ValueError(
                f"weight_format='int4' needs QAT Conv/Linear layers (eager / FX prepare_qat) or a PT2E model "
                f"whose conv/linear weights pass a fake quantizer; {type(model).__name__} quantizes its weights "
                "some other way, so they cannot be stored as INT4; use weight_format='int8'")
        warnings.warn(
            f"{type(model).__name__} has no QAT Conv/Linear layers with a weight fake quantizer: its weights "
            "are exported as float initializers followed by QuantizeLinear/DequantizeLinear (same values, no "
            "integer storage)", stacklevel=2)
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
        clip_on_grid(proto)
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
        "weight_grid_factors": ",".join(f"{w.name}:{w.factor}" for w in lowered.weights if w.factor > 1),
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


def grid_factors(meta: dict[str, str]) -> dict[str, int]:
    """``{layer: factor}`` of the weights stored on a refined grid (``q * factor``, scale ``/ factor``)."""
    out = {}
    for item in filter(None, meta.get("weight_grid_factors", "").split(",")):
        name, _, k = item.rpartition(":")
        out[name] = int(k)
    return out


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
    factors = grid_factors(meta)
    out: dict[str, np.ndarray] = {}
    for node, wt in dequantize_linear_inputs(model.graph):
        key = weight_key(node.input[0])
        off = 128 if key in shifted and wt.data_type == onnx.TensorProto.UINT8 else 0
        q16 = numpy_helper.to_array(wt).astype(np.int16) - off
        signed = off != 0 or wt.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)
        q = q16.astype(np.int8 if signed else np.uint8)
        if not dequantize:
            out[key] = (q16 // factors.get(key, 1)).astype(q.dtype)  # the quantizer's own grid
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



def unpack_int4(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, factor: int = 16) -> Path:
    """Write a copy of an INT4 export with its INT4 weights widened to INT8 (same values).

    ``factor`` (a power of two, at most 16) stores them as ``q * factor`` with scale ``/ factor``
    (same values, a more exact int32 bias in ORT's kernels, see :func:`export_onnx`); pass 8 (or 1)
    for x86 CPUs without VNNI, whose U8S8 kernels need ``|q| <= 64``.

    ONNX Runtime's CPU provider runs INT4 ``DequantizeLinear`` weights as ``DequantizeLinear`` +
    float ``Conv`` on every call; the widened copy gets the fused ``QLinearConv`` / ``QGemm``
    kernels of an INT8 export back (4-bit weight values cannot trigger the U8S8 saturation issue).
    Ship the small INT4 file, unpack it where it is deployed.
    """
    s = Path(src)
    model = _load_onnx(s)
    widened = int4_weights_to_int8(model, factor=factor)
    meta = {e.key: e for e in model.metadata_props}
    for entry in model.metadata_props:
        if entry.key == META_PREFIX + "weight_format" and entry.value == "int4":
            entry.value = "int4-unpacked"
    if factor > 1 and widened:
        key = META_PREFIX + "weight_grid_factors"
        entry = meta.get(key) or model.metadata_props.add()
        entry.key = key
        entry.value = ",".join(filter(None, [entry.value] + [f"{n}:{factor}" for n in widened]))
    onnx.checker.check_model(model)
    d = _check_target(dst)
    atomic_write_bytes(d, model.SerializeToString())
    return d
