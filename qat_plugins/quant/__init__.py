"""Low-bit fake quantization for torch.ao QAT: quantizers, QConfigs and ``prepare_qat``."""

from .bias import BiasSnap, snap_biases
from .fake_quantize import LSQFakeQuantize, MinMaxFakeQuantize, fake_quantize, quant_range
from .prepare import MODES, prepare_qat, quantizable_layers
from .qconfig import qconfig, qconfig_mapping

__all__ = ["LSQFakeQuantize", "MinMaxFakeQuantize", "fake_quantize", "quant_range", "qconfig", "qconfig_mapping",
           "prepare_qat", "quantizable_layers", "MODES", "snap_biases", "BiasSnap"]
