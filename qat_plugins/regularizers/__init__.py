"""The QAT regularizers (CR, FPQ, BR and the KD baseline), their protocol and the config registry."""

from .base import NonFiniteLossError, Regularizer, RegularizerSet, StepContext, attach
from .block_replacement import BlockReplacementRegularizer
from .consistency import ConsistencyRegularizer
from .feature_perturbation import FeaturePerturbationRegularizer
from .kd import KnowledgeDistillationRegularizer
from .options import OptionError
from .registry import REGISTRY, build_regularizer, build_regularizers, register

__all__ = [
    "Regularizer", "RegularizerSet", "StepContext", "attach", "NonFiniteLossError",
    "ConsistencyRegularizer", "FeaturePerturbationRegularizer", "BlockReplacementRegularizer",
    "KnowledgeDistillationRegularizer", "OptionError",
    "REGISTRY", "build_regularizer", "build_regularizers", "register",
]
