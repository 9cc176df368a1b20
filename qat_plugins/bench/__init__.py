"""Benchmarks: LSQ QAT vs +KD / +CR / +FPQ / +BR / CR+FPQ+BR vs NNCF QAT, with cost and deployment columns.

* :mod:`~qat_plugins.bench.settings` -- presets (full / quick / tiny), methods, training configs.
* :mod:`~qat_plugins.bench.runner` -- data, cached FP models, one QAT run (incl. NNCF), ONNX Runtime
  deployment checks.
* :mod:`~qat_plugins.bench.timing` -- interleaved training-step time and peak-memory micro-benchmark.
* :mod:`~qat_plugins.bench.report` -- paired differences vs LSQ with 95 % CIs, targets, tables, plots.
* :mod:`~qat_plugins.bench.main` -- ``qat-plugins bench`` (:func:`main`), resumable, ``--plan``.
* :mod:`~qat_plugins.bench.bn_study` -- the BatchNorm study behind docs/bn.md.
"""

from .main import main

__all__ = ["main"]
