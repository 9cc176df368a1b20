"""Benchmarks: LSQ QAT vs +CR / +FPQ / +BR / a combination vs NNCF QAT, with cost and deployment columns.

* :mod:`~qat_plugins.bench.settings` -- presets (full / quick / tiny), methods, training configs.
* :mod:`~qat_plugins.bench.runner` -- data, cached FP models, one QAT run (incl. NNCF), ONNX Runtime
  deployment checks.
* :mod:`~qat_plugins.bench.timing` -- interleaved training-step time and peak-memory micro-benchmark.
* :mod:`~qat_plugins.bench.report` -- aggregation, Markdown tables, accuracy-vs-bits plots.
* :mod:`~qat_plugins.bench.main` -- ``qat-plugins bench`` (:func:`main`).
"""

from .main import main

__all__ = ["main"]
