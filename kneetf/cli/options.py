"""Command-line flags generated from the config dataclasses.

A command lists the config fields it exposes in a table of `ConfigFlag`s, one line each;
every entry becomes a flag whose type, default and help come from the dataclass field, so
a new field is one more line and a default cannot drift from its config:

- flag: `--` + the field name with dashes (`batch_size` -> `--batch-size`), unless the
  entry names another (`ConfigFlag(TrainConfig, "time_budget_s", "--budget")`): a renamed
  flag is said once, in the table;
- type: the field's annotation: `int`, `float`, `str`, `bool` (a switch: `--jit`, or
  `--no-flip` when the field defaults to True) or a tuple of numbers, given comma-separated
  (`--loss-weights 1,1`);
- default: the field's default, or what the command's `default_of` says (training: the
  recipe's, listed per recipe in the help);
- help: `dataclasses.field(metadata={"help": ...})`, with optional `"metavar"` and
  `"choices"` (a registry's names, never a copied list).

`config_values(args, flags, Config)` gives back {field: value} for the flags of `Config`
that are set, ready for `Config(**...)` or `replace(config, **...)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kneetf.errors import ConfigError

#: (argparse default, how the default reads in the help) of one flag
Default = tuple[Any, str]
_COUNTS = {2: "two", 3: "three"}


@dataclass(frozen=True)
class ConfigFlag:
    """The command-line flag of field `name` of dataclass `config` (`flag`: another flag name)."""

    config: type
    name: str
    flag: str = ""

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")

    @property
    def field(self) -> dataclasses.Field:
        for f in dataclasses.fields(self.config):
            if f.name == self.name:
                return f
        raise ConfigError(f"{self.config.__name__} has no field {self.name!r}")

    @property
    def type(self) -> Any:
        tp = typing.get_type_hints(self.config)[self.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
            return args[0]  # `X | None` -> X
        return tp

    @property
    def default(self) -> Any:
        f = self.field
        return f.default_factory() if f.default is dataclasses.MISSING else f.default


def format_value(value: Any) -> str:
    """A default as a user types it: 1,1 for tuples, 0.001, off for False."""
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def field_default(flag: ConfigFlag) -> Default:
    """The field's own default, for argparse and for the help (None: the help says it)."""
    return flag.default, "" if flag.default is None else format_value(flag.default)


def _is_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


def add_config_flags(parser: Any, flags: Sequence[ConfigFlag],
                     default_of: Callable[[ConfigFlag], Default] = field_default) -> None:
    """Add one flag per entry of `flags` to `parser` (a parser, group or exclusive group)."""
    for flag in flags:
        meta = flag.field.metadata
        tp = flag.type
        value, shown = default_of(flag)
        text = meta.get("help", "")
        kwargs: dict[str, Any] = {"dest": flag.dest, "default": value}
        if tp is bool:
            if value is None:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif value:
                parser.add_argument("--no-" + flag.option[2:], action="store_false",
                                    help=f"{text} (default: on; this flag turns it off)", **kwargs)
                continue
            else:
                kwargs["action"] = "store_true"
                shown = ""
        elif _is_tuple(tp):
            kwargs["type"] = str  # parsed by config_values, which names the flag on a bad value
            kwargs["metavar"] = meta.get("metavar", "A,B")
        else:
            kwargs["type"] = tp
            if "metavar" in meta:
                kwargs["metavar"] = meta["metavar"]
        if "choices" in meta:
            kwargs["choices"] = list(meta["choices"])
        kwargs["help"] = f"{text} (default: {shown})" if shown else text
        parser.add_argument(flag.option, **kwargs)


def _parse_tuple(flag: ConfigFlag, text: str) -> tuple:
    args = typing.get_args(flag.type)
    variable = len(args) == 2 and args[1] is Ellipsis
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if variable:
            return tuple(args[0](p) for p in parts)
        if len(parts) != len(args):
            raise ValueError
        return tuple(kind(p) for kind, p in zip(args, parts))
    except ValueError:
        count = "numbers" if variable else f"{_COUNTS.get(len(args), len(args))} numbers"
        raise ConfigError(f"{flag.option} takes {count} {flag.field.metadata.get('metavar', 'A,B')}. "
                          f"Received: {text!r}") from None


def config_values(args: argparse.Namespace, flags: Sequence[ConfigFlag], config: type) -> dict[str, Any]:
    """{field: value} of the flags in `flags` that belong to `config` and are set (not None)."""
    out: dict[str, Any] = {}
    for flag in flags:
        if flag.config is not config:
            continue
        value = getattr(args, flag.dest)
        if value is None:
            continue
        out[flag.name] = _parse_tuple(flag, value) if _is_tuple(flag.type) and isinstance(value, str) else value
    return out


def add_naming_flags(p: argparse.ArgumentParser, what: str = "output names") -> None:
    """`--names` and `--pseudonym-key`, as `kneetf predict` and `kneetf client` take them."""
    from kneetf.inference.outputs import NAMES, PSEUDONYM_KEY

    p.add_argument("--names", choices=NAMES, default="auto",
                   help=f"{what}: 'pseudonym' (random, e.g. knee-3f9a2c1b7d12; with a private key file pseudonym -> "
                        "source), 'id' (the file stem or manifest id), 'auto' (pseudonym unless --keep-patient; "
                        "default)")
    p.add_argument("--pseudonym-key", metavar="CSV",
                   help=f"where the private pseudonym key goes (default: OUT/{PSEUDONYM_KEY}; keep it apart from "
                        "outputs you share)")


__all__ = ["add_naming_flags", "ConfigFlag", "add_config_flags", "config_values", "field_default", "format_value"]


def add_trust_flag(p: argparse.ArgumentParser) -> None:
    """--trust-model: run a SavedModel / TFLite model whose operations are outside the allow list."""
    p.add_argument("--trust-model", action="store_true",
                   help="run a SavedModel / TFLite model even if it holds operations kneetf models never use "
                        "(file or other I/O, custom ops): a model file is code, trust its source")
