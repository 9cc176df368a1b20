"""QAT with NNCF 3.4 (``pip install 'qat-plugins[nncf]'``): prepare, inspect, checkpoint, export.

Importing this module never imports NNCF; every function that needs it raises
``ImportError("... pip install 'qat-plugins[nncf]'")`` when it is missing.

* :func:`prepare_qat` -- ``nncf.quantize`` on a copy of a torch model (calibration batches wrapped in
  ``nncf.Dataset``), then the inserted fake quantizers are set to the requested bit widths; returns the
  model in train mode, ready for fine-tuning (quantizer scales are ``nn.Parameter`` s).
* :func:`nncf_quantizers`, :func:`nncf_module_names`, :func:`resolve` -- find quantizers and address the
  user's modules by their original names ("layer1", "layer2.conv1", "fc").
* :func:`save_checkpoint` / :func:`load_checkpoint` -- NNCF's own ``nncf.torch.get_config`` /
  ``nncf.torch.load_from_config`` plus the state dict, written atomically.
* :func:`strip_for_export` / :func:`export_nncf_onnx` -- standard ONNX QDQ that ONNX Runtime runs.
* The config-driven flow (:func:`qat_plugins.integrations.nncf_config.from_config`) is in
  :mod:`qat_plugins.integrations.nncf_config`; :func:`run_config` (``qat-plugins train --config
  nncf.json``: data, FP training, NNCF QAT with regularizers, checkpoints, ONNX) is in
  :mod:`qat_plugins.integrations.nncf_train`.

How NNCF 3.4's torch backend handles bit widths (checked on nncf 3.4.0 / torch 2.13):

* ``nncf.quantize`` accepts ``AdvancedQuantizationParameters(weights_quantization_params=
  QuantizationParameters(num_bits=b), activations_quantization_params=...)``, but the result must fit
  the hardware config of ``target_device``: ANY/CPU/GPU offer only 8 (and 16) bit, so ``num_bits`` 2..7
  raises ``ValueError: Quantization parameter constraints ... are incompatible with HW capabilities``;
  NPU offers 4-bit conv/matmul weights and activations (2-bit only for matmul / depthwise weights), not
  a uniform 2..8. ``target_device="CPU_SPR"`` and ``fast_bias_correction=False`` are rejected by the
  torch backend.
* The inserted quantizers (``nncf.torch.quantization.layers.SymmetricQuantizer`` /
  ``AsymmetricQuantizer``) carry their width in a ``num_bits`` property whose setter recomputes
  ``level_low`` / ``level_high``; any 2..8 works and the forward pass then produces at most
  ``2**b`` distinct values. :func:`prepare_qat` therefore quantizes at 8 bit and sets ``num_bits``
  afterwards (also in the quantizer's spec, so ``nncf.torch.get_config`` records it). Grids:
  activations ``[0, 2^b-1]`` (unsigned, e.g. after ReLU) or ``[-2^(b-1), 2^(b-1)-1]`` (signed);
  8-bit weights keep NNCF's narrow range ``[-127, 127]``; weights below 8 bit use the full signed range
  ``[-2^(b-1), 2^(b-1)-1]`` (as the torch.ao flow in :mod:`qat_plugins.quant` does; NNCF's narrow range
  would leave 3 levels at 2 bit) and get a per-channel MSE re-fit of their scale.
* Quantizers live in the model under ``__nncf_hooks``: weight quantizers are pre-hooks on port 1 of
  the op, e.g. ``__nncf_hooks.pre_hooks.layer1/conv1/conv2d/0__1.0``; activation quantizers are
  post-hooks on the producing op, e.g. ``__nncf_hooks.post_hooks.layer1/relu1/relu/0__0.0`` (the model
  input: ``__nncf_hooks.post_hooks.x__0.0``). The user's modules keep their names and forward hooks on
  them fire.
* A top-level ``nn.Sequential`` fails inside ``nncf.quantize`` (NNCF adds its hook storage as a child,
  which the Sequential then calls). :func:`prepare_qat` wraps it in :class:`SequentialWrapper` -- same
  child names ("0", "1", ...), same state-dict keys, same forward -- and warns.
* Export: ``torch.onnx.export`` of an NNCF model emits ``org.openvinotoolkit:FakeQuantize`` (ORT cannot
  load it). ``nncf.strip(..., strip_format=StripFormat.NATIVE, example_input=...)`` replaces 8-bit
  quantizers with ``torch.ao`` ``FakeQuantize`` modules, which the TorchScript exporter (``dynamo=False``)
  turns into QuantizeLinear/DequantizeLinear; it refuses other widths. ``StripFormat.DQ`` and
  ``IN_PLACE`` are for ``nncf.compress_weights`` models: on ``nncf.quantize`` models DQ fails on
  narrow-range weight quantizers and IN_PLACE on pre-hook weight quantizers. The dynamo exporter fails
  on ``FakeQuantize`` (data-dependent branch / no fake kernel for ``fake_quantize_*_cachemask``).
"""

from __future__ import annotations

import copy
import io
import json
import os
import pathlib
import re
import warnings
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch

from .._io import atomic_path
from torch import nn

__all__ = [
    "prepare_qat", "is_nncf_model", "nncf_quantizers", "QuantizerInfo", "nncf_module_names", "resolve",
    "SequentialWrapper", "set_quantizer_bits", "save_checkpoint", "load_checkpoint", "strip_for_export",
    "export_nncf_onnx", "ExportFakeQuantize", "make_ignored_scope", "nncf_model_config", "rebuild_from_nncf_config",
    "run_config", "INSTALL_HINT", "SUPPORTED_BITS", "HOOKS_ATTR",
]

INSTALL_HINT = "pip install 'qat-plugins[nncf]'"
SUPPORTED_BITS = tuple(range(2, 9))
HOOKS_ATTR = "__nncf_hooks"
CHECKPOINT_FORMAT = "qat_plugins.nncf/1"
_DEFAULT_SUBSET = 300  # nncf.quantize's default subset_size
_CALIB_BATCH = 32  # batch size used when calibration data is a per-sample Dataset
_EXTENSION_TIMEOUT_ENV = "NNCF_EXTENSION_LOAD_TIMEOUT"


# --------------------------------------------------------------------------------------------------
# import guard
# --------------------------------------------------------------------------------------------------
def _require_nncf() -> Any:
    """Import NNCF or raise an ImportError that says how to install it."""
    # NNCF compiles a C++ extension on first use and gives up after 60 s (leaving a lock file that
    # blocks later runs); on a loaded 2-core machine the build takes longer. Allow 10 minutes
    # unless the user chose a value.
    os.environ.setdefault(_EXTENSION_TIMEOUT_ENV, "600")
    try:
        import nncf  # noqa: PLC0415
        import nncf.torch  # noqa: F401, PLC0415
    except ImportError as e:
        raise ImportError(
            f"the NNCF integration needs nncf 3.4 ({type(e).__name__}: {e}); install it with: {INSTALL_HINT}"
        ) from e
    return nncf


def _hook_storage(model: nn.Module) -> nn.Module:
    _require_nncf()
    from nncf.torch.function_hook.wrapper import get_hook_storage, is_wrapped  # noqa: PLC0415

    if not is_wrapped(model):
        raise ValueError(f"{type(model).__name__} is not an NNCF model (no {HOOKS_ATTR}); run prepare_qat first")
    return get_hook_storage(model)


def is_nncf_model(model: nn.Module) -> bool:
    """True when ``model`` carries NNCF hooks (``__nncf_hooks``); does not import NNCF."""
    return isinstance(getattr(model, "_modules", {}).get(HOOKS_ATTR), nn.Module)


# --------------------------------------------------------------------------------------------------
# Sequential wrapper
# --------------------------------------------------------------------------------------------------
class SequentialWrapper(nn.Module):
    """A plain ``nn.Module`` that runs the children of an ``nn.Sequential`` in order.

    NNCF registers its hook storage as a child of the model; an ``nn.Sequential`` would call it. The
    wrapper holds the same child modules under the same names ("0", "1", ...), so module names and
    state-dict keys are unchanged.
    """

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        for name, child in seq.named_children():
            self.add_module(name, child)
        self._order = tuple(name for name, _ in seq.named_children())
        self.train(seq.training)

    def forward(self, x: Any) -> Any:
        for name in self._order:
            x = self._modules[name](x)
        return x


def _wrap_sequential(model: nn.Module, *, warn: bool) -> nn.Module:
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        if warn:
            warnings.warn(
                f"NNCF cannot quantize a top-level {type(model).__name__} (its hook storage would become a "
                "child the Sequential calls); wrapped it in qat_plugins.integrations.nncf.SequentialWrapper. "
                "Module names ('0', '1', ...) and state_dict keys are unchanged.",
                UserWarning, stacklevel=3)
        return SequentialWrapper(model)
    return model


# --------------------------------------------------------------------------------------------------
# names and quantizers
# --------------------------------------------------------------------------------------------------
def _op_module_name(op_name: str) -> str:
    """``"layer1/conv1/conv2d/0"`` -> ``"layer1.conv1"`` (module path of an NNCF op name)."""
    parts = op_name.split("/")
    return ".".join(parts[:-2]) if len(parts) > 2 else ""


def _decode(hook_key_path: str) -> tuple[str, str, int]:
    """``"pre_hooks.conv1/conv2d/0__1.0"`` -> ``("pre_hooks", "conv1/conv2d/0", 1)``."""
    from nncf.torch.function_hook.hook_storage import decode_hook_name  # noqa: PLC0415

    return decode_hook_name(hook_key_path)


class QuantizerInfo(NamedTuple):
    """``(name, module)`` of one NNCF fake quantizer, plus derived facts as properties.

    ``name`` is the full module path in the model (``model.get_submodule(name)`` works), e.g.
    ``"__nncf_hooks.pre_hooks.layer1/conv1/conv2d/0__1.0"``.
    """

    name: str
    module: nn.Module

    @property
    def hook_name(self) -> str:
        return self.name[len(HOOKS_ATTR) + 1:]

    @property
    def hook_type(self) -> str:
        return _decode(self.hook_name)[0]

    @property
    def op_name(self) -> str:
        return _decode(self.hook_name)[1]

    @property
    def port(self) -> int:
        return _decode(self.hook_name)[2]

    @property
    def module_name(self) -> str:
        """Original module the quantizer belongs to (weights: the layer; activations: the producer)."""
        return _op_module_name(self.op_name)

    @property
    def kind(self) -> str:
        """``"weight"`` or ``"activation"``.

        Weight quantizers are pre-hooks on a non-zero port (port 1 of conv/linear) whose spec forces a
        signed grid or has a per-channel scale; an activation quantizer on the second input of an
        ``add`` is a pre-hook on port 1 too, but per-tensor and not sign-forced.
        """
        if self.hook_type != "pre_hooks" or self.port < 1:
            return "activation"
        spec = self.module._qspec
        return "weight" if spec.signedness_to_force is True or len(tuple(spec.scale_shape)) > 1 else "activation"

    @property
    def num_bits(self) -> int:
        return int(self.module.num_bits)

    @property
    def level_low(self) -> int:
        return int(self.module.level_low)

    @property
    def level_high(self) -> int:
        return int(self.module.level_high)

    @property
    def levels(self) -> int:
        return self.level_high - self.level_low + 1

    @property
    def scheme(self) -> str:
        return "asymmetric" if type(self.module).__name__.startswith("Asymmetric") else "symmetric"

    @property
    def per_channel(self) -> bool:
        return bool(self.module.per_channel)

    @property
    def scale_params(self) -> list[nn.Parameter]:
        """Parameters holding the quantizer's range (symmetric: scale; asymmetric: input_low, input_range)."""
        return [p for p in self.module.parameters(recurse=False) if p.is_floating_point()]

    @property
    def learnable(self) -> bool:
        ps = self.scale_params
        return bool(ps) and all(p.requires_grad for p in ps)


def nncf_quantizers(model: nn.Module) -> list[QuantizerInfo]:
    """All NNCF fake quantizers of ``model`` as ``(name, module)`` pairs (:class:`QuantizerInfo`).

    Each also reports ``.kind``, ``.num_bits``, ``.level_low``/``.level_high``, ``.learnable`` and
    ``.scale_params`` (for gradient checks). Shared modules are listed once.
    """
    hs = _hook_storage(model)
    from nncf.torch.quantization.layers import BaseQuantizer  # noqa: PLC0415

    return [QuantizerInfo(f"{HOOKS_ATTR}.{n}", m) for n, m in hs.named_hooks() if isinstance(m, BaseQuantizer)]


def nncf_module_names(model: nn.Module) -> list[str]:
    """Names of the user's modules in an NNCF model (NNCF's ``__nncf_hooks`` subtree left out).

    They are the names of the original model; a wrapped ``nn.Sequential`` keeps "0", "1", ...
    """
    return [n for n, _ in model.named_modules() if n and n != HOOKS_ATTR and not n.startswith(HOOKS_ATTR + ".")]


def resolve(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name`` in ``model`` (an NNCF model or a plain one).

    ``name`` may be an original module name (``"layer1"``, ``"layer2.conv1"``, ``"fc"``), an NNCF op name
    (``"layer2/conv1/conv2d/0"`` -> ``layer2.conv1``) or a quantizer name from :func:`nncf_quantizers`.
    Raises ``KeyError`` listing close matches when nothing has that name.
    """
    if not isinstance(name, str):
        raise TypeError(f"module name must be a str, got {type(name).__name__}")
    mods = dict(model.named_modules())
    if name in mods:
        return mods[name]
    if "/" in name and not name.startswith(HOOKS_ATTR):
        mname = _op_module_name(name)  # "flatten/0" (an op of the root forward) -> "" (the model)
        if mname in mods:
            return mods[mname]
    names = nncf_module_names(model)
    close = [n for n in names if name.split(".")[-1] in n.split(".")][:8] or names[:12]
    raise KeyError(f"no module {name!r} in {type(model).__name__}; modules include {close}")


def set_quantizer_bits(info: QuantizerInfo | nn.Module, bits: int, *, weight: torch.Tensor | None = None) -> None:
    """Set one NNCF quantizer to ``bits`` (2..8), keeping its spec (and thus checkpoints) in sync.

    Weight quantizers below 8 bit switch to the full signed range ``[-2^(b-1), 2^(b-1)-1]``; pass
    ``weight`` to re-fit the per-channel scale by MSE. Raises ``ValueError`` for other widths or for
    half-range (overflow-fix) quantizers, whose effective width would be ``bits - 1``.
    """
    _check_bits(bits, "bits")
    q = info.module if isinstance(info, QuantizerInfo) else info
    is_weight = isinstance(info, QuantizerInfo) and info.kind == "weight"
    if getattr(q, "_half_range", False) and bits != q.num_bits:
        raise ValueError(
            f"quantizer {getattr(info, 'name', type(q).__name__)} uses NNCF's overflow fix (half range); "
            "cannot change its width; pass advanced_parameters with overflow_fix=OverflowFix.DISABLE")
    with torch.no_grad():
        if is_weight and bits < 8:  # full signed range below 8 bit (NNCF's narrow range wastes a level)
            q._narrow_range = False
            q._qspec.narrow_range = False
        q._qspec.num_bits = bits
        q.num_bits = bits  # setter recomputes level_low / level_high
        if is_weight and weight is not None and bits < 8:
            _refit_weight_scale(q, weight)


def _refit_weight_scale(q: nn.Module, weight: torch.Tensor) -> None:
    """Per-channel grid search of the symmetric scale minimising the weight MSE (data-free)."""
    store = getattr(q, "_scale_param_storage", None)
    if store is None or getattr(q, "_is_using_log_scale_storage", False):
        return
    w = weight.detach()
    if store.dim() != w.dim() or store.shape[0] != w.shape[0] or store.numel() != w.shape[0]:
        return
    base = store.data.clone()
    best_err = torch.full((w.shape[0],), float("inf"))
    best = base.clone()
    for f in torch.linspace(0.1, 1.0, 37):
        store.data.copy_(base * f)
        err = (q.quantize(w) - w).pow(2).flatten(1).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[better] = (base * f)[better]
    store.data.copy_(best)


def _check_bits(bits: Any, field: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{field}: must be an int from 2 to 8, got {bits!r}")


# --------------------------------------------------------------------------------------------------
# calibration data
# --------------------------------------------------------------------------------------------------
def _model_inputs(item: Any) -> Any:
    """nncf.Dataset transform: the model inputs of one calibration item (``x`` of ``(x, y)``)."""
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item:
        return item[0]
    raise TypeError(
        f"calibration items must be (inputs, target) tuples/lists or input tensors, got {type(item).__name__}")


def _batch_size(x: Any) -> int | None:
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None


def _calibration_items(data: Any, subset_size: int) -> list[Any]:
    """The first ``subset_size`` samples of ``data`` as a list of batches (last one trimmed)."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset  # noqa: PLC0415

    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size=_CALIB_BATCH, shuffle=False)
    if isinstance(data, (torch.Tensor, str, bytes, dict)) or not isinstance(data, Iterable):
        raise TypeError(
            "calibration_data must be an iterable of (inputs, target) batches, a DataLoader or a Dataset "
            f"(e.g. TensorDataset), got {type(data).__name__}")
    items: list[Any] = []
    seen = 0
    for item in data:
        x = _model_inputs(item)
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


# --------------------------------------------------------------------------------------------------
# ignored scopes
# --------------------------------------------------------------------------------------------------
_LEGACY_SCOPE = re.compile(r"\[([^\]]+)\]")


def make_ignored_scope(model: nn.Module, entries: Sequence[str], *, field: str = "ignored_scope") -> Any:
    """``nncf.IgnoredScope`` from module names and NNCF-style scope strings.

    * ``"layer3.shortcut"`` (a module name) -> every op inside that module: pattern ``^layer3/shortcut/``;
    * ``"layer1/conv1/conv2d/0"`` (an NNCF 3.x op name) -> ``names``;
    * ``"SmallResNet/BasicBlock[layer1]/Conv2d[conv1]/conv2d_0"`` (NNCF 2.x legacy scope) -> the module
      ``layer1.conv1`` as above;
    * ``"{re}layer[23]/.*"`` (legacy regex prefix) -> ``patterns``.

    Raises ``ValueError`` naming ``field[i]`` when an entry names no module or is not a valid regex.
    """
    nncf = _require_nncf()
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
            module = _op_module_name(e)
            if module not in mods:
                raise ValueError(f"{path}: op name {e!r} belongs to no module of {type(model).__name__}")
            names.append(e)
            continue
        else:
            module = e
        if module not in mods or module == "":
            known = [n for n in nncf_module_names(model)][:15]
            raise ValueError(f"{path}: no module {e!r} in {type(model).__name__}; modules include {known}")
        patterns.append("^" + re.escape(module.replace(".", "/")) + "/")
    return nncf.IgnoredScope(names=names, patterns=patterns)


# --------------------------------------------------------------------------------------------------
# prepare_qat
# --------------------------------------------------------------------------------------------------
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


def _first_last_layers(model: nn.Module) -> list[str]:
    from ..quant.prepare import quantizable_layers  # noqa: PLC0415

    layers = quantizable_layers(model)
    return [layers[0], layers[-1]] if layers else []


def _input_quantizers(graph: Any, op_name: str, max_depth: int = 8) -> list[str]:
    """Hook names (``post_hooks.x__0.0`` ...) of the activation quantizers feeding port 0 of ``op_name``.

    Walks back through single-activation-input ops (flatten, view, ...) in the quantized model's
    NNCF graph until it meets a quantize node; its scale constant is named after the hook.
    """
    try:
        node = graph.get_node_by_name(op_name)
    except Exception:  # noqa: BLE001 - op not traced
        return []
    for _ in range(max_depth):
        act_edges = [e for e in graph.get_input_edges(node) if e.from_node.node_type != "nncf_model_const"]
        edges0 = [e for e in act_edges if e.input_port_id == 0] or act_edges
        if len(edges0) != 1:
            return []
        prev = edges0[0].from_node
        if prev.node_type.endswith("quantize"):
            for e in graph.get_input_edges(prev):
                cname = e.from_node.node_name
                if e.from_node.node_type == "nncf_model_const" and cname.startswith(HOOKS_ATTR + "."):
                    return [cname[len(HOOKS_ATTR) + 1:].rsplit(".", 1)[0]]
            return []
        if prev.node_type == "nncf_model_input":
            return []
        node = prev
    return []


def _merge_advanced(nncf: Any, options: dict[str, Any], low_bits: bool, batch: int | None) -> None:
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
    **nncf_options: Any,
) -> nn.Module:
    """``nncf.quantize`` a copy of ``model`` and set its fake quantizers to the requested widths.

    Args:
        model: a float ``nn.Module`` (left unchanged). A top-level ``nn.Sequential`` is wrapped in
            :class:`SequentialWrapper` (with a ``UserWarning``); names stay "0", "1", ...
        calibration_data: an iterable of ``(inputs, target)`` batches (or of input tensors), a
            ``DataLoader``, or a per-sample ``Dataset`` such as ``TensorDataset`` (batched by 32). It is
            wrapped in ``nncf.Dataset(items, transform)`` whose transform takes the inputs.
        weight_bits, act_bits: 2..8. NNCF inserts 8-bit quantizers; lower widths are then set on the
            quantizer modules (see the module docstring).
        preset: ``"performance"`` (symmetric) / ``"mixed"`` (asymmetric activations) / ``nncf.QuantizationPreset``.
        ignored_scope: an ``nncf.IgnoredScope`` or a list of module names / NNCF scope strings
            (:func:`make_ignored_scope`).
        target_device: ``"ANY"`` (default), ``"CPU"``, ``"GPU"``, ``"NPU"`` or ``nncf.TargetDevice``.
        subset_size: number of calibration *samples* (default 300, NNCF's default).
        example_input: an input batch used to trace the graph (default: the first calibration batch).
        keep_first_last_8bit: the first and last conv/linear (execution order) keep 8-bit weights and
            8-bit quantizers on their inputs.
        **nncf_options: passed to ``nncf.quantize`` (``model_type``, ``advanced_parameters``, ...).

    Returns:
        the quantized model (same class, same module names) in train mode.
    """
    nncf = _require_nncf()
    _check_bits(weight_bits, "weight_bits")
    _check_bits(act_bits, "act_bits")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_nncf_model(model):
        raise ValueError("model already carries NNCF quantizers; pass the float model")
    if subset_size is None:
        subset_size = _DEFAULT_SUBSET
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 1:
        raise ValueError(f"subset_size: must be a positive int, got {subset_size!r}")
    if "mode" in nncf_options:
        raise ValueError("nncf.quantize(mode=...) (FP8 etc.) is not supported by NNCF's torch backend")
    nncf_preset, device = _preset(nncf, preset), _target_device(nncf, target_device)
    model = _wrap_sequential(model, warn=True)
    items = _calibration_items(calibration_data, subset_size)
    first = _model_inputs(items[0])
    example = first if example_input is None else example_input
    low_bits = weight_bits < 8 or act_bits < 8
    options = dict(nncf_options)
    _merge_advanced(nncf, options, low_bits, _batch_size(first))
    scope = ignored_scope
    if scope is not None and not isinstance(scope, nncf.IgnoredScope):
        scope = make_ignored_scope(model, scope)
    keep8 = _first_last_layers(model) if keep_first_last_8bit and low_bits else []

    was_training = model.training
    model.eval()
    try:
        qmodel = nncf.quantize(
            model, nncf.Dataset(items, _model_inputs), preset=nncf_preset, target_device=device,
            subset_size=len(items),
            ignored_scope=scope, **options)
    finally:
        model.train(was_training)
    if low_bits:
        _apply_bits(qmodel, example, weight_bits, act_bits, keep8)
    return qmodel.train()


def _apply_bits(qmodel: nn.Module, example: Any, weight_bits: int, act_bits: int, keep8: list[str]) -> None:
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph  # noqa: PLC0415

    quantizers = nncf_quantizers(qmodel)
    keep: set[str] = set()
    if keep8:
        with torch.no_grad():
            graph = build_nncf_graph(qmodel, example)
        ops_of: dict[str, list[str]] = {}
        for qi in quantizers:
            if qi.kind == "weight":
                ops_of.setdefault(qi.module_name, []).append(qi.op_name)
        for layer in keep8:
            for op in ops_of.get(layer, []):
                keep.add(next(q.hook_name for q in quantizers if q.op_name == op and q.kind == "weight"))
                inputs = _input_quantizers(graph, op)
                if not inputs:
                    warnings.warn(f"keep_first_last_8bit: found no activation quantizer feeding {op}; "
                                  "only its weights stay at 8 bit", UserWarning, stacklevel=3)
                keep.update(inputs)
    for qi in quantizers:
        if qi.hook_name in keep:
            continue
        if qi.kind == "weight":
            weight = getattr(resolve(qmodel, qi.module_name), "weight", None) if qi.module_name else None
            set_quantizer_bits(qi, weight_bits, weight=weight if isinstance(weight, torch.Tensor) else None)
        else:
            set_quantizer_bits(qi, act_bits)


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------
def _atomic_write(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def nncf_model_config(model: nn.Module) -> dict[str, Any]:
    """``nncf.torch.get_config(model)`` as plain JSON types (NNCF's StrEnums become strings).

    The result can be stored in a ``torch.load(weights_only=True)`` checkpoint or a JSON file and
    turned back into a model with :func:`rebuild_from_nncf_config`.
    """
    nncf = _require_nncf()
    _hook_storage(model)
    return json.loads(json.dumps(nncf.torch.get_config(model)))


def rebuild_from_nncf_config(
    fresh_fp_model: nn.Module, nncf_config: dict[str, Any], *, sequential_wrapper: bool = False
) -> nn.Module:
    """``nncf.torch.load_from_config`` on a copy of ``fresh_fp_model``: the QAT model's structure.

    ``nncf_config`` is what :func:`nncf_model_config` returned (JSON types are converted back to the
    enums / tuples NNCF expects). The quantizers have their saved widths and ranges but initial
    values: load the saved ``state_dict`` next (the caller's job). ``fresh_fp_model`` is unchanged.
    """
    nncf = _require_nncf()
    from nncf.common.quantization.structs import QuantizationScheme  # noqa: PLC0415

    if is_nncf_model(fresh_fp_model):
        raise ValueError("rebuild_from_nncf_config needs a fresh float model, got one that already has NNCF hooks")
    model = copy.deepcopy(fresh_fp_model)
    if sequential_wrapper:
        model = _wrap_sequential(model, warn=False)
    config = copy.deepcopy(nncf_config)
    for cmd in config.get("compression_state", []):
        mc = cmd.get("module_config", {})
        if isinstance(mc.get("mode"), str):
            mc["mode"] = QuantizationScheme(mc["mode"])
        if isinstance(mc.get("scale_shape"), list):
            mc["scale_shape"] = tuple(mc["scale_shape"])
    qmodel = nncf.torch.load_from_config(model, config)
    for qi in nncf_quantizers(qmodel):
        qi.module.set_levels()
    return qmodel


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> pathlib.Path:
    """Save an NNCF QAT model: ``nncf.torch.get_config(model)`` + ``state_dict`` + ``extra`` (atomic write).

    ``extra`` (e.g. optimizer state, epoch) must be loadable with ``torch.load(weights_only=True)``:
    tensors, numbers, strings, lists, dicts.
    """
    nncf = _require_nncf()
    config = nncf_model_config(model)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "nncf_version": nncf.__version__,
        "nncf_config": config,
        "state_dict": model.state_dict(),
        "model_class": type(model).__qualname__,
        "sequential_wrapper": isinstance(model, SequentialWrapper),
        "training": model.training,
        "extra": extra,
    }
    return _atomic_write(pathlib.Path(path), lambda p: torch.save(payload, p))


def load_checkpoint(
    fresh_fp_model: nn.Module, path: str | os.PathLike[str], example_input: Any
) -> tuple[nn.Module, Any]:
    """Rebuild the QAT model from a fresh float model and a :func:`save_checkpoint` file.

    Uses ``nncf.torch.load_from_config(model, config)`` (NNCF 3.4 needs no example input for that) and
    ``load_state_dict(strict=True)``; ``example_input`` runs one forward pass to check the result.
    Returns ``(model, extra)``; the model is in the train/eval mode it was saved in.
    """
    _require_nncf()
    path = pathlib.Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a qat_plugins NNCF checkpoint (format {CHECKPOINT_FORMAT})")
    if is_nncf_model(fresh_fp_model):
        raise ValueError("load_checkpoint needs a fresh float model, got one that already has NNCF hooks")
    probe = _wrap_sequential(fresh_fp_model, warn=False) if ckpt.get("sequential_wrapper") else fresh_fp_model
    if type(probe).__qualname__ != ckpt.get("model_class"):
        raise ValueError(f"{path} was saved from {ckpt.get('model_class')}, got {type(probe).__qualname__}")
    qmodel = rebuild_from_nncf_config(fresh_fp_model, ckpt["nncf_config"],
                                      sequential_wrapper=bool(ckpt.get("sequential_wrapper")))
    qmodel.load_state_dict(ckpt["state_dict"], strict=True)
    for qi in nncf_quantizers(qmodel):
        qi.module.set_levels()  # AsymmetricQuantizer has no post-load hook for this
        qi.module.initialized = True
    qmodel.train(bool(ckpt.get("training", True)))
    was = qmodel.training
    qmodel.eval()
    with torch.no_grad():
        out = qmodel(*example_input) if isinstance(example_input, tuple) else qmodel(example_input)
    qmodel.train(was)
    if isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
        raise ValueError(f"the model restored from {path} produced non-finite outputs")
    return qmodel, ckpt.get("extra")


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------
class ExportFakeQuantize(nn.Module):
    """A ``b``-bit NNCF quantizer as ``clamp`` + torch fake-quantize over an 8-bit container range.

    ONNX QuantizeLinear only saturates to the int8/uint8 range, so the narrower ``b``-bit range is a
    ``Clip`` before it; exported it is ``Clip -> QuantizeLinear -> DequantizeLinear``. Weights that are
    already on the grid (``clamp=False``) export as plain ``QuantizeLinear -> DequantizeLinear``.
    """

    def __init__(self, quantizer: nn.Module, *, clamp: bool = True) -> None:
        super().__init__()
        lo, hi, scale, zp = quantizer.get_parameters_for_torch_fq()
        self.clamp = clamp
        if getattr(quantizer, "_half_range", False):
            raise ValueError("half-range quantizers are exported by nncf.strip, not ExportFakeQuantize")
        self.per_channel = bool(quantizer.per_channel)
        shape = tuple(quantizer.scale_shape)
        self.axis = int(max(range(len(shape)), key=lambda i: shape[i])) if self.per_channel else 0
        self.register_buffer("scale", scale.detach().float().reshape(-1).clone())
        self.register_buffer("zero_point", zp.detach().to(torch.int32).reshape(-1).clone())
        self.qmin, self.qmax = (-128, 127) if lo < 0 else (0, 255)
        self.level_low, self.level_high = int(lo), int(hi)
        view = [1] * len(shape) if self.per_channel else []
        if self.per_channel:
            view[self.axis] = -1
        zpf = self.zero_point.float()
        self.register_buffer("low", ((lo - zpf) * self.scale).reshape(view) if view else (lo - zpf[0]) * self.scale[0])
        self.register_buffer("high", ((hi - zpf) * self.scale).reshape(view) if view else (hi - zpf[0]) * self.scale[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clamp:
            x = torch.clamp(x, self.low, self.high)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax)
        return torch.fake_quantize_per_tensor_affine(x, self.scale[0], self.zero_point[0], self.qmin, self.qmax)


def strip_for_export(model: nn.Module, *, example_input: Any) -> nn.Module:
    """A copy of an NNCF QAT model whose quantizers are torch fake-quant ops that export to ONNX QDQ.

    8-bit quantizers go through ``nncf.strip(model, do_copy=..., strip_format=StripFormat.NATIVE,
    example_input=...)`` (torch.ao ``FakeQuantize``; narrow-range weights are pre-quantized by NNCF).
    Narrower quantizers, which NNCF's strip refuses, become :class:`ExportFakeQuantize`; their weights
    are first replaced by NNCF's own fake-quantized values, so the exported integers are exact.
    The result is in eval mode; export it with ``torch.onnx.export(..., dynamo=False)``.
    """
    nncf = _require_nncf()
    from nncf.parameters import StripFormat  # noqa: PLC0415

    _hook_storage(model)
    m = copy.deepcopy(model).eval()
    hs = _hook_storage(m)
    with torch.no_grad():
        for qi in nncf_quantizers(m):
            if qi.levels in (255, 256):
                continue
            on_grid = False
            if qi.kind == "weight" and qi.module_name:
                w = getattr(resolve(m, qi.module_name), "weight", None)
                if isinstance(w, torch.Tensor):
                    w.data = qi.module.quantize(w.data)
                    on_grid = True
            hs.set_submodule(qi.hook_name, ExportFakeQuantize(qi.module, clamp=not on_grid))
        return nncf.strip(m, do_copy=False, strip_format=StripFormat.NATIVE, example_input=example_input).eval()


def _export_inputs(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise TypeError(f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}")
    return example_inputs


def export_nncf_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: tuple[Any, ...],
    *,
    weight_format: str = "int8",
) -> pathlib.Path:
    """Export an NNCF QAT model to an ONNX QDQ file that ONNX Runtime runs (atomic write).

    :func:`strip_for_export`, then the TorchScript exporter (opset 20, dynamic batch). Weight
    QuantizeLinear nodes are folded into integer initializers feeding DequantizeLinear:

    * ``weight_format="int8"``: INT8 weights (any width 2..8, values on the quantizer's grid);
    * ``weight_format="int4"``: weights whose quantizer has at most 4 bits are stored as packed INT4
      (opset 21), wider ones stay INT8. Raises ``ValueError`` when no weight quantizer has <= 4 bits.
      ORT runs INT4 ``DequantizeLinear`` + float conv (no integer kernel).

    Activations stay QuantizeLinear/DequantizeLinear pairs (uint8/int8; below 8 bit a ``Clip`` first).
    The file is loaded in ONNX Runtime once and run on ``example_inputs`` before it replaces ``path``.
    ``qat_plugins.export.export_onnx`` routes NNCF models here; ``qat_plugins.export.validate_onnx``
    compares the file with the NNCF model in ORT (metadata ``qat_plugins.weight_format`` is set).
    """
    _require_nncf()
    import onnx  # noqa: PLC0415

    if weight_format not in ("int8", "int4"):
        raise ValueError(f"weight_format: must be 'int8' or 'int4', got {weight_format!r}")
    inputs = _export_inputs(example_inputs)
    quantizers = nncf_quantizers(model)
    wbits = sorted({q.num_bits for q in quantizers if q.kind == "weight"})
    if weight_format == "int4" and not any(b <= 4 for b in wbits):
        raise ValueError(
            f"weight_format='int4' needs weight quantizers with at most 4 bits (prepare_qat(weight_bits<=4)); "
            f"this model's weight quantizers have {wbits or 'no'} bits")
    stripped = strip_for_export(model, example_input=inputs[0] if len(inputs) == 1 else inputs)
    in_names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(stripped, inputs, buf, dynamo=False, opset_version=20, input_names=in_names,
                          output_names=["output"], dynamic_axes={n: {0: "batch"} for n in in_names + ["output"]})
    proto = onnx.load_from_string(buf.getvalue())
    n_int4 = _fold_weight_quantize(proto, int4=weight_format == "int4")
    if weight_format == "int4":
        if n_int4 == 0:
            raise ValueError("weight_format='int4': no weight initializer fits INT4; nothing was packed")
        for op in proto.opset_import:
            if op.domain in ("", "ai.onnx"):
                op.version = max(op.version, 21)
    for key, value in (("weight_format", weight_format), ("weight_bits", ",".join(map(str, wbits))),
                       ("exporter", "qat_plugins.integrations.nncf")):
        entry = proto.metadata_props.add()  # read by qat_plugins.export.read_metadata / validate_onnx
        entry.key, entry.value = f"qat_plugins.{key}", value
    onnx.checker.check_model(proto)
    out = pathlib.Path(path)

    def write(tmp: pathlib.Path) -> None:
        onnx.save(proto, str(tmp))
        _smoke_run(tmp, inputs, in_names)

    return _atomic_write(out, write)


def _smoke_run(path: pathlib.Path, inputs: tuple[Any, ...], names: list[str]) -> None:
    import numpy as np  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {n: x.detach().cpu().numpy() for n, x in zip(names, inputs)})
    if not all(np.isfinite(o).all() for o in outs if np.issubdtype(o.dtype, np.floating)):
        raise RuntimeError(f"ONNX Runtime produced non-finite outputs for {path}")


def _fold_weight_quantize(proto: Any, *, int4: bool) -> int:
    """Replace ``initializer -> QuantizeLinear`` by an integer initializer; returns how many became INT4."""
    import numpy as np  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    identity = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity"}

    def const(name: str) -> np.ndarray | None:
        seen = 0
        while name in identity and seen < 16:
            name, seen = identity[name], seen + 1
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            for a in consts[name].attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    removed, n_int4 = [], 0
    for node in g.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        w, scale, zp = const(node.input[0]), const(node.input[1]), const(node.input[2])
        if w is None or scale is None or zp is None or w.dtype.kind != "f":
            continue  # an activation quantizer
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.size > 1:
            shape[axis] = -1
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(w / scale.reshape(shape)) + zp.astype(np.int64).reshape(shape), info.min, info.max)
        q = q.astype(zp.dtype)
        base = node.output[0]
        if int4 and zp.dtype == np.int8 and q.min() >= -8 and q.max() <= 7 and zp.min() >= -8 and zp.max() <= 7:
            qt, zt = _int4_tensor(base + "_int4", q), _int4_tensor(base + "_zp_int4", zp)
            n_int4 += 1
        else:
            qt, zt = numpy_helper.from_array(q, base + "_q"), numpy_helper.from_array(zp, base + "_zp")
        g.initializer.extend([qt, zt])
        for dq in consumers.get(node.output[0], []):
            if dq.op_type != "DequantizeLinear":
                raise RuntimeError(f"QuantizeLinear {node.name} feeds {dq.op_type}, expected DequantizeLinear")
            dq.input[0] = qt.name
            if len(dq.input) >= 3:
                dq.input[2] = zt.name
            else:
                dq.input.append(zt.name)
        removed.append(node)
    for node in removed:
        g.node.remove(node)
    _prune_initializers(proto)
    return n_int4


def _int4_tensor(name: str, values: Any) -> Any:
    """INT4 ``TensorProto`` with two values per byte in ``raw_data`` (low nibble first)."""
    import numpy as np  # noqa: PLC0415
    from onnx import TensorProto  # noqa: PLC0415

    flat = values.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nib = (flat.astype(np.uint8) & 0x0F)
    packed = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.INT4
    t.dims.extend(list(values.shape))
    t.raw_data = packed.tobytes()
    return t


def _prune_initializers(proto: Any) -> None:
    g = proto.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)
    # Identity / Constant nodes left without consumers
    changed = True
    while changed:
        changed = False
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        for n in list(g.node):
            if n.op_type in ("Identity", "Constant") and not any(o in used for o in n.output):
                g.node.remove(n)
                changed = True
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)



# --------------------------------------------------------------------------------------------------
# config-driven training run (qat-plugins train --config nncf.json)
# --------------------------------------------------------------------------------------------------
def run_config(
    path: str | os.PathLike[str] | dict[str, Any],
    *,
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Run an NNCF-style JSON config end to end; see :func:`qat_plugins.integrations.nncf_train.run_config`.

    (Imported lazily so that importing this module stays light.)
    """
    from .nncf_train import run_config as _run_config  # noqa: PLC0415

    return _run_config(path, output_dir=output_dir, resume=resume, max_steps=max_steps)
