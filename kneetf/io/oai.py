"""Osteoarthritis Initiative (OAI) release folders -> a kneetf manifest.

Layout read: `ROOT/<visit>/<release>/<ParticipantID>/<StudyDate>/<Barcode>/001...`, one
series per listed folder (files `001`, `002`, ... without suffix), and a `contents.csv` with
columns `Folder,ParticipantID,StudyDate,Barcode,StudyDescription,SeriesDescription`, one row
per series. Every `contents.csv` found at `ROOT/<visit>/contents.csv` or
`ROOT/<visit>/<release>/contents.csv` is read; its `Folder` is resolved against the csv's
folder first, then the visit folder and the root. A `Folder` may also name a series
sub-folder of a study (`<Barcode>/002`), one image file, or a study folder whose images
(directly inside or in series sub-folders) are told apart by their DICOM headers.

Pairing, per participant and visit:
* knee MRI: SeriesDescription starts with the `mri_series` prefix (default `SAG_3D_DESS`)
  and ends with `_LEFT` or `_RIGHT` (the knee's side). When one side has several, the series
  named exactly `<prefix>_<SIDE>` comes first, then the earliest (StudyDate, Barcode).
* X-ray: chosen by each SERIES' own description, not its study's. A study "Bilateral PA
  Fixed Flexion Knee" may hold a hand, hip, lateral knee or localizer series beside the
  bilateral PA knee: every series of such a study, and every series whose own description
  names a bilateral PA knee, is a candidate, classified by `xray_description`. A candidate
  whose SeriesDescription names something else (a hand, a lateral view, ...) is skipped. The
  DICOM header (SeriesDescription, BodyPartExamined, ImageLaterality, ViewPosition,
  ImageType, Modality) of every candidate image is read (not its pixels): a header that
  contradicts the listing skips the image; when the listing says nothing about the series
  (an empty SeriesDescription, a folder listed as several series, a folder holding several
  images) the header must confirm a bilateral PA knee, unless the image is the visit's only
  candidate and nothing in the header contradicts it. Both knees are on one image, the
  patient's RIGHT knee on the image's LEFT half.

Everything listed and not used is reported with the reason: `OaiImport.skipped` (series
that were candidates, and MRIs left without an X-ray) and `OaiImport.ignored` (the other
series); `kneetf import-oai` writes both to `<manifest>.skipped.csv`, each with the absolute
path of its folder or image (the listing's `Folder` as written when it was not found). An
image file that is not DICOM, or cut short, is skipped as unreadable, a failure of the release.

Decision on the X-ray halves: nothing is copied or rewritten. Each manifest row points at
the whole bilateral X-ray file and says which half of the stored image is its knee in an
`xray_half` column (`left` for the right knee, `right` for the left knee); `read_manifest`
keeps it in `Case.xray_half` and `read_xray(path, half=...)` crops it. When a visit has
several usable X-rays (repeat scans) the first by (StudyDate, Barcode, folder) is used and
the others are reported. Ids are `<ParticipantID>_<visit>_<R|L>`. Splits are drawn per
participant with a seeded generator, so no participant is in two splits (across visits too).

Paths outside the manifest's folder are written absolute; `read_manifest` then needs
`allow_outside=True` (the OAI tree usually lives elsewhere).
"""
from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from kneetf.errors import ConfigError, InputError
from kneetf.io.atomic import write_text_atomic
from kneetf.io.manifest import Case, check_id, split_participants, write_manifest
from kneetf.io.outdir import check_output_file

log = logging.getLogger(__name__)

CONTENTS_COLUMNS = ("Folder", "ParticipantID", "StudyDate", "Barcode", "StudyDescription", "SeriesDescription")
XRAY_DESCRIPTION = "bilateral pa fixed flexion knee"
#: image half (columns of the stored bilateral X-ray) holding each knee of the patient
HALF_OF_SIDE = {"right": "left", "left": "right"}
#: columns of the skipped-series report
SKIPPED_COLUMNS = ("participant", "visit", "what", "reason", "folder")
#: skip reasons that describe the release, not a problem with it (`OaiImport.failures`)
BY_DESIGN = ("not a bilateral PA knee X-ray", "extra X-ray", "extra MRI series", "unpaired MRI", "unpaired X-ray",
             "not used")

# Words of a description that name another body part or view than a PA knee radiograph.
_OTHER_WORDS = {
    "hand": "a hand", "hands": "a hand", "wrist": "a wrist", "finger": "a hand", "fingers": "a hand",
    "hip": "a hip", "hips": "a hip", "pelvis": "a pelvis", "spine": "a spine", "chest": "a chest",
    "ankle": "an ankle", "foot": "a foot", "feet": "a foot", "femur": "a femur", "tibia": "a tibia",
    "limb": "a full limb", "scanogram": "a full limb", "lateral": "a lateral view", "lat": "a lateral view",
    "localizer": "a localizer", "localiser": "a localizer", "scout": "a localizer", "survey": "a localizer",
    "topogram": "a localizer", "skyline": "a patella view", "sunrise": "a patella view",
    "merchant": "a patella view", "patella": "a patella view", "tunnel": "a tunnel view", "notch": "a tunnel view",
    "oblique": "an oblique view", "axial": "an axial view", "ap": "an AP view",
}
_KNEE_WORDS = {"knee", "knees"}
_PA_WORDS = {"pa", "posteroanterior"}
_BILATERAL_WORDS = {"bilateral", "bilat", "bil", "both"}
_ONE_SIDE_WORDS = {"left", "right", "lt", "rt"}
#: BodyPartExamined values that do not rule a knee out
_VAGUE_BODY_PARTS = {"", "EXTREMITY", "LEG", "LOWER LIMB", "LOWERLIMB", "LOWER EXTREMITY", "LOWEREXTREMITY",
                     "LOWER_EXTREMITY", "LOWER_LIMB", "JOINT"}
_LATERAL_VIEWS = {"LL", "RL", "LLD", "RLD", "LAT", "LATERAL", "LLO", "RLO"}
_XRAY_MODALITIES = {"CR", "DX", "RG", "DR", "OT", "PX"}
_NOT_IMAGES = {".txt", ".csv", ".json", ".xml", ".md", ".html", ".pdf", ".log", ".ini", ".zip"}


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

    @property
    def what(self) -> str:
        series = self.series_description or f"(no SeriesDescription) of study {self.study_description!r}"
        return f"{series} ({self.where})"


@dataclass(frozen=True)
class Skipped:
    """A listed series (or one of its images) left out of the manifest, and why."""

    participant: str
    visit: str
    what: str
    reason: str
    folder: str = ""


@dataclass
class OaiImport:
    """What `pair_oai` found: the cases, the candidate series it skipped (and MRIs left
    unpaired) in `skipped`, and the other listed series it did not use in `ignored`."""

    cases: list[Case]
    skipped: list[Skipped] = field(default_factory=list)
    rows_read: int = 0
    participants: int = 0
    ignored: list[Skipped] = field(default_factory=list)

    def failures(self) -> list[Skipped]:
        """The skipped candidates that point at a problem with the release (a missing folder,
        an unreadable or contradictory file, an ambiguous choice), not at how OAI is organised
        (`BY_DESIGN`: other views, extra series, a knee imaged by one modality only)."""
        return [s for s in self.skipped if not s.reason.startswith(BY_DESIGN)]

    def skipped_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for s in self.skipped:
            counts[s.reason.split(":")[0]] += 1
        return dict(counts)

    def report_csv(self) -> str:
        """The skipped and the ignored series as CSV (`SKIPPED_COLUMNS`)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(SKIPPED_COLUMNS)
        for s in self.skipped + self.ignored:
            writer.writerow([s.participant, s.visit, s.what, s.reason, s.folder])
        return buf.getvalue()


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


def _words(text: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", text.lower().replace(".", ""))) - {""}


def xray_description(text: str) -> tuple[str, str]:
    """Classify an X-ray series or study description -> (verdict, why).

    "knee": a PA view of the knees, bilateral unless it names one side ("why" says
    "bilateral" when it says so); "other": something else (why names it: a hand, a lateral
    view, one knee only, ...); "unknown": empty or silent about the body part and view.
    """
    words = _words(text)
    if not words:
        return "unknown", ""
    others = sorted({_OTHER_WORDS[w] for w in words if w in _OTHER_WORDS})
    if others:
        return "other", " and ".join(others)
    if words & _KNEE_WORDS:
        if not words & _PA_WORDS:
            return "unknown", "a knee, view not named"
        if words & _BILATERAL_WORDS:
            return "knee", "bilateral"
        if words & _ONE_SIDE_WORDS:
            return "other", "one knee only"
        return "knee", ""
    return "unknown", ""


def is_bilateral_xray(row: ContentsRow) -> bool:
    """True when the row's series, or its study, is described as a bilateral PA knee X-ray."""
    return any(xray_description(d) == ("knee", "bilateral")
               for d in (row.series_description, row.study_description))


def _header_text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, None)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def xray_header(path: Path) -> tuple[str, str]:
    """Classify one image file from its DICOM header (pixels are not read) -> (verdict, why),
    verdicts as `xray_description`, "no image" for a DICOM object that is not an image (a
    report, a presentation state), or "unreadable" for a file that is not a DICOM file, or
    whose pixel data the file cuts short; what the header says is in `why`."""
    from kneetf.io.dicom import header_values, read_header

    try:
        ds = read_header(path)  # pixel data deferred, never read here; deflated files capped
        with header_values(path):
            return _header_verdict(ds, path)
    except InputError as e:
        return "unreadable", e.reason


def _header_verdict(ds: Any, path: Path) -> tuple[str, str]:
    from kneetf.io.dicom import missing_image, not_an_image, pixel_data_cut, sop_class_name

    missing = pixel_data_cut(ds, path)
    if missing:
        return "unreadable", f"truncated: its pixel data ends {missing} bytes past the end of the file"
    if not_an_image(ds):
        return "no image", f"not an image: {sop_class_name(ds)}, without pixel data"
    no_image = missing_image(ds)
    if no_image:
        return "unreadable", no_image
    facts = {k: _header_text(ds, k) for k in ("SeriesDescription", "BodyPartExamined", "ImageLaterality",
                                              "ViewPosition", "Modality", "ImageType")}
    said = ", ".join(f"{k} {v!r}" for k, v in facts.items() if v and k != "ImageType")
    other = []
    if "LOCALIZER" in facts["ImageType"].upper():
        other.append("a localizer (ImageType)")
    if facts["Modality"] and facts["Modality"].upper() not in _XRAY_MODALITIES:
        other.append(f"not a radiograph (Modality {facts['Modality']})")
    verdict, why = xray_description(facts["SeriesDescription"])
    if verdict == "other":
        other.append(f"{why} (SeriesDescription)")
    body = facts["BodyPartExamined"].upper()
    if body and "KNEE" not in body and body not in _VAGUE_BODY_PARTS:
        other.append(f"BodyPartExamined {facts['BodyPartExamined']}")
    view = facts["ViewPosition"].upper()
    if view in _LATERAL_VIEWS:
        other.append(f"a lateral view (ViewPosition {facts['ViewPosition']})")
    laterality = facts["ImageLaterality"].upper()
    if laterality in ("L", "R"):
        other.append(f"one knee only (ImageLaterality {laterality})")
    if other:
        return "other", "; ".join(other)
    knee = verdict == "knee" or "KNEE" in body
    if knee and (view in ("", "PA") or verdict == "knee"):
        return "knee", said
    return "unknown", said or "no SeriesDescription, BodyPartExamined, ImageLaterality or ViewPosition"


def _series_path(row: ContentsRow, root: Path) -> Path | None:
    rel = Path(row.folder.replace("\\", "/"))
    for base in (row.csv.parent, root / row.visit, root):
        candidate = base / rel
        if candidate.exists():
            return candidate
    return None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _image_files(path: Path, depth: int = 2) -> list[Path]:
    """The image files a listed path stands for: itself, or the plain files of the folder,
    or (a study folder) those of its series sub-folders."""
    if path.is_file():
        return [path]
    files = [f for f in _files(path) if f.suffix.lower() not in _NOT_IMAGES and f.name.upper() != "DICOMDIR"]
    if files or depth == 0:
        return files
    return [f for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            for f in _image_files(sub, depth - 1)]


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


# === Choosing the X-ray ===
@dataclass
class _XrayCandidate:
    row: ContentsRow
    file: Path
    evidence: int  # 2: listing and header agree, 1: one of them says knee, 0: neither contradicts
    note: str


def _xray_candidates(rows: list[ContentsRow], path: Path, root: Path, skip: Any) -> list[_XrayCandidate]:
    """The usable images among the series listed as `rows` (one folder or file, listed by
    one or more rows); everything else is reported through `skip(row, image, reason)`."""
    row = rows[0]
    descriptions = {r.series_description for r in rows}
    listings = {xray_description(d) for d in descriptions}
    if len(rows) == 1 or len(descriptions) == 1:
        listing, listed_why = xray_description(row.series_description)
        if listing == "other":
            skip(row, path, f"not a bilateral PA knee X-ray: listed as {row.series_description!r} "
                            f"({listed_why})")
            return []
    else:  # one folder listed as several series: the listing cannot say which image is which
        listing, listed_why = "unknown", "listed as " + " and ".join(repr(d) for d in sorted(descriptions))
        if all(v == "other" for v, _ in listings):
            skip(row, path, f"not a bilateral PA knee X-ray: {listed_why}")
            return []
    headers = []
    for image in _image_files(path):
        verdict, why = xray_header(image)
        if verdict == "no image":
            skip(row, image, f"not used: {why}")
        else:
            headers.append((image, verdict, why))
    images = [image for image, _, _ in headers]
    if not images:
        skip(row, path, "X-ray folder holds no image file")
        return []
    out = []
    for image, verdict, why in headers:
        if verdict == "unreadable":
            skip(row, image, f"unreadable X-ray file: {why}")
            continue
        if verdict == "other":
            if listing == "knee":
                skip(row, image, f"DICOM header contradicts the listing {row.series_description!r}: {why}")
            else:
                skip(row, image, f"not a bilateral PA knee X-ray: DICOM header says {why}")
            continue
        listed_knee = listing == "knee"
        if len(images) > 1:  # the listing does not say which image: only a header naming a knee does
            evidence = (1 + listed_knee) if verdict == "knee" else 0
        else:
            evidence = listed_knee + (verdict == "knee")
        out.append(_XrayCandidate(row, image, evidence, why))
    confirmed = [c for c in out if c.evidence >= 1]
    if len(out) > 1 or (confirmed and len(confirmed) < len(out)):
        for c in out:
            if c.evidence == 0:
                skip(row, c.file, f"ambiguous: {len(images)} images in {listed_why or 'an unnamed series'} and "
                                  f"this one's DICOM header does not show a bilateral PA knee ({c.note})")
        out = confirmed
    return out


def _choose_xray(candidates: list[_XrayCandidate], skip: Any) -> _XrayCandidate | None:
    if not candidates:
        return None
    strongest = max(c.evidence for c in candidates)
    if strongest == 0 and len(candidates) > 1:
        for c in candidates:
            skip(c.row, c.file, f"ambiguous: {len(candidates)} candidate images at this visit and no listing "
                                "or DICOM header names a bilateral PA knee")
        return None
    ordered = sorted(candidates, key=lambda c: (-c.evidence, c.row.study_date, c.row.barcode, str(c.file)))
    best = ordered[0]
    for extra in ordered[1:]:
        if extra.evidence == best.evidence:
            skip(extra.row, extra.file, f"extra X-ray: using {best.file} (barcode {best.row.barcode})")
        else:
            skip(extra.row, extra.file, f"ambiguous: {best.file} (barcode {best.row.barcode}) is the better "
                                        f"confirmed bilateral PA knee; this one's header says {extra.note or 'nothing'}")
    return best


# === Pairing ===
def pair_oai(root: str | Path, visits: Sequence[str] = ("00m",), *, mri_series: str = "SAG_3D_DESS",
             seed: int = 0, split: Sequence[float] = (0.8, 0.1, 0.1)) -> OaiImport:
    """Pair each knee MRI with the bilateral X-ray of the same participant and visit (see
    the module docstring for how the X-ray series is chosen)."""
    root = Path(root)
    fractions = parse_split(split)
    rows: list[ContentsRow] = []
    skipped: list[Skipped] = []
    ignored: list[Skipped] = []
    for visit in visits:
        for csv_path in find_contents(root, visit):
            got, bad = read_contents(csv_path, visit)
            rows += got
            skipped += bad

    def skip(row: ContentsRow, path: Path | None, reason: str, into: list[Skipped] = skipped) -> None:
        where = row.folder if path is None else os.path.normpath(path.absolute())
        into.append(Skipped(row.participant, row.visit, row.what, reason, where))

    xray_studies = {(r.participant, r.visit, r.study_date, r.barcode) for r in rows
                    if xray_description(r.study_description) == ("knee", "bilateral")}
    xray_rows: dict[Path, list[ContentsRow]] = defaultdict(list)
    mris: dict[tuple[str, str, str], list[tuple[ContentsRow, Path]]] = defaultdict(list)
    seen_mri: set[Path] = set()
    for row in rows:
        side = mri_side(row.series_description, mri_series)
        in_xray_study = (row.participant, row.visit, row.study_date, row.barcode) in xray_studies
        if side is None and not in_xray_study and not is_bilateral_xray(row):
            skip(row, None, f"not used: neither a {mri_series}_LEFT/_RIGHT MRI nor a series of a bilateral PA "
                            "knee X-ray study", ignored)
            continue
        path = _series_path(row, root)
        if path is None:
            skip(row, None, f"folder not found: {row.folder}")
            continue
        if side is not None:
            if path not in seen_mri:  # a folder listed by two contents.csv files counts once
                seen_mri.add(path)
                mris[(row.participant, row.visit, side)].append((row, path))
        else:
            xray_rows[path].append(row)

    candidates: dict[tuple[str, str], list[_XrayCandidate]] = defaultdict(list)
    for path, listed in xray_rows.items():
        unique = list({r.series_description: r for r in listed}.values())  # the same series listed twice
        for c in _xray_candidates(unique, path, root, skip):
            candidates[(c.row.participant, c.row.visit)].append(c)
    chosen_xray = {key: c for key, cs in sorted(candidates.items()) if (c := _choose_xray(cs, skip)) is not None}

    pending: list[tuple[ContentsRow, str, Path, Path]] = []
    paired: set[tuple[str, str]] = set()
    for (pid, visit, side), found in sorted(mris.items()):
        exact = f"{mri_series}_{side}".upper()
        found = sorted(found, key=lambda m: (m[0].series_description.upper() != exact, m[0].study_date,
                                             m[0].barcode, m[0].folder))
        mri, mri_dir = found[0]
        for extra, extra_dir in found[1:]:
            skip(extra, extra_dir, f"extra MRI series: using {mri.series_description} of barcode {mri.barcode}")
        if (pid, visit) not in chosen_xray:
            skip(mri, mri_dir, "unpaired MRI: no bilateral PA fixed flexion knee X-ray at this visit")
            continue
        paired.add((pid, visit))
        if not mri_dir.is_dir() or not _files(mri_dir):
            skip(mri, mri_dir, "empty MRI folder")
        else:
            pending.append((mri, side, mri_dir, chosen_xray[(pid, visit)].file))
    for key, xray in chosen_xray.items():
        if key not in paired:
            skip(xray.row, xray.file, f"unpaired X-ray: no {mri_series}_LEFT/_RIGHT MRI at this visit")

    splits = split_participants([m.participant for m, *_ in pending], fractions, seed)
    cases = []
    for mri, side, mri_dir, xray_file in pending:
        case_id = f"{mri.participant}_{mri.visit}_{'R' if side == 'right' else 'L'}"
        why = check_id(case_id)
        if why:
            skip(mri, mri_dir, f"bad id: {why}")
            continue
        cases.append(Case(id=case_id, xray=xray_file, mri=mri_dir, side=side, split=splits[mri.participant],
                          xray_half=HALF_OF_SIDE[side],
                          extra={"participant": mri.participant, "visit": mri.visit}))
    cases.sort(key=lambda c: c.id)
    for s in skipped:
        log.debug("skipped %s %s %s: %s", s.participant, s.visit, s.what, s.reason)
    return OaiImport(cases=cases, skipped=skipped, rows_read=len(rows), participants=len(splits), ignored=ignored)


def skipped_report_path(manifest: str | Path) -> Path:
    """Where `import_oai` writes the skipped series by default: `<manifest stem>.skipped.csv`."""
    manifest = Path(manifest)
    return manifest.with_name(manifest.stem + ".skipped.csv")


def _check_outputs(root: Path, out: Path, report: Path, visits: Sequence[str]) -> None:
    """ConfigError unless the manifest `out` and the skipped report can be written without
    replacing a file the import reads (a contents.csv, an image of the tree) or each other."""
    contents: list[Path] = []
    for visit in visits:
        try:
            contents += find_contents(root, visit)
        except InputError:  # pair_oai says what is missing
            pass
    tree = root.resolve()
    for path, flag in ((out, "--out"), (report, "--skipped-report")):
        check_output_file(path, flag, inputs=contents)
        inside = path.resolve().is_relative_to(tree)
        if inside and (path.name.lower() == "contents.csv" or (path.is_file() and path.suffix.lower() != ".csv")):
            raise ConfigError(f"{flag} {path} is a file of the OAI tree {root} (a contents.csv listing or an "
                              "image); kneetf would write over it")
    if os.path.abspath(out) == os.path.abspath(report):
        raise ConfigError(f"--skipped-report {report} is the --out manifest; give another file")


def import_oai(root: str | Path, out: str | Path, visits: Sequence[str] = ("00m",), *,
               mri_series: str = "SAG_3D_DESS", seed: int = 0, split: Sequence[float] = (0.8, 0.1, 0.1),
               skipped_report: str | Path | None = None) -> OaiImport:
    """`pair_oai`, then write the skipped-series report (`skipped_report`, default
    `skipped_report_path(out)`) and, when at least one case paired, the manifest `out`;
    both atomically. Neither may be a file of the OAI tree: its contents.csv listings, its
    images (a ConfigError before any work)."""
    report = Path(skipped_report) if skipped_report is not None else skipped_report_path(out)
    _check_outputs(Path(root), Path(out), report, visits)
    result = pair_oai(root, visits, mri_series=mri_series, seed=seed, split=split)
    write_text_atomic(report, result.report_csv())
    if not result.cases:
        raise InputError(root, f"no {mri_series}_LEFT/_RIGHT MRI could be paired with a bilateral PA fixed "
                               f"flexion knee X-ray in visit(s) {', '.join(visits)} ({len(result.skipped)} "
                               f"relevant series skipped; see {report})")
    write_manifest(out, result.cases)
    return result


__all__ = ["pair_oai", "import_oai", "OaiImport", "Skipped", "ContentsRow", "find_contents", "read_contents",
           "mri_side", "is_bilateral_xray", "xray_description", "xray_header", "split_participants", "parse_split",
           "skipped_report_path", "HALF_OF_SIDE", "SKIPPED_COLUMNS"]
