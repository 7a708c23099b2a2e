"""Osteoarthritis Initiative (OAI) release folders -> a kneetf manifest.

Layout read: `ROOT/<visit>/<release>/<ParticipantID>/<StudyDate>/<Barcode>/001...`,
one series per Barcode folder (files `001`, `002`, ... without suffix), and a `contents.csv`
with columns `Folder,ParticipantID,StudyDate,Barcode,StudyDescription,SeriesDescription`.
Every `contents.csv` found at `ROOT/<visit>/contents.csv` or `ROOT/<visit>/<release>/contents.csv`
is read; its `Folder` is resolved against the csv's folder first, then the visit folder.

Pairing, per participant and visit:
* knee MRI: SeriesDescription starts with the `mri_series` prefix (default `SAG_3D_DESS`)
  and ends with `_LEFT` or `_RIGHT` (the knee's side);
* X-ray: "Bilateral PA Fixed Flexion Knee" in SeriesDescription or StudyDescription (any
  case). Both knees are on one image, the patient's RIGHT knee on the image's LEFT half.

Decision on the X-ray halves: nothing is copied or rewritten. Each manifest row points at
the whole bilateral X-ray file and says which half of the stored image is its knee in an
`xray_half` column (`left` for the right knee, `right` for the left knee); `read_manifest`
keeps it in `Case.xray_half` and `read_xray(path, half=...)` crops it. When a series has
several candidates (repeat scans) the first by (StudyDate, Barcode) is used and the others
are reported. Ids are `<ParticipantID>_<visit>_<R|L>`. Splits are drawn per participant
with a seeded generator, so no participant is in two splits (across visits too).

Paths outside the manifest's folder are written absolute; `read_manifest` then needs
`allow_outside=True` (the OAI tree usually lives elsewhere).
"""
from __future__ import annotations

import csv
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from kneetf.errors import ConfigError, InputError
from kneetf.io.manifest import Case, check_id, write_manifest

log = logging.getLogger(__name__)

CONTENTS_COLUMNS = ("Folder", "ParticipantID", "StudyDate", "Barcode", "StudyDescription", "SeriesDescription")
XRAY_DESCRIPTION = "bilateral pa fixed flexion knee"
#: image half (columns of the stored bilateral X-ray) holding each knee of the patient
HALF_OF_SIDE = {"right": "left", "left": "right"}


@dataclass(frozen=True)
class ContentsRow:
    """One series listed in a contents.csv."""

    csv: Path
    line: int
    folder: str
    participant: str
    study_date: str
    barcode: str
    study_description: str
    series_description: str
    visit: str

    @property
    def where(self) -> str:
        return f"{self.csv}:{self.line}"


@dataclass(frozen=True)
class Skipped:
    """A relevant series (or participant) left out of the manifest, and why."""

    participant: str
    visit: str
    what: str
    reason: str


@dataclass
class OaiImport:
    cases: list[Case]
    skipped: list[Skipped] = field(default_factory=list)
    rows_read: int = 0
    participants: int = 0

    def skipped_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for s in self.skipped:
            counts[s.reason.split(":")[0]] += 1
        return dict(counts)


# === contents.csv ===
def find_contents(root: Path, visit: str) -> list[Path]:
    """contents.csv files of one visit: ROOT/<visit>/contents.csv and ROOT/<visit>/*/contents.csv."""
    visit_dir = root / visit
    if not visit_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise InputError(visit_dir, f"visit folder not found (folders under {root}: {', '.join(found) or 'none'})")
    files = [visit_dir / "contents.csv"] + sorted(visit_dir.glob("*/contents.csv"))
    files = [f for f in files if f.is_file()]
    if not files:
        raise InputError(visit_dir, "no contents.csv in the visit folder or its release folders")
    return files


def read_contents(path: Path, visit: str) -> tuple[list[ContentsRow], list[Skipped]]:
    """Rows of one contents.csv; rows with the wrong number of fields are reported."""
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    reader = csv.reader(text.splitlines())
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in CONTENTS_COLUMNS if c not in header]
    if missing:
        raise InputError(path, f"contents.csv lacks column(s) {', '.join(missing)} (header: {','.join(header)})")
    idx = {c: header.index(c) for c in CONTENTS_COLUMNS}
    rows, bad = [], []
    for line, row in enumerate(reader, start=2):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) < len(header):
            bad.append(Skipped("", visit, f"{path}:{line}", f"malformed contents.csv row: {len(row)} fields"))
            continue
        v = {c: row[i].strip() for c, i in idx.items()}
        rows.append(ContentsRow(path, line, v["Folder"], v["ParticipantID"], v["StudyDate"], v["Barcode"],
                                v["StudyDescription"], v["SeriesDescription"], visit))
    return rows, bad


def mri_side(series_description: str, prefix: str) -> str | None:
    """"left"/"right" for a knee MRI series of `prefix`, else None."""
    desc = series_description.strip().upper()
    if not desc.startswith(prefix.upper()):
        return None
    if desc.endswith("_LEFT"):
        return "left"
    if desc.endswith("_RIGHT"):
        return "right"
    return None


def is_bilateral_xray(row: ContentsRow) -> bool:
    return (XRAY_DESCRIPTION in row.series_description.lower()
            or XRAY_DESCRIPTION in row.study_description.lower())


def _series_folder(row: ContentsRow, root: Path) -> Path | None:
    rel = Path(row.folder.replace("\\", "/"))
    for base in (row.csv.parent, root / row.visit, root):
        candidate = base / rel
        if candidate.is_dir():
            return candidate
    return None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


# === Splits ===
def parse_split(text: str | Sequence[float]) -> tuple[float, float, float]:
    """"0.8,0.1,0.1" -> (train, val, test) fractions, non-negative, summing to 1."""
    try:
        values = tuple(float(v) for v in (text.split(",") if isinstance(text, str) else text))
    except ValueError as e:
        raise ConfigError(f"split must be three numbers like 0.8,0.1,0.1. Received: split={text!r}") from e
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(f"split must be three non-negative fractions (train,val,test) summing to 1. "
                          f"Received: split={text!r}")
    return values  # type: ignore[return-value]


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


# === Pairing ===
def pair_oai(root: str | Path, visits: Sequence[str] = ("00m",), *, mri_series: str = "SAG_3D_DESS",
             seed: int = 0, split: Sequence[float] = (0.8, 0.1, 0.1)) -> OaiImport:
    """Pair each knee MRI with the bilateral X-ray of the same participant and visit."""
    root = Path(root)
    fractions = parse_split(split)
    rows: list[ContentsRow] = []
    skipped: list[Skipped] = []
    for visit in visits:
        for csv_path in find_contents(root, visit):
            got, bad = read_contents(csv_path, visit)
            rows += got
            skipped += bad
    xrays: dict[tuple[str, str], list[ContentsRow]] = defaultdict(list)
    mris: dict[tuple[str, str, str], list[ContentsRow]] = defaultdict(list)
    seen_folders: set[Path] = set()
    for row in rows:
        side = mri_side(row.series_description, mri_series)
        relevant = side is not None or is_bilateral_xray(row)
        if not relevant:
            continue
        what = f"{row.series_description or row.study_description} ({row.where})"
        folder = _series_folder(row, root)
        if folder is None:
            skipped.append(Skipped(row.participant, row.visit, what, f"folder not found: {row.folder}"))
            continue
        if folder in seen_folders:
            continue  # listed by two contents.csv files
        seen_folders.add(folder)
        if side is not None:
            mris[(row.participant, row.visit, side)].append(row)
        else:
            xrays[(row.participant, row.visit)].append(row)

    def first(candidates: list[ContentsRow], kind: str) -> ContentsRow:
        ordered = sorted(candidates, key=lambda r: (r.study_date, r.barcode))
        for extra in ordered[1:]:
            skipped.append(Skipped(extra.participant, extra.visit, f"{extra.series_description} ({extra.where})",
                                   f"extra {kind}: using barcode {ordered[0].barcode}"))
        return ordered[0]

    chosen_xray: dict[tuple[str, str], tuple[ContentsRow, Path | None]] = {}
    for key, candidates in sorted(xrays.items()):
        xray = first(candidates, "X-ray")
        files = _files(_series_folder(xray, root))
        if len(files) != 1:
            skipped.append(Skipped(key[0], key[1], f"{xray.series_description} ({xray.where})",
                                   f"X-ray folder holds {len(files)} files: expected one image"))
        chosen_xray[key] = (xray, files[0] if len(files) == 1 else None)

    pending: list[tuple[ContentsRow, str, Path, Path]] = []
    paired: set[tuple[str, str]] = set()
    for (pid, visit, side), candidates in sorted(mris.items()):
        mri = first(candidates, "MRI series")
        what = f"{mri.series_description} ({mri.where})"
        if (pid, visit) not in chosen_xray:
            skipped.append(Skipped(pid, visit, what,
                                   "unpaired MRI: no bilateral PA fixed flexion knee X-ray at this visit"))
            continue
        paired.add((pid, visit))
        xray_file = chosen_xray[(pid, visit)][1]
        mri_dir = _series_folder(mri, root)
        if xray_file is None:
            skipped.append(Skipped(pid, visit, what, "unusable X-ray: see the X-ray entry"))
        elif not _files(mri_dir):
            skipped.append(Skipped(pid, visit, what, "empty MRI folder"))
        else:
            pending.append((mri, side, mri_dir, xray_file))
    for key, (xray, _file) in chosen_xray.items():
        if key not in paired:
            skipped.append(Skipped(key[0], key[1], f"{xray.series_description} ({xray.where})",
                                   f"unpaired X-ray: no {mri_series}_LEFT/_RIGHT MRI at this visit"))

    splits = split_participants([m.participant for m, *_ in pending], fractions, seed)
    cases = []
    for mri, side, mri_dir, xray_file in pending:
        case_id = f"{mri.participant}_{mri.visit}_{'R' if side == 'right' else 'L'}"
        why = check_id(case_id)
        if why:
            skipped.append(Skipped(mri.participant, mri.visit, mri.where, f"bad id: {why}"))
            continue
        cases.append(Case(id=case_id, xray=xray_file, mri=mri_dir, side=side, split=splits[mri.participant],
                          xray_half=HALF_OF_SIDE[side],
                          extra={"participant": mri.participant, "visit": mri.visit}))
    cases.sort(key=lambda c: c.id)
    for s in skipped:
        log.debug("skipped %s %s %s: %s", s.participant, s.visit, s.what, s.reason)
    return OaiImport(cases=cases, skipped=skipped, rows_read=len(rows), participants=len(splits))


def import_oai(root: str | Path, out: str | Path, visits: Sequence[str] = ("00m",), *,
               mri_series: str = "SAG_3D_DESS", seed: int = 0,
               split: Sequence[float] = (0.8, 0.1, 0.1)) -> OaiImport:
    """`pair_oai`, then write the manifest `out` atomically (when at least one case paired)."""
    result = pair_oai(root, visits, mri_series=mri_series, seed=seed, split=split)
    if not result.cases:
        raise InputError(root, f"no {mri_series}_LEFT/_RIGHT MRI could be paired with a bilateral PA fixed "
                               f"flexion knee X-ray in visit(s) {', '.join(visits)} ({len(result.skipped)} "
                               "relevant series skipped)")
    write_manifest(out, result.cases)
    return result


__all__ = ["pair_oai", "import_oai", "OaiImport", "Skipped", "ContentsRow", "find_contents", "read_contents",
           "mri_side", "is_bilateral_xray", "split_participants", "parse_split", "HALF_OF_SIDE"]
