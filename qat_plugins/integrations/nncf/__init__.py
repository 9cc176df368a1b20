"""QAT with NNCF 3.4 (``pip install 'qat-plugins[nncf]'``) as a plugin: prepare, checkpoint, export, config.

Importing this package never imports NNCF (each function that needs it does); it registers NNCF's
quantizer finder (``qat_plugins.quant.step_size``) and exporter (``qat_plugins.export``). See docs/nncf.md.
"""

from ...export.registry import register_exporter
from ...quant.bias import register_bias_snapper
from ...quant.step_size import register_quantizer_finder
from ._compat import (HOOKS_ATTR, INSTALL_HINT, SUPPORTED_BITS, SequentialWrapper, has_nncf_quantizers,
                      is_nncf_model)
from .checkpoint import (CHECKPOINT_FORMAT, load_checkpoint, nncf_model_config, rebuild_from_nncf_config,
                         save_checkpoint)
from .config import EXPORT_FORMATS, TRAIN_FIELDS, NNCFQATSetup, from_config, validate_config
from .export import EXPORTER_NAME, export_nncf_onnx, snap_nncf_biases, to_fake_quant_model
from .prepare import make_ignored_scope, prepare_qat
from .quantizers import (NNCFQuantizerFinder, QuantizerInfo, input_quantizer_map, install_lsq_grad_scale,
                         nncf_module_names, nncf_quantizers, output_quantizer_map, refit_activation_ranges, resolve,
                         set_quantizer_bits)
from .run import NNCF_CHECKPOINT_NAME, run_config, train_config

__all__ = [
    "prepare_qat", "is_nncf_model", "nncf_quantizers", "QuantizerInfo", "nncf_module_names", "resolve",
    "SequentialWrapper", "set_quantizer_bits", "refit_activation_ranges", "save_checkpoint", "load_checkpoint",
    "export_nncf_onnx", "to_fake_quant_model", "snap_nncf_biases", "make_ignored_scope", "nncf_model_config",
    "rebuild_from_nncf_config", "from_config", "validate_config", "NNCFQATSetup", "run_config", "train_config",
    "NNCFQuantizerFinder", "install_lsq_grad_scale", "input_quantizer_map", "output_quantizer_map",
    "INSTALL_HINT", "SUPPORTED_BITS", "HOOKS_ATTR", "CHECKPOINT_FORMAT",
    "NNCF_CHECKPOINT_NAME", "TRAIN_FIELDS", "EXPORT_FORMATS", "EXPORTER_NAME",
]

register_quantizer_finder(NNCFQuantizerFinder())
register_exporter(EXPORTER_NAME, has_nncf_quantizers, export_nncf_onnx)
register_bias_snapper(has_nncf_quantizers, snap_nncf_biases)
