"""Hostile inputs, round two: one line ``qat-plugins: error: ...`` naming the field or file, exit 2, nothing lost.

The table ``CASES`` (also in docs/reliability.md) runs in process through ``qat_plugins.cli.main``; each
case must fail before any training where the input allows it. After each case every file under the
case's directory and the shared finished run is byte-identical and no file was added. The process
cases (two runs on one directory, a stale lock, disk full, SIGTERM, a SIGKILLed export) are in
``test_processes.py``.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml

from qat_plugins.cli import main

from cli_files import BASE, Ctx, config_file, error_lines, snapshot, write_idx

def _cfg_file(tmp: Path, name: str = "c.yaml", **changes: Any) -> Path:
    """BASE with dotted-path changes, output_dir tmp/out."""
    return config_file(BASE, tmp, name, **changes)


def _text(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path



def _idx_dir(tmp: Path, name: str = "idx", *, train_labels: Any = None, label_code: int = 8,
             train_images: np.ndarray | None = None, test_images: np.ndarray | None = None,
             image_code: int = 8) -> Path:
    d = tmp / name
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte", np.zeros((20, 8, 8)) if train_images is None else train_images, image_code)
    labels = np.arange(20) % 10 if train_labels is None else np.asarray(train_labels)
    write_idx(d / "train-labels-idx1-ubyte", labels, label_code)
    write_idx(d / "t10k-images-idx3-ubyte", np.zeros((10, 8, 8)) if test_images is None else test_images)
    write_idx(d / "t10k-labels-idx1-ubyte", np.arange(10) % 10)
    return d


def _idx_cfg(tmp: Path, d: Path) -> Path:
    return _cfg_file(tmp, **{"data.name": "idx", "data.data_dir": str(d)})


def _nncf_training_ckpt(t: Path, c: Ctx) -> Path:
    """A training checkpoint as an NNCF config run writes it (NNCF's model config under ``extra``)."""
    state = torch.load(c.ckpt, weights_only=True)
    state["extra"] = {"format": "qat_plugins.nncf_run/1", "nncf_config": {"quantizers": []}}
    torch.save(state, t / "nncf_run.pt")
    return t / "nncf_run.pt"


def _nncf_model_ckpt(t: Path) -> Path:
    """A file shaped like ``qat_plugins.integrations.nncf.save_checkpoint``'s ``nncf_qat.pt``."""
    torch.save({"format": "qat_plugins.nncf/1", "nncf_version": "3.4.0", "nncf_config": {},
                "state_dict": {"w": torch.ones(1)}}, t / "nncf_qat.pt")
    return t / "nncf_qat.pt"


def _locked_dir(t: Path, host: str | None = None, pid: int | None = None) -> Path:
    d = t / "locked"
    d.mkdir()
    info = {"pid": pid if pid is not None else os.getpid(), "host": host or socket.gethostname(),
            "pid_start": None, "started": "2026-01-01 00:00:00", "token": "x"}
    (d / ".qat_plugins.lock").write_text(json.dumps(info))
    return d


NAN_REG = "regularizers:\n  - {name: cr, temperature: .nan}\n"

# (id, argv(tmp, ctx) -> list, fragments that must all be in the error line)
Case = tuple[str, Callable[[Path, Ctx], list], list[str]]
CASES: list[Case] = [
    # --- config: YAML / JSON parsing ---------------------------------------------------------------------
    ("duplicate top-level key", lambda t, c: ["train", "--config", _text(t / "d.yaml", "seed: 1\nseed: 2\n")],
     ["d.yaml", "duplicate key 'seed' on line 2 (first on line 1)"]),
    ("duplicate nested key", lambda t, c: ["train", "--config", _text(
        t / "d.yaml", "qat:\n  weight_bits: 2\n  act_bits: 2\n  weight_bits: 4\n")],
     ["duplicate key 'weight_bits' on line 4 (first on line 2)"]),
    ("duplicate key in JSON", lambda t, c: ["train", "--config", _text(t / "d.json", '{"seed": 1, "seed": 2}')],
     ["d.json", "duplicate key 'seed'"]),
    ("duplicate regularizer option", lambda t, c: ["train", "--config", _text(
        t / "d.yaml", "regularizers:\n  - name: cr\n    weight: 1\n    weight: 2\n")],
     ["duplicate key 'weight' on line 4"]),
    ("empty config file", lambda t, c: ["train", "--config", _text(t / "e.yaml", "")], ["e.yaml is empty"]),
    ("config is a list", lambda t, c: ["train", "--config", _text(t / "l.yaml", "- 1\n- 2\n")],
     ["l.yaml: the top level must be a mapping", "list"]),
    ("config is a directory", lambda t, c: ["train", "--config", t], ["is not a regular file"]),
    ("config not UTF-8", lambda t, c: ["train", "--config", _text(t / "b.yaml", b"\xff\xfe\x00garbage")],
     ["cannot read config file", "b.yaml"]),
    ("YAML tab indentation", lambda t, c: ["train", "--config", _text(t / "tab.yaml", "qat:\n\tepochs: 2\n")],
     ["cannot parse config file", "tab.yaml"]),
    # --- config: values ---------------------------------------------------------------------------------------
    ("NaN learning rate", lambda t, c: ["train", "--config", _text(t / "n.yaml", "qat: {lr: .nan}\n")],
     ["qat.lr: must be a number > 0, got nan"]),
    ("inf FP learning rate", lambda t, c: ["train", "--config", _text(t / "n.yaml", "fp: {lr: .inf}\n")],
     ["fp.lr: must be a number > 0, got inf"]),
    ("CR temperature NaN", lambda t, c: ["train", "--config", _text(t / "n.yaml", NAN_REG)],
     ["regularizers[0].temperature:", "finite", "nan"]),
    ("FPQ eps inf (second entry)", lambda t, c: ["train", "--config", _text(
        t / "n.yaml", "regularizers:\n  - {name: cr}\n  - {name: fpq, eps: .inf}\n")],
     ["regularizers[1].eps:", "finite", "inf"]),
    ("BR temperature NaN", lambda t, c: ["train", "--config", _text(
        t / "n.yaml", "regularizers:\n  - {name: br, blocks: [conv1], temperature: .nan}\n")],
     ["regularizers[0].temperature:", "finite"]),
    ("string number option", lambda t, c: ["train", "--config", _cfg_file(t, regularizers=[{"name": "fpq", "p": "0.5"}])],
     ["regularizers[0].p:", "'0.5'"]),
    ("regularizer p out of range", lambda t, c: ["train", "--config", _cfg_file(t, regularizers=[{"name": "fpq", "p": 2}])],
     ["regularizers[0].p:", "got 2"]),
    ("regularizers not a list", lambda t, c: ["train", "--config", _cfg_file(t, regularizers={"name": "cr"})],
     ["regularizers: must be a list"]),
    ("regularizer entry a string", lambda t, c: ["train", "--config", _cfg_file(t, regularizers=["cr"])],
     ["regularizers[0]: must be a mapping"]),
    ("regularizer weight bool", lambda t, c: ["train", "--config", _cfg_file(t, regularizers=[{"name": "cr",
                                                                                        "weight": True}])],
     ["regularizers[0].weight:"]),
    ("regularizer unknown option", lambda t, c: ["train", "--config", _cfg_file(t, regularizers=[{"name": "cr", "tau": 1}])],
     ["regularizers[0].tau: unknown option for 'cr'"]),
    ("CR teacher unknown", lambda t, c: ["train", "--config", _cfg_file(t, regularizers=[{"name": "cr", "teacher": "x"}])],
     ["regularizers[0].teacher:"]),
    ("unknown top-level key", lambda t, c: ["train", "--config", _cfg_file(t, epochs=3)], ["epochs: unknown key"]),
    ("section not a mapping", lambda t, c: ["train", "--config", _cfg_file(t, qat=3)], ["qat: must be a mapping"]),
    ("seed negative", lambda t, c: ["train", "--config", _cfg_file(t, seed=-1)], ["seed: must be an int from 0"]),
    ("seed float", lambda t, c: ["train", "--config", _cfg_file(t, seed=1.5)], ["seed: must be an int", "1.5"]),
    ("batch size 0", lambda t, c: ["train", "--config", _cfg_file(t, **{"data.batch_size": 0})],
     ["data.batch_size: must be an int from 2 to 65536, got 0"]),
    ("batch size 1", lambda t, c: ["train", "--config", _cfg_file(t, **{"data.batch_size": 1})],
     ["data.batch_size: must be an int from 2 to 65536, got 1"]),
    ("limit_train 1", lambda t, c: ["train", "--config", _cfg_file(t, **{"data.limit_train": 1})],
     ["data.limit_train: must be an int >= 2 or null, got 1"]),
    ("idx with one training sample", lambda t, c: ["train", "--config", _idx_cfg(t, _idx_dir(
        t, train_images=np.zeros((1, 8, 8)), train_labels=[3]))],
     ["data.limit_train: 1 training sample(s) for 1 process(es)", "at least 2"]),
    ("JSON trailing comma", lambda t, c: ["train", "--config", _text(t / "t.json", '{"seed": 1,}')],
     ["cannot parse config file", "t.json"]),
    ("regularizer weight 1e400", lambda t, c: ["train", "--config", _text(
        t / "w.yaml", "regularizers:\n  - {name: cr, weight: 1e400}\n")],
     ["regularizers[0].weight: must be a finite number, got inf"]),
    ("regularizer layers a string", lambda t, c: ["train", "--config", _cfg_file(t, regularizers=[{"name": "cr",
                                                                                            "layers": "fc"}])],
     ["regularizers[0].layers:", "'fc'"]),
    ("seed 2**40", lambda t, c: ["train", "--config", _cfg_file(t, seed=2**40)], ["seed: must be an int from 0 to"]),
    ("resume without output_dir", lambda t, c: ["train", "--config", _cfg_file(t, output_dir=None), "--resume"],
     ["output_dir: needed to resume"]),
    ("batch size string", lambda t, c: ["train", "--config", _cfg_file(t, **{"data.batch_size": "64"})],
     ["data.batch_size:", "'64'"]),
    ("model name unknown", lambda t, c: ["train", "--config", _cfg_file(t, **{"model.name": "vgg"})],
     ["model.name: must be one of", "'vgg'"]),
    ("model width 0", lambda t, c: ["train", "--config", _cfg_file(t, **{"model.width": 0})], ["model.width:", "got 0"]),
    ("model width 5000", lambda t, c: ["train", "--config", _cfg_file(t, **{"model.width": 5000})],
     ["model.width:", "got 5000"]),
    ("idx without data_dir", lambda t, c: ["train", "--config", _cfg_file(t, **{"data.name": "idx"})],
     ["data.data_dir: required when data.name is 'idx'"]),
    ("data size 7", lambda t, c: ["train", "--config", _cfg_file(t, **{"data.size": 7})], ["data.size:", "got 7"]),
    ("size for fashion-mnist", lambda t, c: ["train", "--config", _cfg_file(t, **{"data.name": "fashion-mnist",
                                                                             "data.size": 16})],
     ["data.size: only the embedded 'digits'"]),
    ("num_classes for digits", lambda t, c: ["train", "--config", _cfg_file(t, **{"data.num_classes": 12})],
     ["data.num_classes: only for data.name 'idx'"]),
    ("nan_policy unknown", lambda t, c: ["train", "--config", _cfg_file(t, nan_policy="ignore")],
     ["nan_policy: must be one of raise, skip"]),
    ("max_skipped negative", lambda t, c: ["train", "--config", _cfg_file(t, max_skipped=-1)], ["max_skipped:"]),
    ("num_threads 0", lambda t, c: ["train", "--config", _cfg_file(t, num_threads=0)], ["num_threads:", "got 0"]),
    ("export format unknown", lambda t, c: ["train", "--config", _cfg_file(t, export=["onnx"])],
     ["export: must be a list of distinct formats", "'onnx'"]),
    ("export format twice", lambda t, c: ["train", "--config", _cfg_file(t, export=["int8", "int8"])], ["export:"]),
    ("output_dir empty string", lambda t, c: ["train", "--config", _cfg_file(t, output_dir="")],
     ["output_dir: must be a path"]),
    ("checkpoint_every negative", lambda t, c: ["train", "--config", _cfg_file(t, checkpoint_every=-1)],
     ["checkpoint_every:"]),
    ("optimizer unknown", lambda t, c: ["train", "--config", _cfg_file(t, **{"fp.optimizer": "rmsprop"})],
     ["fp.optimizer: must be one of adam, sgd"]),
    ("momentum 1.5", lambda t, c: ["train", "--config", _cfg_file(t, **{"qat.momentum": 1.5})], ["qat.momentum:"]),
    ("limit_train 0", lambda t, c: ["train", "--config", _cfg_file(t, **{"data.limit_train": 0})], ["data.limit_train:"]),
    ("progress a string", lambda t, c: ["train", "--config", _cfg_file(t, progress="yes")],
     ["progress: must be true or false"]),
    ("qat epochs 0", lambda t, c: ["train", "--config", _cfg_file(t, **{"qat.epochs": 0})], ["qat.epochs:", "got 0"]),
    # --- data --------------------------------------------------------------------------------------------------
    ("idx label 200", lambda t, c: ["train", "--config", _idx_cfg(t, _idx_dir(t, train_labels=[200] + [0] * 19))],
     ["train-labels-idx1-ubyte: label 200 at index 0 is outside [0, 10)", "data.num_classes"]),
    ("idx label -1", lambda t, c: ["train", "--config", _idx_cfg(t, _idx_dir(t, train_labels=[0] * 5 + [-1] + [0] * 14,
                                                                             label_code=9))],
     ["train-labels-idx1-ubyte: label -1 at index 5 is outside [0, 10)"]),
    ("idx float labels", lambda t, c: ["train", "--config", _idx_cfg(t, _idx_dir(t, train_labels=np.zeros(20),
                                                                                 label_code=0x0D))],
     ["train-labels-idx1-ubyte: labels must be a 1-d integer idx array"]),
    ("idx images 2-d", lambda t, c: ["train", "--config", _idx_cfg(t, _idx_dir(t, train_images=np.zeros((20, 64))))],
     ["train-images-idx3-ubyte: images must be a 3-d idx array", "(20, 64)"]),
    ("idx image sizes differ", lambda t, c: ["train", "--config", _idx_cfg(t, _idx_dir(
        t, test_images=np.zeros((10, 10, 10))))], ["train images are 8x8 but test images 10x10"]),
    ("idx images 2x2", lambda t, c: ["train", "--config", _idx_cfg(t, _idx_dir(
        t, train_images=np.zeros((20, 2, 2)), test_images=np.zeros((10, 2, 2))))], ["2x2 pixels are too small"]),
    ("idx NaN images", lambda t, c: ["train", "--config", _idx_cfg(t, _idx_dir(
        t, train_images=np.full((20, 8, 8), np.nan), image_code=0x0D))], ["images contain NaN/inf values"]),
    ("idx counts differ", lambda t, c: ["train", "--config", _idx_cfg(t, _idx_dir(t, train_labels=np.zeros(19)))],
     ["image and label counts differ"]),
    ("idx corrupt gzip", lambda t, c: ["train", "--config", _idx_cfg(t, _gz_broken(t))],
     ["data.data_dir:", "cannot read idx file", "train-images-idx3-ubyte.gz"]),
    ("data_dir is a file", lambda t, c: ["train", "--config", _cfg_file(t, **{"data.name": "idx",
                                                                         "data.data_dir": str(c.cfg)})],
     ["data.data_dir:", "does not exist"]),
    # --- memory -------------------------------------------------------------------------------------------
    ("out of memory (huge width and batch)", lambda t, c: ["train", "--config", _cfg_file(
        t, **{"model.name": "resnet", "model.width": 1024, "data.batch_size": 65536})],
     ["model.width: 1024 needs about", "GB", "lower model.width or data.batch_size"]),
    # --- command line: train --------------------------------------------------------------------------------
    ("nproc-per-node 0", lambda t, c: ["train", "--config", c.cfg, "--nproc-per-node", "0"],
     ["--nproc-per-node: expected an int from 1 to 256, got '0'"]),
    ("max-steps 1e3", lambda t, c: ["train", "--config", c.cfg, "--max-steps", "1e3"], ["--max-steps", "'1e3'"]),
    ("no command", lambda t, c: [], ["missing command"]),
    ("unknown command", lambda t, c: ["fit"], ["invalid choice: 'fit'"]),
    ("output dir is a file", lambda t, c: ["train", "--config", _cfg_file(t), "--output-dir", c.cfg],
     ["output directory", "run.yaml is a file, not a directory"]),
    ("resume: empty checkpoint", lambda t, c: ["train", "--config", c.cfg, "--output-dir", _ckpt_dir(t, b""),
                                               "--resume"],
     ["checkpoint.pt is truncated or corrupt (empty file)"]),
    ("resume: checkpoint is YAML", lambda t, c: ["train", "--config", c.cfg, "--output-dir", _ckpt_dir(t, b"a: 1\n"),
                                                 "--resume"],
     ["checkpoint.pt is truncated or corrupt"]),
    ("resume: checkpoint is a directory", lambda t, c: ["train", "--config", c.cfg, "--output-dir", _ckpt_as_dir(t),
                                                        "--resume"],
     ["--resume: no checkpoint", "checkpoint.pt"]),
    ("output dir locked by a live run", lambda t, c: ["train", "--config", _cfg_file(t), "--output-dir", _locked_dir(t)],
     ["locked is in use by another run (pid", "choose another output directory"]),
    ("output dir locked from another host", lambda t, c: ["train", "--config", _cfg_file(t), "--output-dir",
                                                          _locked_dir(t, host="other-host", pid=1)],
     ["in use by another run (pid 1 on host other-host", "delete", ".qat_plugins.lock"]),
    # --- command line: export -------------------------------------------------------------------------------
    ("export: checkpoint is a directory", lambda t, c: ["export", "--checkpoint", c.run, "--out", t / "m.onnx"],
     ["--checkpoint", "run is a directory", "did you mean", "run/checkpoint.pt"]),
    ("export: checkpoint is results.json", lambda t, c: ["export", "--checkpoint", c.results, "--out", t / "m.onnx"],
     ["results.json is a JSON file, not a qat_plugins training checkpoint"]),
    ("export: checkpoint is an ONNX file", lambda t, c: ["export", "--checkpoint", c.onnx, "--out", t / "m.onnx"],
     ["model.onnx is an ONNX file"]),
    ("export: checkpoint missing", lambda t, c: ["export", "--checkpoint", t / "nope.pt", "--out", t / "m.onnx"],
     ["--checkpoint", "nope.pt does not exist"]),
    ("export: NNCF run checkpoint", lambda t, c: ["export", "--checkpoint", _nncf_training_ckpt(t, c), "--out",
                                                  t / "m.onnx"],
     ["nncf_run.pt was written by an NNCF config run"]),
    ("export: NNCF model checkpoint", lambda t, c: ["export", "--checkpoint", _nncf_model_ckpt(t), "--out",
                                                    t / "m.onnx"],
     ["nncf_qat.pt is an NNCF checkpoint", "qat_plugins.integrations.nncf.load_checkpoint"]),
    ("export: out in a missing directory", lambda t, c: ["export", "--checkpoint", c.ckpt, "--out",
                                                         t / "nodir" / "m.onnx"],
     ["--out", "nodir does not exist"]),
    ("export: out exists", lambda t, c: ["export", "--checkpoint", c.ckpt, "--out", c.onnx],
     ["--out", "model.onnx exists; not overwriting it"]),
    ("export: out is a directory", lambda t, c: ["export", "--checkpoint", c.ckpt, "--out", t],
     ["--out", "is a directory"]),
    ("export: format int3", lambda t, c: ["export", "--checkpoint", c.ckpt, "--out", t / "m.onnx", "--format", "int3"],
     ["--format", "invalid choice: 'int3'"]),
    # --- command line: validate -------------------------------------------------------------------------------
    ("validate: json-out in a missing directory", lambda t, c: ["validate", c.onnx, "--checkpoint", c.ckpt,
                                                                "--json-out", t / "nodir" / "r.json"],
     ["--json-out", "nodir does not exist"]),
    ("validate: json-out exists", lambda t, c: ["validate", c.onnx, "--checkpoint", c.ckpt, "--json-out", c.results],
     ["--json-out", "results.json exists"]),
    ("validate: min-agreement 1.5", lambda t, c: ["validate", c.onnx, "--checkpoint", c.ckpt, "--min-agreement",
                                                  "1.5"],
     ["--min-agreement: expected a number from 0 to 1, got '1.5'"]),
    ("validate: ONNX file missing", lambda t, c: ["validate", t / "x.onnx", "--checkpoint", c.ckpt],
     ["ONNX file", "x.onnx does not exist"]),
    ("validate: ONNX is a directory", lambda t, c: ["validate", t, "--checkpoint", c.ckpt], ["is a directory"]),
    ("validate: ONNX file is junk", lambda t, c: ["validate", _text(t / "j.onnx", b"junk" * 10), "--checkpoint",
                                                  c.ckpt],
     ["j.onnx"]),
    ("validate: ONNX of another model", lambda t, c: ["validate", c.other_onnx, "--checkpoint", c.ckpt],
     ["other.onnx", "below --min-agreement 99.00%", "is this the ONNX file of that checkpoint"]),
    ("validate: checkpoint is a directory", lambda t, c: ["validate", c.onnx, "--checkpoint", c.run],
     ["--checkpoint", "is a directory"]),
    ("validate: NNCF model checkpoint", lambda t, c: ["validate", c.onnx, "--checkpoint", _nncf_model_ckpt(t)],
     ["nncf_qat.pt is an NNCF checkpoint"]),
]


def _gz_broken(t: Path) -> Path:
    d = _idx_dir(t, "gz")
    raw = (d / "train-images-idx3-ubyte").read_bytes()
    blob = gzip.compress(raw)
    (d / "train-images-idx3-ubyte").unlink()
    (d / "train-images-idx3-ubyte.gz").write_bytes(blob[:10] + b"\x00" * 20 + blob[30:])
    return d


def _ckpt_dir(t: Path, content: bytes) -> Path:
    d = t / "ck"
    d.mkdir()
    (d / "checkpoint.pt").write_bytes(content)
    return d


def _ckpt_as_dir(t: Path) -> Path:
    d = t / "ckd"
    (d / "checkpoint.pt").mkdir(parents=True)
    return d


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_one_line_exit_2_nothing_lost(case, ctx, tmp_path, capsys):
    _, make_argv, fragments = case
    argv = [str(a) for a in make_argv(tmp_path, ctx)]  # creates the case's files
    before = snapshot(tmp_path, ctx.root)
    t0 = time.perf_counter()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("qat-plugins: error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert snapshot(tmp_path, ctx.root) == before  # nothing overwritten, deleted or added
    assert time.perf_counter() - t0 < 60  # fails at validation time, not after training


def test_hostile_table_size():
    assert len(CASES) >= 60


# --- Python API: the same errors as exceptions with one-line messages ----------------------------------------
def _api(fn_name: str) -> Callable[[Path, Ctx], Any]:
    import qat_plugins.training as T

    def empty_eval(t: Path, c: Ctx) -> Any:
        from torch.utils.data import TensorDataset

        return T.evaluate(torch.nn.Linear(2, 2), TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))

    def nan_fp(t: Path, c: Ctx) -> Any:
        return T.load_config({**BASE, "fp": {"lr": float("nan")}})

    table: dict[str, Callable[[Path, Ctx], Any]] = {
        "run max_steps -1": lambda t, c: T.run(BASE, output_dir=t / "o", max_steps=-1),
        "run resume without output_dir": lambda t, c: T.run({**BASE, "output_dir": None}, resume=True),
        "run of a number": lambda t, c: T.run(42),  # type: ignore[arg-type]
        "run of an NNCF-style dict": lambda t, c: T.run({"compression": {"algorithm": "quantization"}}),
        "train_qat resume without checkpoint_path": lambda t, c: T.train_qat(
            torch.nn.Linear(2, 2), None, {**BASE, "output_dir": None}, resume=True),  # type: ignore[arg-type]
        "evaluate an empty dataset": empty_eval,
        "load_config NaN": nan_fp,
        "update_config unknown section": lambda t, c: T.update_config(BASE, {"optim.lr": 0.1}),
        "load_trained of a directory": lambda t, c: T.load_trained(c.run),
        "load_checkpoint of results.json": lambda t, c: T.load_checkpoint(c.results),
        "write_json into a missing directory": lambda t, c: T.write_json(t / "no" / "r.json", {}),
        "write_json over an existing file": lambda t, c: T.write_json(c.results, {}),
    }
    return table[fn_name]


API_CASES: list[tuple[str, type[BaseException], list[str]]] = [
    ("run max_steps -1", ValueError, ["max_steps must be an int >= 0, got -1"]),
    ("run resume without output_dir", ValueError, ["output_dir: needed to resume"]),
    ("run of a number", TypeError, ["config must be a file path, a dict or a TrainConfig, got int"]),
    ("run of an NNCF-style dict", ValueError, ["NNCF-style config"]),
    ("train_qat resume without checkpoint_path", ValueError, ["resume=True needs checkpoint_path"]),
    ("evaluate an empty dataset", ValueError, ["evaluate: the dataset is empty"]),
    ("load_config NaN", ValueError, ["fp.lr: must be a number > 0, got nan"]),
    ("update_config unknown section", ValueError, ["optim.lr: unknown config section 'optim'"]),
    ("load_trained of a directory", IsADirectoryError, ["is a directory", "checkpoint.pt"]),
    ("load_checkpoint of results.json", ValueError, ["results.json is a JSON file"]),
    ("write_json into a missing directory", FileNotFoundError, ["directory", "does not exist"]),
    ("write_json over an existing file", FileExistsError, ["results.json already exists"]),
]


@pytest.mark.parametrize("name, exc, fragments", API_CASES, ids=[c[0] for c in API_CASES])
def test_hostile_python_api_one_line(name, exc, fragments, ctx, tmp_path):
    before = snapshot(tmp_path, ctx.root)
    with pytest.raises(exc) as e:
        _api(name)(tmp_path, ctx)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    assert snapshot(tmp_path, ctx.root) == before


# --- config parsing that must be accepted -----------------------------------------------------------------
def test_yaml_merge_keys_may_be_overridden(tmp_path):
    from qat_plugins.training import load_config

    p = _text(tmp_path / "m.yaml", "regularizers:\n  - &cr {name: cr, weight: 0.5}\n  - {<<: *cr, name: fpq}\n")
    # a merged key overridden by the mapping's own key is YAML merge semantics, not a duplicate
    assert load_config(p).regularizers == [{"name": "cr", "weight": 0.5}, {"name": "fpq", "weight": 0.5}]


def test_yaml_exponent_numbers_are_numbers(tmp_path):
    from qat_plugins.training import load_config

    p = _text(tmp_path / "e.yaml", "qat: {lr: 1e-3, weight_decay: 5E-5}\nfp: {lr: 2.5e-2}\n")
    cfg = load_config(p)
    # PyYAML's YAML 1.1 resolver reads "1e-3" as the string '1e-3'; ours must give the float 0.001 exactly
    assert cfg.qat.lr == 0.001 and cfg.qat.weight_decay == 5e-05 and cfg.fp.lr == 0.025
    assert yaml.safe_load("x: 1e-3")["x"] == "1e-3"  # the behaviour being fixed (independent reference)


# --- Python API -----------------------------------------------------------------------------------------------
def test_nan_calibration_batch_raises(digits):
    from qat_plugins.data import DataSplit
    from qat_plugins.models import SmallCNN
    from qat_plugins.training import load_config, prepare_student
    from torch.utils.data import TensorDataset

    x, y = digits.train.tensors[0][:64].clone(), digits.train.tensors[1][:64]
    x[3, 0, 2, 2] = float("nan")
    data = DataSplit(TensorDataset(x, y), digits.test, 10, "digits")
    cfg = load_config({**BASE, "output_dir": None})
    with pytest.raises(ValueError, match=r"data: the calibration batch \(the first 32 training samples\) contains "
                                         r"NaN/inf"):
        prepare_student(SmallCNN(width=4).eval(), data, cfg)


def test_write_json_refuses_nan(tmp_path):
    from qat_plugins.training import write_json

    with pytest.raises(ValueError, match=r"history\[1\]\.loss is NaN/inf"):
        write_json(tmp_path / "r.json", {"history": [{"loss": 1.0}, {"loss": float("nan")}]})
    assert not list(tmp_path.iterdir())


def test_nan_policy_skip_never_exits_0_with_nan(tmp_path, capsys):
    """Every batch non-finite under ``nan_policy: skip``: exit 2, no results.json (not NaN metrics, exit 0)."""
    from qat_plugins.regularizers import REGISTRY, Regularizer, register

    class NaNReg(Regularizer):
        name = "nanreg"

        def _attach(self) -> None:
            pass

        def _loss(self, inputs, targets, outputs, ctx):  # noqa: ANN001, ANN202 - Regularizer protocol
            return outputs.sum() * float("nan")

    register("nanreg", NaNReg)
    try:
        cfg = _cfg_file(tmp_path, regularizers=[{"name": "nanreg"}], nan_policy="skip", max_skipped=1000)
        rc = main(["-q", "train", "--config", str(cfg)])
    finally:
        REGISTRY.pop("nanreg", None)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert error_lines(err) == [ln for ln in err.splitlines() if ln.strip()]
    assert "all 2 batches were skipped for non-finite losses (nan_policy=skip)" in err
    assert not (tmp_path / "out" / "results.json").exists()
    assert (tmp_path / "out" / "checkpoint.pt").exists()  # the step-0 checkpoint (FP weights) is kept


def test_validate_passes_with_its_own_onnx_and_writes_json(ctx, tmp_path, capsys):
    rc = main(["validate", str(ctx.onnx), "--checkpoint", str(ctx.ckpt), "--json-out", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["top1_agreement"] >= 0.99
