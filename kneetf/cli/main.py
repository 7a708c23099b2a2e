"""The `kneetf` command: one parser, a module per subcommand, one error handler.

Each subcommand lives in `kneetf/cli/<module>.py` and defines `add_arguments(parser)` and
`run(args) -> int`; its one-line help is in `COMMANDS`. A command is a thin orchestration of
library calls; flags that set config fields are generated from the dataclasses
(`kneetf.cli.options`). Modules import TensorFlow only inside `run`, so `kneetf --help` answers
without loading it.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

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

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CRASH, EXIT_INTERRUPT = 0, 1, 2, 3, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kneetf", description="Reconstruct a 3-D knee MRI from one knee X-ray.")
    parser.add_argument("--version", action="version", version=f"kneetf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def _command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"kneetf {name}", description=help_)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    module.add_arguments(parser)
    return parser, module


def run_command(name: str, argv: Sequence[str]) -> int:
    """Parse `argv` for subcommand `name` and run it, mapping errors to exit codes."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    parser, module = _command_parser(name)
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from kneetf.errors import KneetfError

    try:
        return int(module.run(args) or 0)
    except KneetfError as e:
        print(f"kneetf {name}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"kneetf {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"kneetf {name}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] not in COMMANDS:
        # --version / -v and unknown commands: let argparse answer
        parser.parse_args(argv)
        return EXIT_USAGE
    return run_command(argv[0], argv[1:])


def train_main(argv: Sequence[str] | None = None) -> int:
    """`kneetf-train` is `kneetf train`."""
    return run_command("train", list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
