"""``TrainConfig``: the training run as one validated YAML / JSON document.

Every field is checked when the config is loaded; an error names the field and says what is allowed,
e.g. ``qat.weight_bits: must be an int from 2 to 8, got 9``. Regularizer entries are validated by
building them. Every field with its default: ``examples/train_config.yaml``; the schema and the YAML
rules (duplicate keys, ``1e-3``): docs/reliability.md. An NNCF-style JSON (top-level ``compression``
or ``input_info``) loads as an :class:`NNCFStyleConfig` for the NNCF integration.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..models import MODELS

__all__ = [
    "TrainConfig", "DataConfig", "ModelConfig", "FPConfig", "QATConfig", "NNCFStyleConfig",
    "load_config", "read_config_file", "is_nncf_config", "update_config", "config_hash", "config_diff",
    "RESULT_NEUTRAL_FIELDS", "as_train_config", "EXPORT_FORMATS",
]

# Fields that do not change what a run computes: ignored by the checkpoint compatibility check.
RESULT_NEUTRAL_FIELDS = ("output_dir", "progress", "checkpoint_every", "export")
EXPORT_FORMATS = ("int8", "int4", "fp32")


@dataclass
class DataConfig:
    name: str = "digits"
    data_dir: str | None = None
    batch_size: int = 64
    size: int = 8
    limit_train: int | None = None
    num_classes: int | None = None


@dataclass
class ModelConfig:
    name: str = "resnet"
    width: int = 16


@dataclass
class FPConfig:
    epochs: int = 15
    lr: float = 0.01
    optimizer: str = "adam"
    weight_decay: float = 0.0
    augment: bool = True


@dataclass
class QATConfig:
    weight_bits: int = 4
    act_bits: int = 4
    mode: str = "eager"
    epochs: int = 6
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-5
    schedule: str = "cosine"
    keep_first_last_8bit: bool = True
    per_channel: bool = True
    learnable: bool = True
    augment: bool = True
    snap_biases: bool = True
    bn: dict[str, Any] = field(default_factory=lambda: dict(BN_DEFAULTS))


@dataclass
class TrainConfig:
    """A validated training run; build it with :func:`load_config` (or construct and pass to it)."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fp: FPConfig = field(default_factory=FPConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    regularizers: list[dict[str, Any]] = field(default_factory=list)
    output_dir: str | None = "runs/train"
    checkpoint_every: int = 0
    nan_policy: str = "raise"
    max_skipped: int = 10
    num_threads: int | None = 1
    progress: bool = True
    export: list[str] = field(default_factory=list)

    kind = "qat_plugins"  # class attribute (not a field): tells it apart from NNCFStyleConfig

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML / JSON serialisable); ``load_config`` of it gives an equal config."""
        return copy.deepcopy(dataclasses.asdict(self))

    def hash(self) -> str:
        return config_hash(self)


@dataclass(frozen=True)
class NNCFStyleConfig:
    """An NNCF-style config document, routed to ``qat_plugins.integrations.nncf``."""

    raw: dict[str, Any]
    path: str | None = None
    kind: str = "nncf"


_SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "fp": FPConfig, "qat": QATConfig}


# --- field validators: (where, value) -> value ------------------------------------------------------
def _int(lo: int | None = None, hi: int | None = None, *, optional: bool = False) -> Callable[[str, Any], Any]:
    if lo is not None and hi is not None:
        desc = f"an int from {lo} to {hi}"
    elif lo is not None:
        desc = f"an int >= {lo}"
    else:
        desc = "an int"
    if optional:
        desc += " or null"

    def check(where: str, v: Any) -> Any:
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"{where}: must be {desc}, got {v!r}")
        return int(v)
    return check


def _float(lo: float = 0.0, *, lo_open: bool = False, hi: float | None = None,
           hi_open: bool = True) -> Callable[[str, Any], Any]:
    if hi is not None:
        desc = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    else:
        desc = f"a number {'>' if lo_open else '>='} {lo:g}"

    def check(where: str, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{where}: must be {desc}, got {v!r}")
        bad_lo = v <= lo if lo_open else v < lo
        bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
        if bad_lo or bad_hi:
            raise ValueError(f"{where}: must be {desc}, got {v!r}")
        return float(v)
    return check


def _bool(where: str, v: Any) -> Any:
    if not isinstance(v, bool):
        raise ValueError(f"{where}: must be true or false, got {v!r}")
    return v


def _choice(*choices: str) -> Callable[[str, Any], Any]:
    def check(where: str, v: Any) -> Any:
        if v not in choices:
            raise ValueError(f"{where}: must be one of {', '.join(choices)}; got {v!r}")
        return v
    return check


def _formats(where: str, v: Any) -> Any:
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or any(f not in EXPORT_FORMATS for f in items) or \
            len(set(items)) != len(items):
        raise ValueError(f"{where}: must be a list of distinct formats from {', '.join(EXPORT_FORMATS)} "
                         f"(or one of them, or null), got {v!r}")
    return list(items)


def _path(*, optional: bool = True) -> Callable[[str, Any], Any]:
    def check(where: str, v: Any) -> Any:
        if v is None and optional:
            return None
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{where}: must be a path (non-empty string){' or null' if optional else ''}, got {v!r}")
        return v
    return check


_FIELDS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "data": {"name": _choice("digits", "fashion-mnist", "idx"), "data_dir": _path(), "batch_size": _int(2, 65536),
             "size": _int(8, 256), "limit_train": _int(2, optional=True),
             "num_classes": _int(2, 100000, optional=True)},
    "model": {"name": _choice(*MODELS), "width": _int(1, 1024)},
    "fp": {"epochs": _int(0, 100000), "lr": _float(0.0, lo_open=True), "optimizer": _choice("adam", "sgd"),
           "weight_decay": _float(0.0), "augment": _bool},
    "qat": {"weight_bits": _int(2, 8), "act_bits": _int(2, 8), "mode": _choice("eager", "fx", "pt2e"),
            "epochs": _int(1, 100000), "lr": _float(0.0, lo_open=True), "momentum": _float(0.0, hi=1.0),
            "weight_decay": _float(0.0), "schedule": _choice("cosine", "constant"),
            "keep_first_last_8bit": _bool, "per_channel": _bool, "learnable": _bool, "augment": _bool,
            "snap_biases": _bool, "bn": lambda where, v: _bn_section(where, v)},
    "": {"seed": _int(0, 2**31 - 1), "output_dir": _path(), "checkpoint_every": _int(0),
         "nan_policy": _choice("raise", "skip"), "max_skipped": _int(0), "num_threads": _int(1, 1024, optional=True),
         "progress": _bool, "export": _formats},
}
# qat.bn defaults (project choice, measured in docs/bn.md): no freeze, re-estimate on 10 clean batches
BN_DEFAULTS: dict[str, Any] = {"freeze_after_epochs": None, "reestimate_batches": 10}
_BN_FIELDS = {"freeze_after_epochs": _int(0, 100000, optional=True), "reestimate_batches": _int(0, 100000)}


def _bn_section(where: str, v: Any) -> dict[str, Any]:
    if v is None:
        return dict(BN_DEFAULTS)
    if not isinstance(v, Mapping):
        raise ValueError(f"{where}: must be a mapping of {', '.join(_BN_FIELDS)}; got {type(v).__name__}")
    _check_keys(v, list(_BN_FIELDS), where)
    return {**BN_DEFAULTS, **{k: _BN_FIELDS[k](f"{where}.{k}", x) for k, x in v.items()}}


_TOP_KEYS = list(_FIELDS[""]) + list(_SECTIONS) + ["regularizers"]


def _check_keys(raw: Mapping[str, Any], allowed: list[str], where: str) -> None:
    for key in raw:
        if key not in allowed:
            name = f"{where}.{key}" if where else str(key)
            raise ValueError(f"{name}: unknown key; allowed keys{' in ' + where if where else ''}: {', '.join(allowed)}")


def _section(name: str, raw: Any) -> Any:
    cls = _SECTIONS[name]
    if raw is None:
        raw = {}
    if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
        raw = dataclasses.asdict(raw)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{name}: must be a mapping of {', '.join(_FIELDS[name])}; got {type(raw).__name__}")
    _check_keys(raw, list(_FIELDS[name]), name)
    values = {k: _FIELDS[name][k](f"{name}.{k}", v) for k, v in raw.items()}
    return cls(**values)


def _regularizers(raw: Any) -> list[dict[str, Any]]:
    from ..regularizers import build_regularizers

    if raw is None:
        return []
    if isinstance(raw, (list, tuple)):
        for i, spec in enumerate(raw):
            if isinstance(spec, Mapping):
                for key, value in spec.items():
                    _finite_option(f"regularizers[{i}].{key}", value)
    build_regularizers(raw, where="regularizers")  # validates every entry (errors name the field)
    return [copy.deepcopy(dict(spec)) for spec in raw]


def _finite_option(where: str, v: Any) -> None:
    """NaN / inf anywhere in a regularizer option is an error at load time (not after FP training)."""
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{where}: must be a finite number, got {v!r}")
    if isinstance(v, (list, tuple)):
        for j, x in enumerate(v):
            _finite_option(f"{where}[{j}]", x)
    if isinstance(v, Mapping):
        for k, x in v.items():
            _finite_option(f"{where}.{k}", x)


def _from_mapping(raw: Mapping[str, Any]) -> TrainConfig:
    _check_keys(raw, _TOP_KEYS, "")
    kw: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            kw[key] = _section(key, value)
        elif key == "regularizers":
            kw[key] = _regularizers(value)
        else:
            kw[key] = _FIELDS[""][key](key, value)
    cfg = TrainConfig(**kw)
    if cfg.data.name == "idx" and not cfg.data.data_dir:
        raise ValueError("data.data_dir: required when data.name is 'idx' (a directory of MNIST-layout idx files)")
    if cfg.data.num_classes is not None and cfg.data.name != "idx":
        raise ValueError(f"data.num_classes: only for data.name 'idx' ({cfg.data.name!r} has 10 classes); remove it")
    if cfg.data.name != "digits" and cfg.data.size != 8:
        raise ValueError(f"data.size: only the embedded 'digits' can be resized; remove it for data.name "
                         f"{cfg.data.name!r} (got {cfg.data.size})")
    return cfg


def is_nncf_config(cfg_dict: Any) -> bool:
    """True for an NNCF-style config document (top-level ``compression`` or ``input_info``)."""
    return isinstance(cfg_dict, Mapping) and ("compression" in cfg_dict or "input_info" in cfg_dict)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a YAML (``.yaml`` / ``.yml``) or JSON file into a dict; errors name the file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {p} does not exist; check the path (e.g. examples/train_config.yaml)")
    if not p.is_file():
        raise ValueError(f"config file {p} is not a regular file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read config file {p}: {e}") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text, object_pairs_hook=_no_duplicate_pairs)
        else:
            data = _load_yaml(text)
    except Exception as e:  # noqa: BLE001 - yaml / json parse errors of any kind
        detail = " ".join(str(e).split())
        raise ValueError(f"cannot parse config file {p}: {detail}") from None
    if data is None:
        raise ValueError(f"config file {p} is empty")
    if not isinstance(data, dict):
        raise ValueError(f"config file {p}: the top level must be a mapping of settings, got {type(data).__name__}")
    return data


_YAML_FLOAT = re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$"  # 1e-3, 2.5E+4, 1_000.5
                         r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")


def _no_duplicate_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}; a JSON key may appear once per object")
        out[k] = v
    return out


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that rejects duplicate keys (naming key and line) and reads ``1e-3`` as a number."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping_checked(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:  # the mapping's own keys (a merge `<<:` may be overridden)
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: let the constructor report it
                continue
            if first is not None:
                raise ValueError(f"duplicate key {key!r} on line {line} (first on line {first}); a YAML key "
                                 "may appear once per mapping")
            lines[key] = line
        loader.flatten_mapping(node)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=True)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping_checked)
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789."))
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | TrainConfig) -> TrainConfig | NNCFStyleConfig:
    """Load and validate a config from a YAML / JSON file, a dict or a ``TrainConfig``.

    Returns a :class:`TrainConfig`, or an :class:`NNCFStyleConfig` (``kind == "nncf"``) when the
    document is an NNCF-style config (see :func:`is_nncf_config`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unparseable file, unknown key, or a bad value (the message names the field).
    """
    path: str | None = None
    if isinstance(source, TrainConfig):
        raw: Any = source.to_dict()
    elif isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        raw = read_config_file(path)
    else:
        raise TypeError(f"config must be a file path, a dict or a TrainConfig, got {type(source).__name__}")
    if is_nncf_config(raw):
        return NNCFStyleConfig(raw=raw, path=path)
    try:
        return _from_mapping(raw)
    except ValueError as e:
        if path is not None:
            raise ValueError(f"{path}: {e}") from None
        raise


def as_train_config(cfg: Any) -> TrainConfig:
    """Validate ``cfg`` (TrainConfig / dict / path) and insist on a qat_plugins config."""
    out = load_config(cfg)
    if not isinstance(out, TrainConfig):
        raise ValueError("this is an NNCF-style config (top-level 'compression' / 'input_info'); run it with "
                         "`qat-plugins train --config FILE` or qat_plugins.integrations.nncf")
    return out


def update_config(cfg: TrainConfig | Mapping[str, Any], changes: Mapping[str, Any]) -> TrainConfig:
    """A validated copy of ``cfg`` with dotted-path changes, e.g. ``{"qat.epochs": 1, "seed": 3}``."""
    d = as_train_config(cfg).to_dict()
    for key, value in changes.items():
        parts = key.split(".")
        node = d
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], dict):
                raise ValueError(f"{key}: unknown config section {part!r}")
            node = node[part]
        node[parts[-1]] = value
    return as_train_config(d)


_as_train_config = as_train_config  # the former private name (kept for callers outside training/)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _result_relevant(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in RESULT_NEUTRAL_FIELDS}


def config_hash(cfg: TrainConfig | Mapping[str, Any]) -> str:
    """SHA-256 of the fields that change what a run computes (not output_dir / progress / checkpoint_every)."""
    d = cfg.to_dict() if isinstance(cfg, TrainConfig) else dict(cfg)
    blob = json.dumps(_result_relevant(d), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, value_in_a, value_in_b)`` for every result-relevant field that differs."""
    fa, fb = _flatten(_result_relevant(a)), _flatten(_result_relevant(b))
    missing = object()
    out = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, missing), fb.get(key, missing)
        if va != vb:
            out.append((key, None if va is missing else va, None if vb is missing else vb))
    return out
