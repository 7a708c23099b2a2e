"""The `kneetf` command: one parser, a module per subcommand, one error handler.

Each subcommand lives in `kneetf/cli/<module>.py` and defines `add_arguments(parser)` and
`run(args) -> int`; its one-line help is in `COMMANDS`. A command is a thin orchestration of
library calls; flags that set config fields are generated from the dataclasses
(`kneetf.cli.options`). Modules import TensorFlow only inside `run`, so `kneetf --help` answers
without loading it.

Global options, before or after the command name: `-v` (debug log), `-q` (warnings and
results only, no progress bars) and `--no-progress` (no progress bars; also when the
environment sets `TQDM_DISABLE`). A command reads `args.progress`. Exit statuses: see
`kneetf.cli.exits`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from kneetf.cli.exits import EXIT_CRASH, EXIT_ERROR, EXIT_INTERRUPT, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE  # noqa: F401
from kneetf.version import __version__

#: subcommand -> (module, one-line help); help text here so `--help` imports nothing.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("kneetf.cli.train", "train KneeNet (default: the compact preset on built-in synthetic knees)"),
    "synth": ("kneetf.cli.synth", "write a synthetic paired knee dataset (DICOM, NIfTI, PNG, manifest)"),
    "prepare": ("kneetf.cli.prepare", "decode a manifest, crop the knee ROI and write the TFRecord cache"),
    "import-oai": ("kneetf.cli.import_oai", "build a manifest from an OAI release folder"),
    "train-roi": ("kneetf.cli.train_roi", "train the knee-joint ROI detector"),
    "evaluate": ("kneetf.cli.evaluate", "score a model against the baselines (mean, k-NN, kernel ridge)"),
    "predict": ("kneetf.cli.predict", "reconstruct MRI volumes from X-ray files"),
    "export": ("kneetf.cli.export", "export a model for TF Serving (SavedModel) and TFLite"),
    "client": ("kneetf.cli.client", "send X-rays to a TF Serving server (gRPC or REST)"),
}

#: options every command takes, before or after its name
GLOBAL_OPTIONS = ("-v", "--verbose", "-q", "--quiet", "--no-progress")
_FALSE = ("", "0", "false", "no", "off")


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="log warnings and errors only; no progress bars")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (also when the environment sets TQDM_DISABLE); "
                             "training prints one line per epoch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kneetf", description="Reconstruct a 3-D knee MRI from one knee X-ray.",
        epilog="exit status: 0 done, 1 error, 2 usage, 3 crash (a bug; the traceback goes to a log file), "
               "4 some inputs failed (the rest were written), 130 interrupted")
    parser.add_argument("--version", action="version", version=f"kneetf {__version__}")
    _add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def _command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"kneetf {name}", description=help_)
    _add_global_options(parser)
    module.add_arguments(parser)
    return parser, module


def progress_wanted(no_progress: bool = False, quiet: bool = False) -> bool:
    """Progress bars unless asked not to: `--no-progress`, `-q` or `TQDM_DISABLE` set."""
    return not (no_progress or quiet or os.environ.get("TQDM_DISABLE", "").strip().lower() not in _FALSE)


def _crash_log(name: str) -> Path:
    """Write the current exception's traceback to a log file; returns its path."""
    import tempfile
    import time
    import traceback

    fd, path = tempfile.mkstemp(prefix=f"kneetf-{name}-crash-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"kneetf {__version__} {name}: {' '.join(sys.argv)}\n\n")
        traceback.print_exc(file=f)
    return Path(path)


def run_command(name: str, argv: Sequence[str], global_args: Sequence[str] = ()) -> int:
    """Parse `argv` (with `global_args` given before the command name) for subcommand `name`
    and run it, mapping errors to exit statuses (`kneetf.cli.exits`)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    parser, module = _command_parser(name)
    args = parser.parse_args([*global_args, *argv])
    if args.verbose and args.quiet:
        parser.error("-v and -q exclude each other")
    args.progress = progress_wanted(args.no_progress, args.quiet)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    if not args.verbose:
        # a file pydicom or OpenCV cannot decode is reported once, by kneetf, naming the file; their own
        # logs of each decoder they tried (pydicom's with tracebacks) are for -v. pydicom sets its
        # logger's level when it is imported, so its records are dropped at the handlers.
        for handler in logging.getLogger().handlers:
            handler.addFilter(_not_pydicom)
        os.environ.setdefault("OPENCV_LOG_LEVEL", "FATAL")
    from kneetf.errors import KneetfError, storage_reason

    try:
        return int(module.run(args) or 0)
    except KneetfError as e:
        print(f"kneetf {name}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"kneetf {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    except (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"kneetf {name}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug: a short message here, the traceback in a file
        reason = storage_reason(e)
        if reason is not None:  # a full, read-only or over-quota file system is no bug
            where = _written_file(e)
            print(f"kneetf {name}: error: cannot write{f' {where}' if where else ''}: {reason}", file=sys.stderr)
            return EXIT_ERROR
        try:
            where = f"the traceback is in {_crash_log(name)}"
        except OSError as log_error:
            where = f"the traceback could not be written ({log_error})"
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"kneetf {name}: crashed: {type(e).__name__}: {e}\n  this is a bug in kneetf; {where}",
              file=sys.stderr)
        return EXIT_CRASH


def _written_file(e: BaseException | None) -> str | None:
    """The file a failed write was writing, as the user will look for it: the final name of
    one of kneetf's temporary files (`kneetf.io.atomic`), or the file the error names."""
    from kneetf.io.atomic import written_name

    while e is not None:
        for text in (getattr(e, "filename", None), str(e)):
            found = written_name(str(text)) if text else None
            if found:
                return found
        if isinstance(e, OSError) and e.filename:
            return str(e.filename)
        e = e.__cause__ or e.__context__
    return None


def _not_pydicom(record: logging.LogRecord) -> bool:
    return record.name != "pydicom" and not record.name.startswith("pydicom.")


def _split_global(argv: list[str]) -> tuple[list[str], list[str]]:
    """(global options given before the command name, the rest)."""
    i = 0
    while i < len(argv) and argv[i] in GLOBAL_OPTIONS:
        i += 1
    return argv[:i], argv[i:]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    global_args, rest = _split_global(argv)
    if not rest or rest[0] in ("-h", "--help"):
        parser.print_help()
        return EXIT_OK if rest else EXIT_USAGE
    if rest[0] not in COMMANDS:
        # --version and unknown commands: let argparse answer
        parser.parse_args(argv)
        return EXIT_USAGE
    return run_command(rest[0], rest[1:], global_args)


def train_main(argv: Sequence[str] | None = None) -> int:
    """`kneetf-train` is `kneetf train`."""
    return run_command("train", list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
