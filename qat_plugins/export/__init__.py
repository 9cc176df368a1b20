"""ONNX export of QAT models as QDQ graphs (INT8 / INT4 weights) and ONNX Runtime validation.

* :func:`export_onnx` -- a ``qat_plugins.prepare_qat`` model (eager or FX) to a QDQ ONNX file.
* :func:`validate_onnx` -- ONNX Runtime vs PyTorch on a dataset: top-1, agreement, max difference,
  size, latency, fused operator types.
* :func:`compare_formats` / :func:`format_table` -- FP32 vs INT8 vs INT4 side by side.
* :func:`decode_onnx_weights` -- the integer (or dequantized) weights stored in an ONNX file.
* :func:`unpack_int4` -- widen an INT4 file's weights to INT8 (ORT's CPU kernels fuse only those).
* :func:`register_exporter` -- the exporter table integrations (NNCF) plug into.

See :mod:`qat_plugins.export.onnx_export` for the graph form, the INT4 choice and the clamp of
sub-8-bit activation grids.
"""

from .int4 import int4_weights_to_int8, pack_int4_tensor, to_int4_weights
from .lowering import lower_qat_model
from .registry import register_exporter, registered_exporters, unregister_exporter
from .onnx_export import WEIGHT_FORMATS, decode_onnx_weights, export_onnx, read_metadata, unpack_int4
from .layerwise import LayerComparison, compare_layers
from .validate import ValidationReport, compare_formats, cpu_info, format_table, ort_session, validate_onnx

__all__ = ["export_onnx", "validate_onnx", "compare_formats", "format_table", "decode_onnx_weights",
           "read_metadata", "unpack_int4", "ValidationReport", "WEIGHT_FORMATS", "lower_qat_model",
           "register_exporter", "unregister_exporter", "registered_exporters",
           "pack_int4_tensor", "to_int4_weights", "int4_weights_to_int8",
           "compare_layers", "LayerComparison", "cpu_info", "ort_session"]
