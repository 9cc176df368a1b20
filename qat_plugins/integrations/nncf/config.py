"""The NNCF-style JSON config (legacy ``NNCFConfig`` layout) mapped onto :func:`prepare_qat` and a run.

:func:`validate_config` checks every field (``ValueError`` starting with the field path);
``qat_plugins.train`` is checked by :func:`qat_plugins.training.load_config`, the one training-config
validator. Field table and defaults: docs/nncf.md.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ...regularizers import Regularizer, RegularizerSet, attach, build_regularizers
from ...regularizers.registry import build_regularizer
from ...training.config import TrainConfig, load_config
from ._compat import require_nncf, wrap_sequential
from .prepare import DEFAULT_SUBSET, calibration_items, make_ignored_scope, model_inputs, prepare_qat
from .quantizers import nncf_module_names

__all__ = ["NNCFQATSetup", "from_config", "validate_config", "validate_for_model", "prepare_from_config",
           "to_train_config", "TRAIN_FIELDS", "EXPORT_FORMATS"]

_TOP_KEYS = ("input_info", "compression", "target_device", "qat_plugins")
_COMPRESSION_KEYS = ("algorithm", "preset", "initializer", "weights", "activations", "ignored_scopes",
                     "target_device")
_QAT_PLUGINS_KEYS = ("regularizers", "keep_first_last_8bit", "train")
_DEVICES = ("ANY", "CPU", "GPU", "NPU")

# qat_plugins.train key -> (TrainConfig section ("" = top level), field, default). The value is checked
# by TrainConfig's own rule for that field; "export" is run_config's own (no TrainConfig field).
TRAIN_FIELDS: dict[str, tuple[str | None, str | None, Any]] = {
    "seed": ("", "seed", 0),
    "dataset": ("data", "name", "digits"),
    "data_dir": ("data", "data_dir", None),
    "limit_train": ("data", "limit_train", None),
    "batch_size": ("data", "batch_size", 64),
    "model": ("model", "name", "resnet"),
    "width": ("model", "width", 16),
    "fp_epochs": ("fp", "epochs", 15),
    "fp_lr": ("fp", "lr", 0.01),
    "epochs": ("qat", "epochs", 6),
    "lr": ("qat", "lr", 0.01),
    "momentum": ("qat", "momentum", 0.9),
    "weight_decay": ("qat", "weight_decay", 5e-5),
    "schedule": ("qat", "schedule", "cosine"),
    "augment": ("qat", "augment", False),
    "checkpoint_every": ("", "checkpoint_every", 0),
    "nan_policy": ("", "nan_policy", "raise"),
    "num_threads": ("", "num_threads", 1),
    "output_dir": ("", "output_dir", "runs/nncf"),
    "export": (None, None, "int8"),
}
EXPORT_FORMATS = ("int8", "int4")


@dataclass
class NNCFQATSetup:
    """What :func:`from_config` built.

    Attributes:
        model: the NNCF QAT model (train mode) with the regularizers' hooks attached.
        regularizers_config: the validated ``qat_plugins.regularizers`` entries.
        nncf_config: the normalized config (defaults filled in, ``compression`` as a one-element list,
            ``qat_plugins.train`` complete).
        input_shape: ``input_info.sample_size`` as a tuple.
        regularizers: the attached :class:`~qat_plugins.regularizers.RegularizerSet` (empty when the
            config lists none): ``regularizers.loss(x, y, out)`` each step, ``regularizers.detach()``
            (or ``with setup.regularizers:``) before export; ``state_dict()`` for checkpoints.
        fp_model: the float model given to :func:`from_config`, the regularizers' frozen teacher (eval
            mode and ``requires_grad=False`` until the regularizers are detached).
    """

    model: nn.Module
    regularizers_config: list[dict[str, Any]]
    nncf_config: dict[str, Any]
    input_shape: tuple[int, ...]
    regularizers: RegularizerSet | None = None
    fp_model: nn.Module | None = None


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

    Regularizer entries are checked by building them (:func:`qat_plugins.regularizers.build_regularizer`:
    known name, known options). With ``model``, module names in ``ignored_scopes`` and regularizer
    ``layers`` / ``blocks`` are checked too (ignored scopes need NNCF for that).
    """
    return _validate(config, model)[0]


def _check_module_names(names: Any, path: str, mods: dict[str, nn.Module] | None, model: nn.Module | None,
                        *, taps: bool) -> None:
    """``layers`` (``taps=True``: also ``"output"`` and ``"<module>:input"``) / ``blocks`` entries."""
    if isinstance(names, str) or not isinstance(names, list):
        raise _err(path, f"must be a list of module names, got {type(names).__name__}")
    for j, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise _err(f"{path}[{j}]", f"must be a non-empty module name, got {name!r}")
        base = name[:-len(":input")] if taps and name.endswith(":input") else name
        if taps and base == "output":
            continue
        if mods is not None and (base not in mods or base == ""):
            known = nncf_module_names(model)[:15]  # type: ignore[arg-type]
            raise _err(f"{path}[{j}]", f"no module {base!r} in {type(model).__name__}; modules include {known}")


def _regularizer_entries(regs: Any, model: nn.Module | None, *, build: bool) -> list[dict[str, Any]]:
    if not isinstance(regs, list):
        raise _err("qat_plugins.regularizers", f"must be a list of objects, got {type(regs).__name__}")
    mods = dict(model.named_modules()) if model is not None else None
    out = []
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
        if build:  # unknown name -> lists the known ones; unknown option -> lists the allowed ones
            build_regularizer(r, where=rp)
        for key in ("layers", "blocks"):
            if r.get(key) is not None:
                _check_module_names(r[key], f"{rp}.{key}", mods, model, taps=key == "layers")
        out.append(r)
    return out


def _train_section(raw: Any) -> dict[str, Any]:
    """``qat_plugins.train`` completed with the defaults and checked by the training-config validator."""
    path = "qat_plugins.train"
    _check_keys(raw, path, tuple(TRAIN_FIELDS))
    out = {key: raw.get(key, default) for key, (_s, _n, default) in TRAIN_FIELDS.items()}
    if out["export"] is not None and out["export"] not in EXPORT_FORMATS:
        raise _err(f"{path}.export", f"must be one of {', '.join(EXPORT_FORMATS)} or null, got {out['export']!r}")
    to_train_config(out)
    return out


def to_train_config(train: Mapping[str, Any], **qat: Any) -> TrainConfig:
    """The :class:`~qat_plugins.training.TrainConfig` of a ``qat_plugins.train`` section (``qat`` adds
    ``qat.*`` fields); errors name ``qat_plugins.train.<key>``."""
    d: dict[str, Any] = {"data": {}, "model": {}, "fp": {}, "qat": dict(qat)}
    where: dict[str, str] = {}
    for key, (section, name, _default) in TRAIN_FIELDS.items():
        if section is None:
            continue
        if section == "":
            d[name] = train[key]
            where[name] = key
        else:
            d[section][name] = train[key]
            where[f"{section}.{name}"] = key
    d["export"] = [train["export"]] if train.get("export") else []
    where["export"] = "export"
    try:
        cfg = load_config(d)
    except ValueError as e:
        msg = str(e)
        for field in sorted(where, key=len, reverse=True):
            if msg.startswith(field + ":") or msg.startswith(field + "["):
                raise _err(f"qat_plugins.train.{where[field]}", msg[len(field):].lstrip(":[ ")) from None
        raise
    assert isinstance(cfg, TrainConfig)
    return cfg


def _validate(config: Any, model: nn.Module | None, *,
              check_regularizers: bool = True) -> tuple[dict[str, Any], str]:
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
    num_init = DEFAULT_SUBSET
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
    norm_regs = _regularizer_entries(qp.get("regularizers", []), model, build=check_regularizers)
    train = _train_section(qp.get("train", {}))
    if model is not None and scopes:
        make_ignored_scope(model, scopes, field=f"{path}.ignored_scopes")

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
        "qat_plugins": {"regularizers": norm_regs, "keep_first_last_8bit": keep, "train": train},
    }, path


def _check_input(model: nn.Module, sample_size: list[int], calibration_data: Any) -> None:
    items = calibration_items(calibration_data, 1)
    x = model_inputs(items[0])
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
    """Build an NNCF QAT model from a legacy-NNCF-style config (dict or JSON file path), regularizers attached.

    Validates everything (``ValueError`` naming the field path), checks ``input_info.sample_size``
    against the model and the calibration data, builds the regularizers with
    ``regularizers_factory(entries)`` (default :func:`qat_plugins.regularizers.build_regularizers`;
    before quantizing, so a bad entry fails fast), calls ``prepare_qat`` with the mapped arguments
    (table in the module docstring) and attaches the regularizers to the QAT model with
    ``qat_plugins.attach(qat_model, regs, fp_model=model)``.

    ``model`` (the float model) is left unchanged apart from what ``attach`` does to a teacher: eval
    mode and ``requires_grad=False`` until ``setup.regularizers.detach()``. A custom
    ``regularizers_factory`` must return :class:`~qat_plugins.regularizers.Regularizer` instances;
    entry names and options are then its business (only ``name``, ``weight``, ``layers`` and
    ``blocks`` are checked here).
    """
    require_nncf()
    if regularizers_factory is not None and not callable(regularizers_factory):
        raise TypeError(f"regularizers_factory must be callable, got {type(regularizers_factory).__name__}")
    norm, path = validate_for_model(model, config, calibration_data, check_regularizers=regularizers_factory is None)
    regs_cfg = copy.deepcopy(norm["qat_plugins"]["regularizers"])
    if regularizers_factory is None:
        regs = build_regularizers(copy.deepcopy(regs_cfg), where="qat_plugins.regularizers")
    else:
        regs = list(regularizers_factory(copy.deepcopy(regs_cfg)))
        bad = [type(r).__name__ for r in regs if not isinstance(r, Regularizer)]
        if bad:
            raise TypeError(f"regularizers_factory must return qat_plugins Regularizer instances, got {bad}")
    qmodel = prepare_from_config(model, norm, path, calibration_data)
    regset = attach(qmodel, regs, fp_model=model)
    return NNCFQATSetup(model=qmodel, regularizers_config=regs_cfg, nncf_config=norm,
                        input_shape=tuple(norm["input_info"]["sample_size"]), regularizers=regset, fp_model=model)


def validate_for_model(model: nn.Module, config: Any, calibration_data: Any, *,
                  check_regularizers: bool = True) -> tuple[dict[str, Any], str]:
    """Validate ``config`` against ``model`` and the calibration data (no quantization yet)."""
    wrapped = wrap_sequential(model, warn=False)  # names for validation; prepare_qat warns itself
    norm, path = _validate(config, wrapped, check_regularizers=check_regularizers)
    _check_input(model, norm["input_info"]["sample_size"], calibration_data)
    return norm, path


def prepare_from_config(model: nn.Module, norm: dict[str, Any], path: str, calibration_data: Any) -> nn.Module:
    """``prepare_qat`` with the arguments of a normalized config (the one quantization code path)."""
    comp = norm["compression"][0]
    sample_size = norm["input_info"]["sample_size"]
    wrapped = wrap_sequential(model, warn=False)
    scope = make_ignored_scope(wrapped, comp["ignored_scopes"], field=f"{path}.ignored_scopes") \
        if comp["ignored_scopes"] else None
    return prepare_qat(
        model, calibration_data,
        weight_bits=comp["weights"]["bits"], act_bits=comp["activations"]["bits"],
        preset=comp["preset"], ignored_scope=scope, target_device=comp["target_device"],
        subset_size=comp["initializer"]["range"]["num_init_samples"],
        example_input=torch.zeros(sample_size),
        keep_first_last_8bit=norm["qat_plugins"]["keep_first_last_8bit"],
    )
