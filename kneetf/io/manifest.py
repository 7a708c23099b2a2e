"""Manifest CSV: one row per knee, `id,xray,mri,side,split` (+ optional `xray_half`, extras).

* `id`: unique, safe as a file name (it becomes `<id>.nii.gz`): no '/', '\\', '..', a leading
  '.', control characters or `<>:"|?*`.
* `xray`, `mri`: paths relative to the manifest's folder (absolute paths are allowed when
  they stay inside that folder). A path that leaves the folder tree is refused unless
  `allow_outside=True`. The check is lexical: symbolic links placed inside the folder on
  purpose are followed. `mri` may be empty with `require_mri=False` (predict-only).
* `side`: left/right/L/R (any case) or empty -> "left", "right" or None.
* `split`: train/val/test (any case) or empty -> None.
* `xray_half`: left/right or empty. When set, the X-ray file holds both knees and only that
  half of the stored image's columns is this knee (`read_xray(..., half=...)`). OAI
  bilateral X-rays: the patient's right knee is on the image's LEFT half.
* Any other column is kept in `Case.extra`.

The whole file is parsed and validated before anything is returned; every bad line is
reported with its 1-based line number and the good rows are still returned. A UTF-8 BOM and
CRLF line ends are accepted.

    >>> result = read_manifest("data/manifest.csv")
    >>> result.raise_for_errors()          # or inspect result.errors
    >>> for case in result.cases: ...
"""
from __future__ import annotations

import csv
import io
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from kneetf.errors import ManifestError
from kneetf.io.atomic import write_text_atomic
from kneetf.io.lookup import lookup

COLUMNS = ("id", "xray", "mri", "side", "split")
SPLITS = ("train", "val", "test")
#: train, val, test fractions of the rows a manifest leaves without a split (`kneetf prepare`)
DEFAULT_SPLIT = (0.8, 0.1, 0.1)
HALF_COLUMN = "xray_half"
_SIDES = {"left": "left", "l": "left", "right": "right", "r": "right"}
_UNSAFE_ID = re.compile(r'[/\\<>:"|?*\x00-\x1f\x7f]')
MAX_ID_LENGTH = 200  # bytes in UTF-8


@dataclass(frozen=True)
class Case:
    """One knee: its X-ray, its MRI (None for predict-only rows) and labels.

    `line` is the manifest line it came from (0 when built in code).
    """

    id: str
    xray: Path
    mri: Path | None = None
    side: str | None = None
    split: str | None = None
    line: int = 0
    xray_half: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class ManifestResult:
    """Good cases and the errors of the bad lines (each a ManifestError with `line`)."""

    path: Path
    cases: list[Case]
    errors: list[ManifestError]

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> None:
        """Raise one ManifestError listing every bad line, if any."""
        if self.errors:
            lines = "\n  ".join(e.reason for e in self.errors)
            raise ManifestError(self.path, None, f"{len(self.errors)} problem(s):\n  {lines}")


def check_id(case_id: str) -> str | None:
    """Why `case_id` is not safe as a file name, or None when it is."""
    if not case_id:
        return "empty id"
    bad = _UNSAFE_ID.search(case_id)
    if bad:
        return f"id {case_id!r} is not safe as a file name (contains {bad.group()!r})"
    if ".." in case_id or case_id.startswith("."):
        return f"id {case_id!r} is not safe as a file name (contains '..' or starts with '.')"
    size = len(case_id.encode())
    if size > MAX_ID_LENGTH:  # bytes, as file names are counted: `<id>.nii.gz` must fit one
        return f"id is {size} bytes long in UTF-8 (at most {MAX_ID_LENGTH})"
    return None


def _inside(root: Path, target: Path) -> bool:
    try:
        Path(os.path.normpath(target)).relative_to(root)
        return True
    except ValueError:
        return False


def _resolve(root: Path, text: str) -> Path:
    """Lexically normalised absolute path of manifest cell `text` (relative to `root`)."""
    p = Path(text)
    return Path(os.path.normpath(p if p.is_absolute() else root / p))


def _missing(kind: str, value: str, target: Path) -> str | None:
    """What is wrong with a manifest's `kind` path `value` (resolved: `target`), or None."""
    found, refused = lookup(target)
    if refused:
        shown = value if len(value) <= 80 else value[:80] + "..."
        return f"{kind} path {shown!r} cannot be looked up: {refused}"
    if kind == "xray" and not (found and stat.S_ISREG(found.st_mode)):
        return f"xray file not found: {value}" if found is None else f"xray path is not a file: {value}"
    if kind == "mri" and found is None:
        return f"mri path not found: {value}"
    return None


def read_manifest(path: str | Path, *, allow_outside: bool = False, check_files: bool = True,
                  require_mri: bool = True) -> ManifestResult:
    """Parse and validate a whole manifest; see the module docstring for the rules.

    A missing manifest raises ManifestError; problems inside it are returned in `errors`.
    """
    path = Path(path)
    root = Path(os.path.normpath(path.parent.absolute()))
    errors: list[ManifestError] = []

    def bad(line: int | None, reason: str) -> None:
        errors.append(ManifestError(path, line, reason))

    if not path.is_file():
        raise ManifestError(path, None, "manifest file not found" if not path.exists() else "not a file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bad(None, f"not UTF-8 text ({e})")
        return ManifestResult(path, [], errors)
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(rows, None)
    except csv.Error as e:
        bad(1, f"cannot parse the header: {e}")
        return ManifestResult(path, [], errors)
    if not header or not any(h.strip() for h in header):
        bad(1, f"empty manifest: the first line must be a header with columns {','.join(COLUMNS)}")
        return ManifestResult(path, [], errors)
    names = [h.strip() for h in header]
    keys = [n.lower() for n in names]
    dupes = sorted({k for k in keys if keys.count(k) > 1 and k})
    if dupes:
        bad(1, f"header repeats column(s) {', '.join(dupes)}")
    required = ["id", "xray"] + (["mri"] if require_mri else [])
    missing = [c for c in required if c not in keys]
    if missing:
        bad(1, f"header lacks column(s) {', '.join(missing)} (header: {','.join(names)}; expected "
               f"{','.join(COLUMNS)})")
    if missing or dupes:
        return ManifestResult(path, [], errors)
    col = {k: i for i, k in enumerate(keys)}
    known = set(COLUMNS) | {HALF_COLUMN}
    extra_cols = [(i, names[i]) for i, k in enumerate(keys) if k not in known]

    cases: list[Case] = []
    seen: dict[str, int] = {}
    line = 1
    while True:
        start = rows.line_num + 1
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as e:
            bad(rows.line_num, f"cannot parse: {e}")
            break
        line = start
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(names):
            bad(line, f"has {len(row)} field(s); the header has {len(names)} ({','.join(names)})")
            continue
        cell = {k: row[i].strip() for k, i in col.items()}
        problems: list[str] = []
        case_id = cell["id"]
        why = check_id(case_id)
        if why:
            problems.append(why)
        elif case_id in seen:
            problems.append(f"duplicate id {case_id!r} (first on line {seen[case_id]})")
        paths: dict[str, Path | None] = {}
        for kind in ("xray", "mri"):
            value = cell.get(kind, "")
            if not value:
                if kind == "xray" or require_mri:
                    problems.append(f"empty {kind} path")
                paths[kind] = None
                continue
            target = _resolve(root, value)
            paths[kind] = target
            if not allow_outside and not _inside(root, target):
                problems.append(f"{kind} path {value!r} leaves the manifest's folder {root} "
                                "(allow it explicitly: --allow-outside, or allow_outside=True)")
            elif check_files:
                problem = _missing(kind, value, target)
                if problem:
                    problems.append(problem)
        side_text = cell.get("side", "")
        side = _SIDES.get(side_text.lower()) if side_text else None
        if side_text and side is None:
            problems.append(f"unknown side {side_text!r} (allowed: left, right, L, R or empty)")
        split = cell.get("split", "").lower() or None
        if split is not None and split not in SPLITS:
            problems.append(f"unknown split {cell['split']!r} (allowed: train, val, test or empty)")
        half = cell.get(HALF_COLUMN, "").lower() or None
        if half is not None and half not in ("left", "right"):
            problems.append(f"unknown {HALF_COLUMN} {cell[HALF_COLUMN]!r} (allowed: left, right or empty)")
        if not why and case_id not in seen:
            seen[case_id] = line
        if problems:
            for p in problems:
                bad(line, p)
            continue
        cases.append(Case(id=case_id, xray=paths["xray"], mri=paths["mri"], side=side, split=split, line=line,
                          xray_half=half, extra={name: row[i].strip() for i, name in extra_cols}))
    return ManifestResult(path, cases, errors)


def _relative(root: Path, p: Path) -> str:
    p = Path(os.path.normpath(Path(p).absolute()))
    return p.relative_to(root).as_posix() if _inside(root, p) else str(p)


def write_manifest(path: str | Path, cases: Iterable[Case]) -> Path:
    """Write `cases` atomically; paths are written relative to the manifest's folder when
    inside it (absolute otherwise, which `read_manifest` accepts only with allow_outside).
    `xray_half` and extra columns are written when any case has them."""
    path = Path(path)
    root = Path(os.path.normpath(path.parent.absolute()))
    cases = list(cases)
    columns: list[str] = list(COLUMNS)
    if any(c.xray_half for c in cases):
        columns.append(HALF_COLUMN)
    extras: list[str] = []
    for c in cases:
        extras += [k for k in c.extra if k not in extras and k.lower() not in columns]
    columns += extras
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for c in cases:
        why = check_id(c.id)
        if why:
            raise ManifestError(path, None, why)
        values = {"id": c.id, "xray": _relative(root, c.xray), "mri": _relative(root, c.mri) if c.mri else "",
                  "side": c.side or "", "split": c.split or "", HALF_COLUMN: c.xray_half or ""}
        writer.writerow([values[k] if k in values else c.extra.get(k, "") for k in columns])
    return write_text_atomic(path, buf.getvalue())


def split_counts(cases: Sequence[Case]) -> dict[str, int]:
    """Number of cases per split ("" for none)."""
    counts: dict[str, int] = {}
    for c in cases:
        counts[c.split or ""] = counts.get(c.split or "", 0) + 1
    return counts


def split_participants(participants: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Assign each participant to train/val/test with a seeded shuffle (sorted ids first,
    so the result depends only on the set of ids, the fractions and the seed)."""
    ids = sorted(set(participants))
    order = np.random.default_rng(seed).permutation(len(ids))
    bounds = np.round(np.cumsum(fractions) * len(ids)).astype(int)
    out = {}
    for rank, i in enumerate(order):
        out[ids[i]] = "train" if rank < bounds[0] else "val" if rank < bounds[1] else "test"
    return out


__all__ = ["Case", "ManifestResult", "read_manifest", "write_manifest", "check_id", "split_counts",
           "split_participants", "DEFAULT_SPLIT", "COLUMNS", "SPLITS", "HALF_COLUMN"]
