"""``prepare_qat`` for NNCF: ``nncf.quantize`` at 8 bit, then the target widths with re-fitted ranges.

NNCF's CPU/ANY hardware config only admits 8-bit quantizers, so widths 2..7 are set on the inserted
quantizers afterwards; weight and activation ranges are re-fitted at the target width (docs/nncf.md).
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ...quant.prepare import quantizable_layers
from ._compat import check_bits, is_nncf_model, require_nncf, wrap_sequential
from .quantizers import (QuantizerInfo, input_quantizer_map, install_lsq_grad_scale, nncf_graph,
                         nncf_module_names, nncf_quantizers, op_module_name, output_quantizer_map,
                         refit_activation_ranges, resolve, set_quantizer_bits)

__all__ = ["prepare_qat", "make_ignored_scope", "calibration_items", "model_inputs", "DEFAULT_SUBSET"]

DEFAULT_SUBSET = 300  # nncf.quantize's default subset_size
_CALIB_BATCH = 32  # batch size used when calibration data is a per-sample Dataset (project choice)
_LEGACY_SCOPE = re.compile(r"\[([^\]]+)\]")


def model_inputs(item: Any) -> Any:
    """nncf.Dataset transform: the model inputs of one calibration item (``x`` of ``(x, y)``)."""
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item:
        return item[0]
    raise TypeError(
        f"calibration items must be (inputs, target) tuples/lists or input tensors, got {type(item).__name__}")


def _batch_size(x: Any) -> int | None:
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None


def calibration_items(data: Any, subset_size: int) -> list[Any]:
    """The first ``subset_size`` samples of ``data`` as a list of batches (the last one trimmed)."""
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size=_CALIB_BATCH, shuffle=False)
    if isinstance(data, (torch.Tensor, str, bytes, dict)) or not isinstance(data, Iterable):
        raise TypeError(
            "calibration_data must be an iterable of (inputs, target) batches, a DataLoader or a Dataset "
            f"(e.g. TensorDataset), got {type(data).__name__}")
    items: list[Any] = []
    seen = 0
    for item in data:
        x = model_inputs(item)
        n = _batch_size(x) or 1
        if seen + n > subset_size and isinstance(x, torch.Tensor) and n > 1:
            keep = subset_size - seen
            item = (x[:keep],) + tuple(item[1:]) if isinstance(item, (tuple, list)) else x[:keep]
            n = keep
        items.append(item)
        seen += n
        if seen >= subset_size:
            break
    if not items:
        raise ValueError("calibration_data is empty; pass at least one batch")
    return items


def make_ignored_scope(model: nn.Module, entries: Sequence[str], *, field: str = "ignored_scope") -> Any:
    """``nncf.IgnoredScope`` from module names and NNCF-style scope strings.

    ``"layer3.shortcut"`` (module) -> pattern ``^layer3/shortcut/``; ``"layer1/conv1/conv2d/0"`` (NNCF 3.x
    op) -> ``names``; ``"Net/BasicBlock[layer1]/Conv2d[conv1]/conv2d_0"`` (NNCF 2.x scope) -> module
    ``layer1.conv1``; ``"{re}layer[23]/.*"`` -> ``patterns``. ``ValueError`` names ``field[i]``.
    """
    nncf = require_nncf()
    if isinstance(entries, str) or not isinstance(entries, (list, tuple)):
        raise ValueError(f"{field}: must be a list of strings, got {type(entries).__name__}")
    mods = dict(model.named_modules())
    names: list[str] = []
    patterns: list[str] = []
    for i, e in enumerate(entries):
        path = f"{field}[{i}]"
        if not isinstance(e, str) or not e:
            raise ValueError(f"{path}: must be a non-empty string, got {e!r}")
        if e.startswith("{re}"):
            try:
                re.compile(e[4:])
            except re.error as err:
                raise ValueError(f"{path}: invalid regular expression {e[4:]!r}: {err}") from None
            patterns.append(e[4:])
            continue
        if "[" in e:  # NNCF 2.x scope: Model/Type[name]/Type[name]/op_0
            module = ".".join(_LEGACY_SCOPE.findall(e))
        elif "/" in e:
            if op_module_name(e) not in mods:
                raise ValueError(f"{path}: op name {e!r} belongs to no module of {type(model).__name__}")
            names.append(e)
            continue
        else:
            module = e
        if module not in mods or module == "":
            known = nncf_module_names(model)[:15]
            raise ValueError(f"{path}: no module {e!r} in {type(model).__name__}; modules include {known}")
        patterns.append("^" + re.escape(module.replace(".", "/")) + "/")
    return nncf.IgnoredScope(names=names, patterns=patterns)


def _target_device(nncf: Any, target_device: Any) -> Any:
    if target_device is None:
        return nncf.TargetDevice.ANY
    if isinstance(target_device, nncf.TargetDevice):
        td = target_device
    elif isinstance(target_device, str) and target_device.upper() in nncf.TargetDevice.__members__:
        td = nncf.TargetDevice[target_device.upper()]
    else:
        raise ValueError(f"target_device: must be one of ANY, CPU, GPU, NPU, got {target_device!r}")
    if td.name not in ("ANY", "CPU", "GPU", "NPU"):
        raise ValueError(f"target_device: {td.name} is not supported by NNCF's torch backend; use ANY, CPU, GPU or NPU")
    return td


def _preset(nncf: Any, preset: Any) -> Any:
    if preset is None or isinstance(preset, nncf.QuantizationPreset):
        return preset
    if isinstance(preset, str) and preset.lower() in ("performance", "mixed"):
        return nncf.QuantizationPreset(preset.lower())
    raise ValueError(f"preset: must be 'performance' or 'mixed', got {preset!r}")


def _merge_advanced(options: dict[str, Any], low_bits: bool, batch: int | None) -> None:
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix  # noqa: PLC0415

    adv = options.get("advanced_parameters")
    if adv is None:
        adv = AdvancedQuantizationParameters()
    elif not isinstance(adv, AdvancedQuantizationParameters):
        raise TypeError(f"advanced_parameters must be nncf AdvancedQuantizationParameters, got {type(adv).__name__}")
    else:
        adv = copy.deepcopy(adv)
    for group in ("weights", "activations"):
        qp = getattr(adv, f"{group}_quantization_params")
        if qp is not None and getattr(qp, "num_bits", None) not in (None, 8):
            raise ValueError(
                f"advanced_parameters.{group}_quantization_params.num_bits={qp.num_bits}: NNCF's CPU/ANY hardware "
                f"config only allows 8 bit there; pass {'weight_bits' if group == 'weights' else 'act_bits'}= instead")
    if low_bits and adv.overflow_fix is None:
        adv.overflow_fix = OverflowFix.DISABLE  # as NNCF does itself for non-A8W8 schemes
    if adv.batchwise_statistics is None and batch is not None and batch > 1:
        adv.batchwise_statistics = True  # what nncf.Dataset(DataLoader) would get
    options["advanced_parameters"] = adv


def prepare_qat(
    model: nn.Module,
    calibration_data: Any,
    *,
    weight_bits: int = 8,
    act_bits: int = 8,
    preset: Any = None,
    ignored_scope: Any = None,
    target_device: Any = None,
    subset_size: int | None = None,
    example_input: Any = None,
    keep_first_last_8bit: bool = True,
    refit_activations: bool = True,
    lsq_grad_scale: bool = True,
    **nncf_options: Any,
) -> nn.Module:
    """``nncf.quantize`` a copy of ``model`` and set its fake quantizers to the requested widths.

    Args:
        model: a float ``nn.Module`` (left unchanged); a top-level ``nn.Sequential`` is wrapped in
            :class:`SequentialWrapper` (with a ``UserWarning``), names stay "0", "1", ...
        calibration_data: ``(inputs, target)`` batches (or input tensors), a ``DataLoader`` or a
            per-sample ``Dataset`` (batched by 32), wrapped in ``nncf.Dataset``.
        weight_bits, act_bits: 2..8 (default 8, NNCF's own width).
        preset: ``"performance"`` (symmetric) / ``"mixed"`` (asymmetric activations); default NNCF's choice.
        ignored_scope: ``nncf.IgnoredScope`` or module names / NNCF scope strings (:func:`make_ignored_scope`).
        target_device: ``"ANY"`` (default), ``"CPU"``, ``"GPU"``, ``"NPU"`` or ``nncf.TargetDevice``.
        subset_size: number of calibration samples (default 300, NNCF's default).
        example_input: a batch to trace the graph (default: the first calibration batch).
        keep_first_last_8bit: first/last conv or linear keep 8-bit weights and inputs, and the first
            layer its output quantizer, as the torch.ao path does (default true, paper).
        refit_activations: below 8 bit, re-fit activation ranges by MSE on the calibration activations
            captured at the target widths (default true, project choice).
        lsq_grad_scale: scale the quantizers' range gradients as LSQ does (default true, project choice).
        **nncf_options: passed to ``nncf.quantize`` (``model_type``, ``advanced_parameters``, ...).

    Returns:
        the quantized model (same class, same module names) in train mode.
    """
    nncf = require_nncf()
    check_bits(weight_bits, "weight_bits")
    check_bits(act_bits, "act_bits")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_nncf_model(model):
        raise ValueError("model already carries NNCF quantizers; pass the float model")
    if subset_size is None:
        subset_size = DEFAULT_SUBSET
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 1:
        raise ValueError(f"subset_size: must be a positive int, got {subset_size!r}")
    if "mode" in nncf_options:
        raise ValueError("nncf.quantize(mode=...) (FP8 etc.) is not supported by NNCF's torch backend")
    nncf_preset, device = _preset(nncf, preset), _target_device(nncf, target_device)
    model = wrap_sequential(model, warn=True)
    items = calibration_items(calibration_data, subset_size)
    first = model_inputs(items[0])
    example = first if example_input is None else example_input
    low_bits = weight_bits < 8 or act_bits < 8
    options = dict(nncf_options)
    _merge_advanced(options, low_bits, _batch_size(first))
    scope = ignored_scope
    if scope is not None and not isinstance(scope, nncf.IgnoredScope):
        scope = make_ignored_scope(model, scope)
    layers = quantizable_layers(model) if keep_first_last_8bit and low_bits else []
    keep8 = [layers[0], layers[-1]] if layers else []

    was_training = model.training
    model.eval()
    try:
        qmodel = nncf.quantize(model, nncf.Dataset(items, model_inputs), preset=nncf_preset, target_device=device,
                               subset_size=len(items), ignored_scope=scope, **options)
    finally:
        model.train(was_training)
    graph = nncf_graph(qmodel, example)  # traced once for both maps
    inputs = input_quantizer_map(qmodel, example, graph=graph)
    if low_bits:
        first_out = output_quantizer_map(qmodel, example, graph=graph).get(keep8[0], []) if keep8 else []
        acts = _apply_bits(qmodel, inputs, weight_bits, act_bits, keep8, first_out)
        if refit_activations and acts:
            refit_activation_ranges(qmodel, [model_inputs(it) for it in items], acts)
    if lsq_grad_scale:
        install_lsq_grad_scale(qmodel)
    return qmodel.train()


def _apply_bits(qmodel: nn.Module, inputs: dict[str, str], weight_bits: int, act_bits: int,
                keep8: list[str], first_out: list[str]) -> list[QuantizerInfo]:
    """Set the widths (weights re-fitted); returns the activation quantizers now below 8 bit."""
    quantizers = nncf_quantizers(qmodel)
    keep: set[str] = set(first_out)
    for layer in keep8:
        for qi in quantizers:
            if qi.kind == "weight" and qi.module_name == layer:
                keep.add(qi.hook_name)
        if layer in inputs:
            keep.add(inputs[layer])
        else:
            warnings.warn(f"keep_first_last_8bit: found no activation quantizer feeding {layer}; only its "
                          "weights stay at 8 bit", UserWarning, stacklevel=3)
    low_acts = []
    for qi in quantizers:
        if qi.hook_name in keep:
            continue
        if qi.kind == "weight":
            weight = getattr(resolve(qmodel, qi.module_name), "weight", None) if qi.module_name else None
            set_quantizer_bits(qi, weight_bits, weight=weight if isinstance(weight, torch.Tensor) else None)
        else:
            set_quantizer_bits(qi, act_bits)
            if act_bits < 8:
                low_acts.append(qi)
    return low_acts
