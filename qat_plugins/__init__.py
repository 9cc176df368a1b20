"""qat_plugins: regularizers that push low-bit quantization-aware training toward full precision.

Quantize with torch.ao (eager / FX), torchao PT2E or NNCF, attach a regularizer, train, export to
ONNX and validate in ONNX Runtime::

    import qat_plugins as qp
    qat = qp.prepare_qat(model, weight_bits=4, act_bits=4)
    with qp.attach(qat, [qp.ConsistencyRegularizer()]) as regs:
        out = qat(x)
        loss = F.cross_entropy(out, y) + regs.loss(x, y, out)
    qp.export_onnx(qat, "model.onnx", (x[:1],), weight_format="int8")
    print(qp.validate_onnx("model.onnx", qat, test_loader).to_dict())
"""

from .export import ValidationReport, compare_formats, export_onnx, validate_onnx
from .quant import LSQFakeQuantize, MinMaxFakeQuantize, prepare_qat, qconfig, qconfig_mapping, snap_biases
from .regularizers import (
    BlockReplacementRegularizer,
    ConsistencyRegularizer,
    FeaturePerturbationRegularizer,
    KnowledgeDistillationRegularizer,
    NonFiniteLossError,
    Regularizer,
    RegularizerSet,
    attach,
    build_regularizers,
)
from .training.bn import BNSchedule, freeze_bn_stats, reestimate_bn_stats, unfreeze_bn_stats

__version__ = "0.1.0"

from . import integrations  # noqa: E402 - plugins register their quantizer finders / exporters (no NNCF import)

__all__ = [
    "prepare_qat", "qconfig", "qconfig_mapping", "LSQFakeQuantize", "MinMaxFakeQuantize", "snap_biases",
    "Regularizer", "RegularizerSet", "attach", "build_regularizers", "NonFiniteLossError",
    "ConsistencyRegularizer", "FeaturePerturbationRegularizer", "BlockReplacementRegularizer",
    "KnowledgeDistillationRegularizer",
    "export_onnx", "validate_onnx", "compare_formats", "ValidationReport",
    "BNSchedule", "freeze_bn_stats", "unfreeze_bn_stats", "reestimate_bn_stats",
    "__version__",
]
