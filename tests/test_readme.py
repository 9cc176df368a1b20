"""The README is executable: every Python block runs, every command it shows exists with the flags
it shows, every file and extra it names exists, and the cheap commands run on tiny settings.

Blocks are found generically (fenced ```python / ```bash / ```yaml blocks, in order), so the test
follows the README as it is edited. Python blocks run in one shared namespace, in README order (as
a reader would paste them), with the current directory set to a temporary one (so ``"model.onnx"``
lands there) and with the names a reader is expected to bring already defined (:func:`namespace`):

* ``fp_model``: a SmallResNet (width 8) trained on digits (a deep copy of the shared ``fp_resnet``);
* ``loader`` and ``calibration_loader``: five (x, y) batches of 64 real digits training images;
* ``test_loader``: a DataLoader over the 450 digits test images (batch 128).

Anything else a block uses must be defined by that block or an earlier one.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, source) of every fenced block of ``lang`` in README.md, in order."""
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


def shell_commands() -> list[tuple[int, str]]:
    """(line, command) for every command of the README's bash blocks: comments dropped, ``\\``
    continuations joined, ``&&`` chains split."""
    out = []
    for line0, src in blocks("bash"):
        joined, start = "", None
        for i, raw in enumerate(src.splitlines()):
            line = raw.split(" #", 1)[0].strip() if not raw.strip().startswith("#") else ""
            if not line:
                continue
            start = line0 + 1 + i if start is None else start
            if line.endswith("\\"):
                joined += line[:-1] + " "
                continue
            for cmd in (joined + line).split("&&"):
                out.append((start, cmd.strip()))
            joined, start = "", None
    return out


def _qat_plugins_argv(cmd: str) -> list[str] | None:
    """The qat-plugins arguments of a shell command (``qat-plugins ...``, ``python -m qat_plugins``,
    ``torchrun ... -m qat_plugins ...``), or None."""
    toks = shlex.split(cmd)
    if toks and toks[0] == "qat-plugins":
        return toks[1:]
    for i in range(len(toks) - 1):
        if toks[i] == "-m" and toks[i + 1] == "qat_plugins":
            return toks[i + 2:]
    return None


def _flags(tokens: list[str]) -> list[str]:
    """``--flag`` names in a usage line, brackets and ``=value`` removed."""
    return sorted({t.strip("[]").split("=")[0] for t in tokens if t.strip("[]").startswith("--")})


def _help(argv: list[str]) -> str:
    from qat_plugins.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's --help exits; main() may also return the code
            rc = e.code
    assert rc in (0, None), (argv, rc, err.getvalue())
    return out.getvalue()


def _cli(argv: list[str]) -> tuple[int, str, str]:
    from qat_plugins.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------------------- the parser
def test_the_readme_has_the_blocks_this_test_reads():
    assert len(blocks("python")) >= 2 and len(blocks("bash")) >= 3 and blocks("yaml")
    cmds = [c for _, c in shell_commands()]
    assert "python -m pytest -q" in cmds  # the README's test command
    assert any(c.startswith("qat-plugins demo") for c in cmds)


# --------------------------------------------------------------------------------------- Python blocks
@pytest.fixture
def namespace(fp_resnet, digits, tmp_path, monkeypatch):
    """The names a README reader brings (see the module docstring), built from real digits data."""
    monkeypatch.chdir(tmp_path)
    x, y = digits.train.tensors
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 320, 64)]
    return {
        "__name__": "__readme__",
        "fp_model": copy.deepcopy(fp_resnet),
        "loader": batches,
        "calibration_loader": batches,
        "test_loader": torch.utils.data.DataLoader(digits.test, batch_size=128),
    }


def test_every_python_block_runs(namespace):
    # the blocks draw from torch's global generator (CR's augmentation, FPQ's noise, ...): fix it
    torch.manual_seed(0)
    failures = []
    for line, src in blocks("python"):
        try:
            code = compile(src, f"README.md:{line}", "exec")
            with contextlib.redirect_stdout(io.StringIO()):
                exec(code, namespace)  # noqa: S102 - the README's own code
        except Exception as e:  # noqa: BLE001 - collect every failing block, then fail once
            tb = traceback.extract_tb(e.__traceback__)
            where = next((f"README.md:{line + f.lineno}" for f in reversed(tb) if f.filename.startswith("README")),
                         f"README.md:{line}")
            failures.append(f"block at line {line} ({where}): {type(e).__name__}: {e}")
    assert not failures, "README Python blocks that fail:\n" + "\n".join(failures)


def test_every_documented_python_name_exists():
    """Names in the prose (``qp.x``, ``qn.x``, ``qat_plugins.a.b``) resolve, e.g. ``qn.from_config``."""
    import importlib

    import qat_plugins as qp

    text = README.read_text()
    missing = []
    for name in sorted(set(re.findall(r"\bqp\.([A-Za-z_]\w*)", text))):
        if not hasattr(qp, name):
            missing.append(f"qp.{name}")
    if re.search(r"from qat_plugins\.integrations import nncf as qn", text):
        qn = importlib.import_module("qat_plugins.integrations.nncf")
        for name in sorted(set(re.findall(r"\bqn\.([A-Za-z_]\w*)", text))):
            if not hasattr(qn, name):
                missing.append(f"qn.{name}")
    # the first cells of markdown tables name config fields (``qat_plugins.train`` of the NNCF JSON);
    # a leading "." or "/" makes it a file name (``.qat_plugins.lock``)
    prose = re.sub(r"(?m)^\|[^|\n]*\|", "|", text)
    for dotted in sorted(set(re.findall(r"(?<![\w./-])qat_plugins(?:\.[A-Za-z_]\w*)+", prose))):
        parts = dotted.split(".")
        obj, i = None, len(parts)
        while i > 0:  # longest importable module prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                i -= 1
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            missing.append(dotted)
    assert not missing, f"names the README documents that do not exist: {missing}"


def test_yaml_blocks_are_valid_config():
    """Each YAML block is a valid fragment of a training config (validated by the real validator)."""
    from qat_plugins.training import load_config

    for line, src in blocks("yaml"):
        doc = yaml.safe_load(src)
        assert isinstance(doc, dict), line
        cfg = load_config(doc)  # raises ValueError naming the field on any bad entry
        if "regularizers" in doc:
            assert [r["name"] for r in cfg.to_dict()["regularizers"]] == [r["name"] for r in doc["regularizers"]]


# --------------------------------------------------------------------------------------- commands
def test_every_command_and_flag_exists():
    """``qat-plugins <cmd> --help`` lists every flag the README shows for that command."""
    problems = []
    for line, cmd in shell_commands():
        argv = _qat_plugins_argv(cmd)
        if argv is None:
            continue
        sub = next((t for t in argv if not t.startswith("-")), None)
        if sub is None:
            problems.append(f"line {line}: no subcommand in {cmd!r}")
            continue
        try:
            text = _help([sub, "--help"])
        except BaseException as e:  # noqa: BLE001
            problems.append(f"line {line}: qat-plugins {sub} --help fails: {e!r}")
            continue
        for flag in _flags(argv[argv.index(sub) + 1:]):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                problems.append(f"line {line}: qat-plugins {sub} has no {flag}")
    assert not problems, "\n".join(problems)


def test_console_script_and_module_entry_exist():
    proc = subprocess.run([sys.executable, "-m", "qat_plugins", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    subs = {(_qat_plugins_argv(c) or [None])[0] for _, c in shell_commands()} - {None}
    for sub in subs:
        assert re.search(rf"\b{sub}\b", proc.stdout), sub
    # the console script of pyproject's [project.scripts] points at the same main
    assert re.search(r'qat-plugins\s*=\s*"qat_plugins\.cli:main"', (ROOT / "pyproject.toml").read_text())


def test_other_commands_files_and_extras_exist():
    """pip extras, torchrun flags, pytest markers, repo files: everything else the commands name."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(project["project"]["optional-dependencies"])
    markers = " ".join(project["tool"]["pytest"]["ini_options"]["markers"])
    text = README.read_text()
    problems = []
    torchrun_help = None
    for line, cmd in shell_commands():
        for extra in re.findall(r"\.\[(\w+)\]", cmd):
            if extra not in extras:
                problems.append(f"line {line}: no extra [{extra}] in pyproject.toml")
        toks = shlex.split(cmd)
        if toks and toks[0] == "torchrun":
            if torchrun_help is None:
                torchrun_help = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--help"],
                                               capture_output=True, text=True, timeout=120).stdout
            for flag in _flags(toks[1:toks.index("-m")] if "-m" in toks else toks[1:]):
                if flag not in torchrun_help:
                    problems.append(f"line {line}: torchrun has no {flag}")
        if toks[:3] == ["python", "-m", "pytest"] and "-m" in toks[3:]:
            marker = toks[3:][toks[3:].index("-m") + 1]
            if f"{marker}:" not in markers:
                problems.append(f"line {line}: no pytest marker {marker!r}")
        if toks[:1] == ["bash"] and not (ROOT / toks[1]).is_file():
            problems.append(f"line {line}: no file {toks[1]}")
    # the README's own test command is what CI runs
    ci = (ROOT / ".ci" / "run").read_text()
    for _, cmd in shell_commands():
        if cmd.startswith("python -m pytest -q") and cmd == "python -m pytest -q":
            assert "run_pytest -q\n" in ci or "python -m pytest -q\n" in ci, "CI does not run the README's test command"
    # files the README names: examples/..., links to local files
    named = set(re.findall(r"\b(examples/[\w./-]+\.\w+)", text))
    named |= {p for p in re.findall(r"\]\(([^)#:]+)\)", text)}
    named |= set(re.findall(r"`((?:docs|benchmarks)/[\w./-]+\.\w+)`", text))
    for p in sorted(named):
        if not (ROOT / p).exists():
            problems.append(f"README names {p}, which does not exist")
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    """``qat-plugins train --config examples/train_config.yaml`` on a tiny copy of that config."""
    d = tmp_path_factory.mktemp("readme_train")
    cfg = yaml.safe_load((ROOT / "examples" / "train_config.yaml").read_text())
    cfg["data"]["limit_train"] = 128
    cfg["model"]["width"] = 4
    # the example's 15 FP epochs (~1 s here): a chance-level model has near-tied logits, whose top-1
    # flips on ORT-vs-PyTorch rounding ties and makes the agreement check meaningless
    cfg["fp"]["epochs"] = 15
    cfg["qat"]["epochs"] = 1
    cfg["progress"] = False
    cfg["output_dir"] = str(d / "train")
    path = d / "train_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cwd = os.getcwd()
    os.chdir(d)  # relative outputs of the command stay in the scratch directory
    try:
        rc, out, err = _cli(["-q", "train", "--config", str(path)])
    finally:
        os.chdir(cwd)
    return d, rc, out, err


def test_train_export_validate_commands_run(tiny_train, monkeypatch):
    """The README's train -> export -> validate commands, as written, on a tiny config."""
    d, rc, _, err = tiny_train
    monkeypatch.chdir(d)  # any relative path a command writes lands in the scratch directory
    assert rc == 0, err
    ckpt = d / "train" / "checkpoint.pt"
    assert ckpt.is_file() and json.loads((d / "train" / "results.json").read_text())["steps"] == 2  # 128 / 64
    cmds = [c for _, c in shell_commands()]
    export = next(c for c in cmds if (_qat_plugins_argv(c) or [""])[0] == "export")
    validate = next(c for c in cmds if (_qat_plugins_argv(c) or [""])[0] == "validate")
    onnx_path = d / "model.onnx"

    def substitute(argv: list[str]) -> list[str]:
        # the README's placeholders -> this run's files (FILE, DIR, ... -> files in the scratch
        # directory); "[--json]"-style optional flags are used
        out = []
        for a in (t.strip("[]") for t in argv):
            if a.endswith("checkpoint.pt"):
                a = str(ckpt)
            elif a.endswith(".onnx"):
                a = str(onnx_path)
            elif re.fullmatch(r"[A-Z][A-Z_]*", a):
                a = str(d / f"placeholder_{a.lower()}")
            out.append(a)
        return out

    rc, out, err = _cli(substitute(_qat_plugins_argv(export)))
    assert rc == 0 and onnx_path.is_file(), err
    argv = substitute(_qat_plugins_argv(validate))
    rc, out, err = _cli(argv)
    assert rc == 0, err
    if "--json" in argv:  # the exported model ran in ORT on the whole test split
        report = json.loads(out)
        assert report["num_samples"] == 450 and report["size_bytes"] == onnx_path.stat().st_size
