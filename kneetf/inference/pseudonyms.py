"""The private pseudonym key of an output folder: which source file each pseudonym stands for.

Outputs are named by random pseudonyms (`kneetf.inference.outputs.new_pseudonym`) unless the
user asks for ids. The key is written before any output, so that the outputs of an
interrupted run stay traceable, and rewritten at the end with each pseudonym's result
(written / failed). A rerun gives the sources an earlier run already named (written, failed,
or left unfinished by an interrupted run) their old pseudonyms, so that it replaces those
outputs instead of adding new ones. `kneetf predict` and
`kneetf client` share this one implementation.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from kneetf.errors import ConfigError
from kneetf.inference.outputs import new_pseudonym
from kneetf.io.atomic import write_csv_atomic

KEY_FIELDS = ["pseudonym", "source", "result"]


def read_pseudonym_key(path: Path) -> list[dict[str, str]]:
    """The rows of an existing pseudonym key (kept when a run adds to it); [] when none."""
    if not path.exists():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if list(reader.fieldnames or []) != KEY_FIELDS:
                raise ConfigError(f"{path} exists and is not a kneetf pseudonym key (columns {KEY_FIELDS})")
            return [dict(r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{path}: cannot read the pseudonym key ({e})") from None


class PseudonymKey:
    """The key file at `path`: the rows of earlier runs, and the pseudonyms of this one.

    `assign` names this run's inputs, `name_for` names one source (e.g. an input that failed
    before it got one), `new` gives a fresh pseudonym, `write` stores earlier rows + this
    run's (pseudonym, source, result) entries atomically."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows = read_pseudonym_key(self.path)
        self.used = {r["pseudonym"] for r in self.rows}
        self._reused: set[int] = set()  # ids of the rows this run writes again
        self._by_source: dict[str, list[dict[str, str]]] = {}
        for r in self.rows:
            self._by_source.setdefault(_same_file(r["source"]), []).append(r)

    def new(self) -> str:
        """A pseudonym no row of the key and no input of this run has."""
        name = ""
        while not name or name in self.used:
            name = new_pseudonym()
        self.used.add(name)
        return name

    def name_for(self, source: str) -> str:
        """The pseudonym of `source`: the one an earlier run gave the same file (however its
        path was written: relative, absolute, through a link; written or unfinished first,
        then failed), else a new one. A reused pseudonym's earlier row is dropped; this run
        writes it again."""
        earlier = self._by_source.get(_same_file(source))
        if not earlier:
            return self.new()
        row = min(earlier, key=lambda r: r["result"] == "failed")  # the first that may have outputs
        earlier.remove(row)
        self._reused.add(id(row))
        return row["pseudonym"]

    def assign(self, items: Sequence[Any]) -> None:
        """Set `item.name` of each input (anything with `.path` and `.name`) to the pseudonym
        of its source (`name_for`): a rerun replaces its outputs instead of adding new ones."""
        for it in items:
            it.name = self.name_for(str(it.path))

    def write(self, entries: Iterable[tuple[str, str, str]]) -> None:
        """The key file: earlier runs' rows, then this run's (pseudonym, source, result), each
        source as an absolute path (a later run from another folder finds it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ours = [dict(zip(KEY_FIELDS, (name, os.path.abspath(source) if source else "", result)))
                for name, source, result in entries]
        kept = [r for r in self.rows if id(r) not in self._reused]
        write_csv_atomic(self.path, KEY_FIELDS, kept + ours)


def _same_file(source: str) -> str:
    """`source` as one spelling per file (resolved: relative paths and links agree)."""
    return str(Path(source).resolve()) if source else ""


__all__ = ["KEY_FIELDS", "read_pseudonym_key", "PseudonymKey"]
