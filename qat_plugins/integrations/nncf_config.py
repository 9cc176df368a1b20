"""Config-driven NNCF QAT: a legacy-NNCF-style JSON/dict config mapped onto ``nncf.quantize``.

NNCF 3.x removed ``NNCFConfig`` / ``create_compressed_model``; :func:`from_config` keeps the familiar
JSON layout, validates it strictly and calls :func:`qat_plugins.integrations.nncf.prepare_qat`.

Example::

    {
      "input_info": {"sample_size": [1, 1, 8, 8]},
      "compression": {
        "algorithm": "quantization",
        "preset": "mixed",
        "initializer": {"range": {"num_init_samples": 256}},
        "weights": {"bits": 4},
        "activations": {"bits": 4},
        "ignored_scopes": ["layer3.shortcut", "{re}.*fc.*"],
        "target_device": "CPU"
      },
      "qat_plugins": {"regularizers": [{"name": "cr", "weight": 1.0, "layers": ["layer1", "layer2"]}]}
    }

Field mapping (``compression`` may be one dict or a list holding exactly one quantization entry;
paths below use ``compression[0]`` for either form, messages use the form given):

=============================================  ==========================================================
config field                                   effect
=============================================  ==========================================================
``input_info.sample_size`` (list of ints)      ``input_shape``; example input ``torch.zeros(sample_size)``
                                               for graph tracing; must match the calibration inputs
                                               (all but the batch dim) and run through the model
``input_info`` as a one-element list           same as the dict (several inputs are rejected)
``compression[0].algorithm``                   must be ``"quantization"`` -> ``nncf.quantize``; any other
                                               algorithm (``"magnitude_sparsity"``, ``"filter_pruning"``,
                                               ...) is rejected
``compression[0].preset``                      ``"performance"`` / ``"mixed"`` ->
                                               ``nncf.quantize(preset=nncf.QuantizationPreset(...))``
                                               (default: NNCF's choice, performance for CNNs)
``compression[0].initializer.range.``          ``prepare_qat(subset_size=...)``: number of calibration
``num_init_samples`` (int >= 1)                samples (batches are trimmed to it; default 300)
``compression[0].weights.bits`` (2..8)         ``prepare_qat(weight_bits=...)``
``compression[0].activations.bits`` (2..8)     ``prepare_qat(act_bits=...)``
``compression[0].ignored_scopes`` (strings)    ``nncf.quantize(ignored_scope=nncf.IgnoredScope(names=...,
                                               patterns=...))``: module name ``"layer3.shortcut"`` ->
                                               pattern ``^layer3/shortcut/``; NNCF 3.x op name
                                               ``"layer1/conv1/conv2d/0"`` -> ``names``; NNCF 2.x scope
                                               ``"Net/BasicBlock[layer1]/Conv2d[conv1]/conv2d_0"`` ->
                                               module ``layer1.conv1``; ``"{re}<regex>"`` -> ``patterns``
``compression[0].target_device`` or            ``nncf.quantize(target_device=nncf.TargetDevice[...])``:
top-level ``target_device``                    ANY, CPU, GPU, NPU (CPU_SPR is not supported by the
                                               torch backend; both given and different is an error).
                                               NNCF itself treats GPU/NPU as CPU for its 8-bit
                                               insertion step.
``qat_plugins.regularizers`` (list of dicts)   ``NNCFQATSetup.regularizers_config``; each needs
                                               ``name`` (str); ``weight`` (number >= 0, default 1.0)
                                               and ``layers`` (module names, checked against the
                                               model) are validated, other keys are passed through
                                               to ``regularizers_factory``
``qat_plugins.keep_first_last_8bit`` (bool)    ``prepare_qat(keep_first_last_8bit=...)`` (default true)
=============================================  ==========================================================

Anything else -- unknown keys at any level (e.g. ``weights.mode``, ``initializer.batchnorm_adaptation``,
``scope_overrides``), wrong types, bits outside 2..8, a ``sample_size`` the model or the calibration
data does not fit -- raises ``ValueError`` whose message starts with the field path, e.g.
``compression[0].weights.bits: must be an int from 2 to 8, got 9``.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import nncf as _q

__all__ = ["NNCFQATSetup", "from_config", "validate_config"]

_TOP_KEYS = ("input_info", "compression", "target_device", "qat_plugins")
_COMPRESSION_KEYS = ("algorithm", "preset", "initializer", "weights", "activations", "ignored_scopes",
                     "target_device")
_QAT_PLUGINS_KEYS = ("regularizers", "keep_first_last_8bit")
_DEVICES = ("ANY", "CPU", "GPU", "NPU")


@dataclass
class NNCFQATSetup:
    """What :func:`from_config` built.

    Attributes:
        model: the NNCF QAT model (train mode).
        regularizers_config: the validated ``qat_plugins.regularizers`` entries.
        nncf_config: the normalized config (defaults filled in, ``compression`` as a one-element list).
        input_shape: ``input_info.sample_size`` as a tuple.
        regularizers: what ``regularizers_factory`` returned (empty when no factory was given).
    """

    model: nn.Module
    regularizers_config: list[dict[str, Any]]
    nncf_config: dict[str, Any]
    input_shape: tuple[int, ...]
    regularizers: list[Any] = field(default_factory=list)


def _err(path: str, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def _check_keys(obj: Any, path: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise _err(path, f"must be an object, got {type(obj).__name__}")
    for k in obj:
        if k not in allowed:
            raise _err(f"{path}.{k}" if path != "config" else str(k),
                       f"unknown or unsupported key (allowed here: {', '.join(allowed)})")
    return obj


def _int(value: Any, path: str, *, low: int, high: int | None = None, what: str | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        rng = what or (f"an int from {low} to {high}" if high is not None else f"an int >= {low}")
        raise _err(path, f"must be {rng}, got {value!r}")
    return value


def _load(config: Any) -> dict[str, Any]:
    if isinstance(config, (str, os.PathLike)):
        p = pathlib.Path(config)
        try:
            text = p.read_text()
        except OSError as e:
            raise ValueError(f"config: cannot read {p}: {e}") from e
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config: {p} is not valid JSON ({e})") from e
    if not isinstance(config, Mapping):
        raise ValueError(f"config: must be a JSON object / dict or a path to one, got {type(config).__name__}")
    return copy.deepcopy(dict(config))


def _sample_size(info: Any) -> list[int]:
    path = "input_info"
    if isinstance(info, list):
        if len(info) != 1:
            raise _err(path, f"only one model input is supported, got {len(info)} entries")
        info, path = info[0], "input_info[0]"
    _check_keys(info, path, ("sample_size",))
    if "sample_size" not in info:
        raise _err(f"{path}.sample_size", "is required (e.g. [1, 1, 8, 8])")
    ss = info["sample_size"]
    if not isinstance(ss, list) or len(ss) < 2:
        raise _err(f"{path}.sample_size", f"must be a list of at least 2 positive ints, got {ss!r}")
    for i, v in enumerate(ss):
        _int(v, f"{path}.sample_size[{i}]", low=1, what="a positive int")
    return list(ss)


def _device(value: Any, path: str) -> str:
    if not isinstance(value, str) or value.upper() not in _DEVICES:
        raise _err(path, f"must be one of {', '.join(_DEVICES)}, got {value!r}")
    return value.upper()


def _quantization_entry(comp: Any) -> tuple[dict[str, Any], str]:
    if isinstance(comp, Mapping):
        entries, prefix = [comp], "compression"
    elif isinstance(comp, list):
        entries, prefix = comp, None
    else:
        raise _err("compression", f"must be an object or a list of objects, got {type(comp).__name__}")
    found: tuple[dict[str, Any], str] | None = None
    for i, entry in enumerate(entries):
        path = prefix or f"compression[{i}]"
        if not isinstance(entry, Mapping):
            raise _err(path, f"must be an object, got {type(entry).__name__}")
        algo = entry.get("algorithm")
        if algo != "quantization":
            raise _err(f"{path}.algorithm",
                       f"{algo!r} is not supported; only 'quantization' maps onto nncf.quantize in NNCF 3.x")
        if found is not None:
            raise _err(path, "only one 'quantization' entry is allowed")
        found = (dict(entry), path)
    if found is None:
        raise _err("compression", "must contain one {'algorithm': 'quantization', ...} entry")
    return found


def validate_config(config: Any, model: nn.Module | None = None) -> dict[str, Any]:
    """Check ``config`` (dict or JSON path) and return it normalized; raises ``ValueError`` with the field path.

    With ``model``, module names in ``ignored_scopes`` and regularizer ``layers`` are checked too
    (ignored scopes need NNCF for that).
    """
    return _validate(config, model)[0]


def _validate(config: Any, model: nn.Module | None) -> tuple[dict[str, Any], str]:
    cfg = _load(config)
    _check_keys(cfg, "config", _TOP_KEYS)
    if "input_info" not in cfg:
        raise _err("input_info", "is required (e.g. {'sample_size': [1, 1, 8, 8]})")
    sample_size = _sample_size(cfg["input_info"])
    if "compression" not in cfg:
        raise _err("compression", "is required (e.g. {'algorithm': 'quantization'})")
    entry, path = _quantization_entry(cfg["compression"])
    _check_keys(entry, path, _COMPRESSION_KEYS)

    preset = entry.get("preset", "performance")
    if preset not in ("performance", "mixed"):
        raise _err(f"{path}.preset", f"must be 'performance' or 'mixed', got {preset!r}")
    num_init = _q._DEFAULT_SUBSET
    if "initializer" in entry:
        init = _check_keys(entry["initializer"], f"{path}.initializer", ("range",))
        if "range" in init:
            rng = _check_keys(init["range"], f"{path}.initializer.range", ("num_init_samples",))
            if "num_init_samples" in rng:
                num_init = _int(rng["num_init_samples"], f"{path}.initializer.range.num_init_samples", low=1)
    bits = {}
    for group in ("weights", "activations"):
        bits[group] = 8
        if group in entry:
            g = _check_keys(entry[group], f"{path}.{group}", ("bits",))
            if "bits" in g:
                bits[group] = _int(g["bits"], f"{path}.{group}.bits", low=2, high=8)
    scopes = entry.get("ignored_scopes", [])
    if not isinstance(scopes, list):
        raise _err(f"{path}.ignored_scopes", f"must be a list of strings, got {type(scopes).__name__}")
    for i, s in enumerate(scopes):
        if not isinstance(s, str) or not s:
            raise _err(f"{path}.ignored_scopes[{i}]", f"must be a non-empty string, got {s!r}")

    device = None
    if "target_device" in cfg:
        device = _device(cfg["target_device"], "target_device")
    if "target_device" in entry:
        d2 = _device(entry["target_device"], f"{path}.target_device")
        if device is not None and d2 != device:
            raise _err(f"{path}.target_device", f"{d2!r} contradicts the top-level target_device {device!r}")
        device = d2
    device = device or "ANY"

    qp = _check_keys(cfg.get("qat_plugins", {}), "qat_plugins", _QAT_PLUGINS_KEYS)
    keep = qp.get("keep_first_last_8bit", True)
    if not isinstance(keep, bool):
        raise _err("qat_plugins.keep_first_last_8bit", f"must be true or false, got {keep!r}")
    regs = qp.get("regularizers", [])
    if not isinstance(regs, list):
        raise _err("qat_plugins.regularizers", f"must be a list of objects, got {type(regs).__name__}")
    mods = dict(model.named_modules()) if model is not None else None
    norm_regs = []
    for i, r in enumerate(regs):
        rp = f"qat_plugins.regularizers[{i}]"
        if not isinstance(r, Mapping):
            raise _err(rp, f"must be an object, got {type(r).__name__}")
        r = dict(r)
        if not isinstance(r.get("name"), str) or not r["name"]:
            raise _err(f"{rp}.name", f"must be a non-empty string, got {r.get('name')!r}")
        w = r.setdefault("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf"):
            raise _err(f"{rp}.weight", f"must be a finite number >= 0, got {w!r}")
        if "layers" in r:
            layers = r["layers"]
            if not isinstance(layers, list):
                raise _err(f"{rp}.layers", f"must be a list of module names, got {type(layers).__name__}")
            for j, name in enumerate(layers):
                if not isinstance(name, str) or not name:
                    raise _err(f"{rp}.layers[{j}]", f"must be a non-empty module name, got {name!r}")
                if mods is not None and name not in mods:
                    known = _q.nncf_module_names(model)[:15]  # type: ignore[arg-type]
                    raise _err(f"{rp}.layers[{j}]",
                               f"no module {name!r} in {type(model).__name__}; modules include {known}")
        norm_regs.append(r)
    if model is not None and scopes:
        _q.make_ignored_scope(model, scopes, field=f"{path}.ignored_scopes")

    return {
        "input_info": {"sample_size": sample_size},
        "target_device": device,
        "compression": [{
            "algorithm": "quantization",
            "preset": preset,
            "initializer": {"range": {"num_init_samples": num_init}},
            "weights": {"bits": bits["weights"]},
            "activations": {"bits": bits["activations"]},
            "ignored_scopes": list(scopes),
            "target_device": device,
        }],
        "qat_plugins": {"regularizers": norm_regs, "keep_first_last_8bit": keep},
    }, path


def _check_input(model: nn.Module, sample_size: list[int], calibration_data: Any) -> None:
    items = _q._calibration_items(calibration_data, 1)
    x = _q._model_inputs(items[0])
    if isinstance(x, torch.Tensor) and list(x.shape[1:]) != sample_size[1:]:
        raise _err("input_info.sample_size",
                   f"{sample_size} does not match the calibration inputs, which have shape {[ 'N', *x.shape[1:]]}")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(sample_size))
    except Exception as e:  # noqa: BLE001 - any failure means the shape does not fit
        raise _err("input_info.sample_size", f"{type(model).__name__} cannot run an input of shape "
                   f"{sample_size} ({type(e).__name__}: {e})") from e
    finally:
        model.train(was)


def from_config(
    model: nn.Module,
    config: Mapping[str, Any] | str | os.PathLike[str],
    calibration_data: Any,
    *,
    regularizers_factory: Callable[[list[dict[str, Any]]], Any] | None = None,
) -> NNCFQATSetup:
    """Build an NNCF QAT model from a legacy-NNCF-style config (dict or JSON file path).

    Validates everything (``ValueError`` naming the field path), checks ``input_info.sample_size``
    against the model and the calibration data, then calls ``prepare_qat`` with the mapped arguments
    (table in the module docstring). ``regularizers_factory``, when given, is called once with the
    list of regularizer dicts; its result is stored in ``NNCFQATSetup.regularizers``. Nothing is
    attached to the model here.
    """
    _q._require_nncf()
    if regularizers_factory is not None and not callable(regularizers_factory):
        raise TypeError(f"regularizers_factory must be callable, got {type(regularizers_factory).__name__}")
    wrapped = _q._wrap_sequential(model, warn=False)  # names for validation; prepare_qat warns itself
    norm, path = _validate(config, wrapped)
    sample_size = norm["input_info"]["sample_size"]
    _check_input(model, sample_size, calibration_data)
    comp = norm["compression"][0]
    scope = _q.make_ignored_scope(wrapped, comp["ignored_scopes"], field=f"{path}.ignored_scopes") \
        if comp["ignored_scopes"] else None
    qmodel = _q.prepare_qat(
        model, calibration_data,
        weight_bits=comp["weights"]["bits"], act_bits=comp["activations"]["bits"],
        preset=comp["preset"], ignored_scope=scope, target_device=comp["target_device"],
        subset_size=comp["initializer"]["range"]["num_init_samples"],
        example_input=torch.zeros(sample_size),
        keep_first_last_8bit=norm["qat_plugins"]["keep_first_last_8bit"],
    )
    regs_cfg = copy.deepcopy(norm["qat_plugins"]["regularizers"])
    regularizers = list(regularizers_factory(copy.deepcopy(regs_cfg))) if regularizers_factory is not None else []
    return NNCFQATSetup(model=qmodel, regularizers_config=regs_cfg, nncf_config=norm,
                        input_shape=tuple(sample_size), regularizers=regularizers)
