"""ONNX export of QAT models as QDQ graphs (INT8 / INT4 weights) and ONNX Runtime validation.

* :func:`export_onnx` -- a ``qat_plugins.prepare_qat`` model (eager or FX) to a QDQ ONNX file.
* :func:`validate_onnx` -- ONNX Runtime vs PyTorch on a dataset: top-1, agreement, max difference,
  size, latency, fused operator types.
* :func:`compare_formats` / :func:`format_table` -- FP32 vs INT8 vs INT4 side by side.
* :func:`decode_onnx_weights` -- the integer (or dequantized) weights stored in an ONNX file.
* :func:`unpack_int4` -- widen an INT4 file's weights to INT8 (ORT's CPU kernels fuse only those).

See :mod:`qat_plugins.export.onnx_export` for the graph form, the INT4 choice and the clamp of
sub-8-bit activation grids.
"""

from .lowering import lower_qat_model
from .onnx_export import WEIGHT_FORMATS, decode_onnx_weights, export_onnx, read_metadata, unpack_int4
from .validate import ValidationReport, compare_formats, format_table, validate_onnx

__all__ = ["export_onnx", "validate_onnx", "compare_formats", "format_table", "decode_onnx_weights",
           "read_metadata", "unpack_int4", "ValidationReport", "WEIGHT_FORMATS", "lower_qat_model"]
