"""``qat-plugins`` command line (also ``python -m qat_plugins``).

Commands::

    qat-plugins train --config FILE [--resume] [--output-dir DIR] [--max-steps N]
    qat-plugins demo [--quick] [--output-dir DIR]
    qat-plugins export --checkpoint FILE --format int8|int4|fp32 --out FILE.onnx
    qat-plugins validate FILE.onnx --checkpoint FILE [--json] [--json-out FILE]
    qat-plugins bench [ARGS...]

User errors (bad config, missing or corrupt files, non-finite losses, bad flags, an output directory
that cannot be written or already holds results) print one line ``qat-plugins: error: <message>`` on
stderr and exit with status 2. Files already in an output directory are never overwritten, except
the run's own ``checkpoint.pt``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

__all__ = ["main", "run_demo", "DEMO_CONFIG", "DEMO_QUICK_CHANGES", "DEMO_REGULARIZERS"]

PROG = "qat-plugins"

# The demo: SmallResNet(width 16) on the embedded 8x8 digits, W4A4 LSQ with and without CR.
# Student inputs are not augmented during QAT (qat.augment: false): CR augments them itself, and its
# doubly augmented view of an already augmented 8x8 digit is a poor consistency target.
DEMO_CONFIG: dict[str, Any] = {
    "seed": 0,
    "data": {"name": "digits", "batch_size": 64},
    "model": {"name": "resnet", "width": 16},
    "fp": {"epochs": 15, "lr": 0.01, "optimizer": "adam", "weight_decay": 0.0, "augment": True},
    "qat": {"weight_bits": 4, "act_bits": 4, "mode": "eager", "epochs": 6, "lr": 0.01, "momentum": 0.9,
            "weight_decay": 5e-5, "schedule": "cosine", "augment": False},
    "output_dir": None,
    "num_threads": 1,
}
DEMO_QUICK_CHANGES: dict[str, Any] = {"fp.epochs": 2, "qat.epochs": 1, "data.limit_train": 512}
DEMO_REGULARIZERS: list[dict[str, Any]] = [{"name": "cr"}]  # ConsistencyRegularizer defaults
DEMO_EXPORT_FORMATS = ("int8", "int4")


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block
        if "required: COMMAND" in message:
            message = "missing command; choose one of train, demo, export, validate, bench"
        raise UsageError(f"{message} (see {self.prog} --help)")


def _user_errors() -> tuple[type[BaseException], ...]:
    from .regularizers import NonFiniteLossError

    return (UsageError, ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError, NonFiniteLossError)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg


def _rank() -> int:
    """Global rank under torchrun (``RANK``), else 0."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _fail(message: str) -> int:
    if os.environ.get("QAT_PLUGINS_DEBUG") and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    _error_line(message)
    return 2


def _error_line(message: str) -> None:
    """One ``qat-plugins: error:`` line in a single write (ranks sharing a pipe cannot interleave it)."""
    r = _rank()  # under torchrun every rank reports its own error; tag those of ranks > 0
    sys.stderr.write(f"{PROG}: error: {f'[rank {r}] ' if r else ''}{message}\n")
    sys.stderr.flush()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (works under redirection / capture)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("qat_plugins")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(h)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def _out(text: str = "") -> None:
    if _rank() == 0:  # results are printed once, by rank 0, under torchrun
        print(text, flush=True)


# --- train ---------------------------------------------------------------------------------------
def _cmd_train(args: argparse.Namespace) -> int:
    from .training import load_config, read_config_file, run
    from .training.config import is_nncf_config

    raw = read_config_file(args.config)
    if args.nproc_per_node is not None:
        if is_nncf_config(raw):
            raise ValueError("--nproc-per-node: NNCF-style configs run in a single process")
        load_config(args.config)  # one line in this process, before any worker starts
        return _launch_workers(args)
    if is_nncf_config(raw):
        return _run_nncf_config(args)
    cfg = load_config(args.config)
    result = run(cfg, output_dir=args.output_dir, resume=args.resume, max_steps=args.max_steps)
    out = args.output_dir or cfg.output_dir  # type: ignore[union-attr]
    if result.interrupted:
        _out(f"stopped after step {result.steps} (--max-steps); continue with: {PROG} train --config {args.config} "
             f"--resume" + (f" --output-dir {args.output_dir}" if args.output_dir else ""))
        return 0
    fp = result.fp_test_accuracy
    _out(f"FP test top-1 {100 * fp:.2f}%  |  QAT W{cfg.qat.weight_bits}A{cfg.qat.act_bits} test top-1 "  # type: ignore[union-attr]
         f"{100 * result.test_accuracy:.2f}%  |  {1000 * result.mean_step_time:.1f} ms/step")
    for rep in result.onnx:
        v = rep["validation"]
        _out(f"ONNX {rep['weight_format']}: ORT top-1 {100 * v['onnx_top1']:.2f}%, agreement with PyTorch "
             f"{100 * v['top1_agreement']:.2f}%" + (f"  ({rep['path']})" if rep["path"] else ""))
    if out:
        _out(f"results: {Path(out) / 'results.json'}  checkpoint: {Path(out) / 'checkpoint.pt'}")
    return 0


def _launch_workers(args: argparse.Namespace) -> int:
    """``train --nproc-per-node N``: torchrun's launcher on this machine, without its failure report.

    Each worker prints its own one-line error; a worker that dies without one (a signal) is reported here.
    """
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    argv = [a for a in args.raw_argv]
    i = argv.index("--nproc-per-node")
    del argv[i:i + 2]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.nproc_per_node, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    for name in list(logging.root.manager.loggerDict):  # its per-failure log lines repeat the workers' errors
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "qat_plugins", *argv)
    except ChildFailedError as e:
        codes = {r: f.exitcode for r, f in e.failures.items()}
        if 2 in codes.values():  # a worker reported a user error (the launcher then stops the others: SIGTERM)
            return 2
        if all(c in (130, 143) for c in codes.values()):  # each printed its own interruption line
            return max(codes.values())
        shown = ", ".join(f"rank {r}: {'signal ' + str(-c) if c < 0 else 'exit code ' + str(c)}"
                          for r, c in sorted(codes.items()))
        raise ValueError(f"training workers failed ({shown}); the output directory is intact: continue with "
                         "--resume") from None
    return 0


def _run_nncf_config(args: argparse.Namespace) -> int:
    """NNCF-style JSON configs go to ``qat_plugins.integrations.nncf.run_config``."""
    try:
        from .integrations import nncf as nncf_integration  # type: ignore[attr-defined]
    except ImportError as e:
        raise ValueError(f"{args.config} is an NNCF-style config (top-level 'compression' / 'input_info'), but the "
                         f"NNCF integration cannot be imported ({_one_line(e)}); install it with "
                         "pip install -e '.[nncf]'") from None
    run_config = getattr(nncf_integration, "run_config", None)
    if run_config is None:
        raise ValueError(f"{args.config} is an NNCF-style config, but qat_plugins.integrations.nncf has no "
                         "run_config() in this version")
    extra = {"max_steps": args.max_steps} if args.max_steps is not None else {}
    res = run_config(args.config, output_dir=args.output_dir, resume=args.resume, **extra)
    if isinstance(res, dict) and res.get("interrupted"):
        _out(f"stopped after step {res.get('steps')} (--max-steps); continue with: {PROG} train --config "
             f"{args.config} --resume" + (f" --output-dir {args.output_dir}" if args.output_dir else ""))
    elif isinstance(res, dict) and "test_accuracy" in res:
        onnx = (res.get("onnx") or {}).get("validation") or {}
        _out(f"FP test top-1 {100 * res['fp_test_accuracy']:.2f}%  |  NNCF QAT {res.get('quantization', '')} test "
             f"top-1 {100 * res['test_accuracy']:.2f}%" + (f"  |  ONNX Runtime top-1 {100 * onnx['onnx_top1']:.2f}%"
                                                            if "onnx_top1" in onnx else ""))
    return 0


# --- demo ----------------------------------------------------------------------------------------
def _demo_outputs(formats: Sequence[str]) -> list[str]:
    return ["results.json"] + [f"w4a4_{tag}_{fmt}.onnx" for tag in ("lsq", "cr") for fmt in formats]


def _export_available() -> tuple[Any, str | None]:
    try:
        from . import export as export_mod

        for name in ("export_onnx", "validate_onnx", "format_table"):
            if not hasattr(export_mod, name):
                return None, f"qat_plugins.export has no {name}()"
        return export_mod, None
    except ImportError as e:
        return None, _one_line(e)


def run_demo(output_dir: str | Path = "runs/demo", *, quick: bool = False) -> dict[str, Any]:
    """The main job: FP SmallResNet(16) on digits, W4A4 LSQ and W4A4 LSQ + CR, ONNX int8/int4 + ORT.

    Writes ``results.json`` and the ONNX files into ``output_dir`` (refusing to overwrite) and
    returns the results dict. ``quick`` trains fewer epochs (for tests).
    """
    from .training import (export_and_validate, load_config, load_data, lock_output_dir, prepare_output_dir, run,
                           update_config, write_json)

    t_start = time.perf_counter()
    export_mod, export_missing = _export_available()
    formats = DEMO_EXPORT_FORMATS if export_mod is not None else ()
    cfg = load_config(DEMO_CONFIG)
    if quick:
        cfg = update_config(cfg, DEMO_QUICK_CHANGES)
    cfg_cr = update_config(cfg, {"regularizers": DEMO_REGULARIZERS})
    log = logging.getLogger("qat_plugins.training")

    lock = lock_output_dir(output_dir, what="demo")
    with contextlib.ExitStack() as stack:
        stack.callback(lock.release)
        out = prepare_output_dir(output_dir, outputs=_demo_outputs(formats))
        log.info("demo: FP training + W4A4 QAT, LSQ baseline (SmallResNet(width=%d) on digits)", cfg.model.width)
        lsq = run(cfg)
        log.info("demo: W4A4 QAT, LSQ + consistency regularization (CR defaults), same FP model")
        cr = run(cfg_cr, fp_model=lsq.fp_model)
        fp_acc = lsq.fp_test_accuracy
        assert fp_acc is not None

        rows = [("FP32", fp_acc, None), ("W4A4 LSQ", lsq.test_accuracy, lsq.mean_step_time),
                ("W4A4 LSQ + CR", cr.test_accuracy, cr.mean_step_time)]
        _out()
        _out(f"{'model':<15} {'test top-1':>10} {'vs FP':>7} {'ms/step':>8}")
        _out(f"{'-' * 15} {'-' * 10} {'-' * 7} {'-' * 8}")
        for name, acc, step in rows:
            delta = "-" if name == "FP32" else f"{100 * (acc - fp_acc):+.2f}"
            ms = "-" if step is None else f"{1000 * step:.1f}"
            _out(f"{name:<15} {100 * acc:>9.2f}% {delta:>7} {ms:>8}")

        onnx_reports: list[dict[str, Any]] = []
        if export_mod is None:
            _out(f"\nONNX export skipped: qat_plugins.export is not available ({export_missing})")
        else:
            tables = []
            data = load_data(cfg)
            for tag, title, res in (("lsq", "W4A4 LSQ", lsq), ("cr", "W4A4 LSQ + CR", cr)):
                reports = []
                for fmt in formats:
                    path = out / f"w4a4_{tag}_{fmt}.onnx"
                    log.info("demo: exporting %s and validating it in ONNX Runtime", path.name)
                    rep = export_and_validate(res.model, data, fmt, path, cfg.num_threads)["validation"]
                    reports.append(export_mod.ValidationReport(**rep))
                    onnx_reports.append({"model": f"w4a4_{tag}", **rep})
                tables.append(f"{title}:\n{export_mod.format_table(reports)}")
            _out("\nONNX Runtime validation on the test split (ORT vs PyTorch fake-quant model):")
            _out("\n\n".join(tables))

        total = time.perf_counter() - t_start
        results = {
            "quick": quick,
            "accuracy": {"fp": fp_acc, "w4a4_lsq": lsq.test_accuracy, "w4a4_lsq_cr": cr.test_accuracy},
            "mean_step_time_s": {"w4a4_lsq": lsq.mean_step_time, "w4a4_lsq_cr": cr.mean_step_time},
            "history": {"w4a4_lsq": lsq.history, "w4a4_lsq_cr": cr.history},
            "onnx": onnx_reports,
            "config": cfg.to_dict(),
            "regularizers": DEMO_REGULARIZERS,
            "wall_time_s": total,
        }
        from . import __version__

        results["package_version"] = __version__
        write_json(out / "results.json", results)
    _out(f"\nresults: {out / 'results.json'}  ({total:.0f} s)")
    return results


def _cmd_demo(args: argparse.Namespace) -> int:
    out = args.output_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    run_demo(out, quick=args.quick)
    return 0


# --- export / validate / bench (optional modules, imported lazily) -------------------------------
def _import_export() -> Any:
    try:
        from . import export as export_mod
    except ImportError as e:
        raise ValueError(f"ONNX export is not available: qat_plugins.export cannot be imported ({_one_line(e)})") from None
    return export_mod


def _check_new_file(path: str | os.PathLike[str], flag: str) -> Path:
    """A file the command will create: its directory must exist and be writable, the file must not exist."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise IsADirectoryError(f"{flag} {p} is a directory; give a file path such as {p / 'model.onnx'}")
    if p.exists() or p.is_symlink():
        raise FileExistsError(f"{flag} {p} exists; not overwriting it: choose another file name")
    if not parent.is_dir():
        raise FileNotFoundError(f"{flag} {p}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{flag} {p}: directory {parent} is not writable")
    return p


def _check_checkpoint_arg(path: str) -> None:
    p = Path(path)
    if p.is_dir():
        hint = f"; did you mean {p / 'checkpoint.pt'}?" if (p / "checkpoint.pt").is_file() else ""
        raise IsADirectoryError(f"--checkpoint {p} is a directory, not a checkpoint file{hint}")
    if not p.exists():
        raise FileNotFoundError(f"--checkpoint {p} does not exist; pass OUTPUT_DIR/checkpoint.pt of a "
                                "qat-plugins train run")


def _cmd_export(args: argparse.Namespace) -> int:
    export_mod = _import_export()
    from .training import load_trained

    target = _check_new_file(args.output, "--out")
    _check_checkpoint_arg(args.checkpoint)
    model, _fp, _cfg, data = load_trained(args.checkpoint)
    path = export_mod.export_onnx(model, target, data.test.tensors[0][:1], weight_format=args.weight_format)
    _out(f"wrote {path}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    export_mod = _import_export()
    from .training import load_trained, write_json

    onnx_path = args.onnx_path or args.onnx
    if not onnx_path:
        raise ValueError("validate needs the ONNX file: qat-plugins validate MODEL.onnx --checkpoint FILE")
    if Path(onnx_path).is_dir():
        raise IsADirectoryError(f"ONNX file {onnx_path} is a directory; pass the .onnx file")
    if not Path(onnx_path).is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} does not exist")
    if args.json_out:  # before the validation runs, not after it
        _check_new_file(args.json_out, "--json-out")
    _check_checkpoint_arg(args.checkpoint)
    model, _fp, _cfg, data = load_trained(args.checkpoint)
    report = export_mod.validate_onnx(onnx_path, model, data.test)
    if args.json:
        _out(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        _out(export_mod.format_table([report]))
    if args.json_out:
        write_json(args.json_out, report.to_dict())
    if report.top1_agreement < args.min_agreement:
        raise ValueError(f"{onnx_path}: ONNX Runtime and the PyTorch model of {args.checkpoint} agree on "
                         f"{100 * report.top1_agreement:.2f}% of the test split, below --min-agreement "
                         f"{100 * args.min_agreement:.2f}%; is this the ONNX file of that checkpoint?")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        from . import bench as bench_mod  # type: ignore[attr-defined]
    except ImportError as e:
        raise ValueError(f"benchmarks are not available: qat_plugins.bench cannot be imported ({_one_line(e)})") from None
    entry = getattr(bench_mod, "main", None)
    if entry is None:
        raise ValueError("qat_plugins.bench has no main(argv) in this version")
    bench_args = list(args.bench_args)
    if bench_args[:1] == ["--"]:
        bench_args = bench_args[1:]
    return int(entry(bench_args) or 0)


# --- parser / main -------------------------------------------------------------------------------
def _int_in(lo: int, hi: int | None) -> Callable[[str], int]:
    """An argparse type: an int from ``lo`` to ``hi`` (no upper bound when ``None``)."""
    what = f"an int >= {lo}" if hi is None else f"an int from {lo} to {hi}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_positive_int = _int_in(0, None)
_nproc = _int_in(1, 256)


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog=PROG, description="Low-bit QAT with consistency / feature-perturbation / block-replacement "
                                      "regularizers; ONNX export and ONNX Runtime validation.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results (no per-epoch log)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="FP + QAT training from a YAML/JSON config (NNCF-style JSON is routed to NNCF)")
    t.add_argument("--config", required=True, metavar="FILE", help="YAML or JSON config (see examples/train_config.yaml)")
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    t.add_argument("--output-dir", metavar="DIR", help="overrides output_dir of the config")
    t.add_argument("--max-steps", type=_positive_int, metavar="N",
                   help="stop after N QAT steps, leaving a checkpoint to --resume from")
    t.add_argument("--nproc-per-node", type=_nproc, metavar="N",
                   help="train with N processes on this machine (torchrun's launcher; errors stay one line per rank)")
    t.set_defaults(func=_cmd_train)

    d = sub.add_parser("demo", help="the main job on the embedded digits: FP, W4A4 LSQ, W4A4 LSQ + CR, ONNX + ORT")
    d.add_argument("--quick", action="store_true", help="fewer epochs (seconds instead of about two minutes)")
    d.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where results go (default: a new runs/demo-YYYYmmdd-HHMMSS; never overwritten)")
    d.set_defaults(func=_cmd_demo)

    e = sub.add_parser("export", help="export a trained checkpoint to ONNX (QDQ int8 / int4 weights)")
    e.add_argument("--checkpoint", required=True, metavar="FILE", help="checkpoint.pt of `qat-plugins train`/`demo`")
    e.add_argument("--out", "--output", dest="output", required=True, metavar="FILE.onnx", help="ONNX file to write")
    e.add_argument("--format", "--weight-format", dest="weight_format", default="int8", choices=("int8", "int4", "fp32"),
                   help="weight storage: int8 QDQ, packed INT4 (opset 21) or float (default: int8)")
    e.set_defaults(func=_cmd_export)

    v = sub.add_parser("validate", help="run an ONNX file in ONNX Runtime next to its checkpoint's model")
    v.add_argument("onnx_path", nargs="?", metavar="MODEL.onnx", help="the ONNX file to run")
    v.add_argument("--onnx", metavar="FILE", help=argparse.SUPPRESS)
    v.add_argument("--checkpoint", required=True, metavar="FILE", help="checkpoint of the PyTorch model to compare with")
    v.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    v.add_argument("--json-out", metavar="FILE", help="also write the report as JSON to FILE (must not exist)")
    v.add_argument("--min-agreement", type=_fraction, default=0.99, metavar="F",
                   help="fail (exit 2) when ORT and PyTorch top-1 agree on less than this fraction of the test "
                        "split (default: 0.99)")
    v.set_defaults(func=_cmd_validate)

    b = sub.add_parser("bench", help="benchmarks (qat_plugins.bench)")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark runner")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qat-plugins``; returns the exit status (2 for user errors)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "bench" in argv and all(a.startswith("-") for a in argv[: argv.index("bench")]):
        # everything after `bench` belongs to the benchmark runner (argparse's REMAINDER drops
        # leading options such as --quick)
        i = argv.index("bench")
        argv = argv[:i + 1] + ["--"] + argv[i + 1:] if "--" not in argv[i + 1:i + 2] else argv
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return _fail(_one_line(e))
    except SystemExit as e:  # --help / --version
        return int(e.code or 0) if not isinstance(e.code, str) else _fail(e.code)
    args.raw_argv = argv
    _setup_logging(args.quiet)
    errors = _user_errors()
    previous = _raise_on_sigterm()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            return int(args.func(args) or 0)
    except errors as e:
        return _fail(_one_line(e))
    except MemoryError:
        return _fail(_OOM)
    except OSError as e:  # I/O errors, disk full, file-size limits: name the file
        return _fail(_os_error(e))
    except RuntimeError as e:
        if _is_oom(e):
            return _fail(_OOM)
        return _fail(_unexpected(e))
    except Terminated:
        _error_line("terminated (SIGTERM); the output directory is intact: a training run continues with --resume")
        return 143
    except KeyboardInterrupt:
        _error_line("interrupted (Ctrl-C); the output directory is intact: a training run continues with --resume")
        return 130
    except Exception as e:  # noqa: BLE001 - never a traceback wall for the user
        return _fail(_unexpected(e))
    finally:
        _restore_sigterm(previous)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that locks are released and temporary files removed."""


def _raise_on_sigterm() -> Any:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return None


def _restore_sigterm(previous: Any) -> None:
    import signal

    if previous is not None:
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGTERM, previous)


_OOM = ("out of memory: the model or batch does not fit in this machine's memory; lower model.width or "
        "data.batch_size in the config")


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return any(k in text for k in ("not enough memory", "can't allocate memory", "cannot allocate memory",
                                   "out of memory", "bad_alloc"))


def _os_error(e: OSError) -> str:
    import errno

    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or _one_line(e)
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        what += " (the disk is full or a file-size limit was reached); free space and rerun (training continues " \
                "with --resume)"
    return f"{where}{what}"


def _unexpected(e: BaseException) -> str:
    msg = _one_line(e)
    if len(msg) > 300:
        msg = msg[:300] + "..."
    return f"unexpected {type(e).__name__}: {msg} (set QAT_PLUGINS_DEBUG=1 to see the traceback)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
