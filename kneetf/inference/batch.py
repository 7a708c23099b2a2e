"""`kneetf predict` as a library: X-ray files, folders and manifests -> reconstructed volumes
in one output folder.

Every X-ray goes through what the cache applied to the training X-rays
(`kneetf.preprocess.xray.prepare_xray`: ROI from `roi_source`, crop, mirroring of left knees
when the model's preprocessing mirrors, resize + robust normalisation), then the model
(`Predictor`: `.keras`, run folder, SavedModel or `.tflite`), then `to_output_volume` and the
writers of `kneetf.inference.outputs`. A file that fails is reported and the rest are written.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kneetf.config import PreprocessConfig
from kneetf.errors import ConfigError, InputError, KneetfError, storage_reason
from kneetf.inference.loading import model_roi_source, read_preprocess_config, resolve_model_path
from kneetf.io.outdir import MARKER, OutputFolder, written_by_kneetf
from kneetf.inference.outputs import (FORMATS, NAMES, PSEUDONYM_KEY, SeriesNumbers, SourceXray, output_paths,
                                      parse_formats, write_prediction)
from kneetf.inference.predictor import load_predictor
from kneetf.inference.pseudonyms import KEY_FIELDS, PseudonymKey, read_pseudonym_key
from kneetf.io.atomic import CsvLog, remove_debris, write_csv_atomic
from kneetf.io.lookup import lookup
from kneetf.io.writers import foreign_files
from kneetf.preprocess.roi import CsvRoi
from kneetf.preprocess.xray import (PreparedXray, crop_xray, normalize_side, prepare_xray,
                                   to_output_volume)

XRAY_SUFFIXES = {".dcm", ".dicom", ".ima", ".png", ".tif", ".tiff", ".jpg", ".jpeg", ".npy"}


@dataclass
class XrayInput:
    """One X-ray to reconstruct: `path` (a file), its `id` (file stem or manifest id: the key
    of ROI boxes) and the knee `side`; `name` is its output name (the id or a pseudonym)."""

    id: str
    path: Path
    side: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    name: str = ""


log = logging.getLogger(__name__)

PREDICTIONS_CSV = "predictions.csv"
PREDICTION_FIELDS = ("id", "source", "side", "mirrored", "x0", "y0", "x1", "y1", "roi_source", "roi_confidence",
                     "roi_flagged")
ERRORS_CSV = "errors.csv"
ERROR_FIELDS = ("id", "file", "reason")
_SAFE_ID = re.compile(r"[^\w.-]+")  # letters and digits of any script stay (`\w` matches them in str)


#: Longest output name in UTF-8 bytes: `<name>.nii.gz` and its temporary name (which keeps every
#: dot-suffix of the name, `kneetf.io.atomic`) then fit the 255 bytes of a file name.
MAX_NAME_BYTES = 200


def safe_id(text: str) -> str:
    """An id usable as a file name: letters and digits of any script, '.', '-' and '_' stay,
    every other run of characters becomes '_' (leading and trailing '.' and '_' go)."""
    # NFC: an accent stored apart from its letter (macOS file names) would become '_' on its own
    out = _SAFE_ID.sub("_", unicodedata.normalize("NFC", str(text))).strip("._")
    return out or "xray"


def output_name(case_id: str) -> str:
    """The output name of an id (`--names id`): the id itself, or, over `MAX_NAME_BYTES`, the
    id cut at a character, '-' and 8 hex digits of the SHA-256 of the whole id (different long
    ids keep different names)."""
    encoded = case_id.encode()
    if len(encoded) <= MAX_NAME_BYTES:
        return case_id
    digest = hashlib.sha256(encoded).hexdigest()[:8]
    return encoded[:MAX_NAME_BYTES - 9].decode(errors="ignore").rstrip("._") + "-" + digest


def file_id(path: Path) -> str:
    """The id of an input file: its name without the suffix (`.nii.gz` as one); a name whose
    last dot is followed by digits only (a DICOM file named by its UID) is kept whole."""
    name = path.name
    for suffix in (".nii.gz",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix and not path.suffix[1:].isdigit() else name


def _not_an_image(path: Path) -> bool:
    """True for a DICOM file whose header shows an object that is not an image (a structured
    report, a presentation state...); a file that does not parse is left to the decoder."""
    from kneetf.io.dicom import not_an_image, read_header

    try:
        return not_an_image(read_header(path, force=True))
    except Exception:  # left to the reader, which names the problem
        return False


def _folder_files(folder: Path) -> list[Path]:
    """The X-ray files of a folder; DICOM objects that are not images are left out (logged)."""
    from kneetf.io.dicom import looks_like_dicom

    out, not_images = [], []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name.upper() == "DICOMDIR":  # a DICOM CD's index, not an image
            continue
        dicom = looks_like_dicom(p)
        if dicom and _not_an_image(p):
            not_images.append(p.name)
        elif dicom or p.suffix.lower() in XRAY_SUFFIXES:
            out.append(p)
    if not_images:
        log.info("%s: left out %d DICOM file(s) that hold no image (reports, presentation states): %s%s",
                 folder, len(not_images), ", ".join(not_images[:5]), " ..." if len(not_images) > 5 else "")
    return out


def collect_inputs(paths: Sequence[str | Path], *, allow_outside: bool = False, unique_ids: bool = True
                   ) -> tuple[list[XrayInput], list[dict[str, str]]]:
    """X-ray files, folders of them (not recursive) and manifest CSVs -> (inputs, errors).

    Ids are file stems, or the manifest's ids; ids that are not file-name safe are made so.
    An input given twice (the same file, id, side and options, however its path is written:
    a file and its folder, `a.dcm` and `./a.dcm`) is taken once. With `unique_ids` (ids are
    the output names) a repeated id of another input is reported as an error (the first one
    wins).
    """
    items: list[XrayInput] = []
    errors: list[dict[str, str]] = []
    for raw in paths:
        p = Path(raw)
        found, refused = lookup(p)
        if found is None:
            errors.append({"id": safe_id(file_id(p)), "file": str(p),
                           "reason": f"cannot be looked up: {refused}" if refused else "does not exist"})
        elif stat.S_ISDIR(found.st_mode):
            files = _folder_files(p)
            if not files:
                errors.append({"id": "", "file": str(p), "reason": "folder holds no X-ray files "
                               f"({', '.join(sorted(XRAY_SUFFIXES))} or DICOM)"})
            items += [XrayInput(safe_id(file_id(f)), f) for f in files]
        elif p.suffix.lower() == ".csv":
            from kneetf.io.manifest import read_manifest

            result = read_manifest(p, require_mri=False, allow_outside=allow_outside)
            for e in getattr(result, "errors", []):
                errors.append({"id": "", "file": str(getattr(e, "path", p) or p),
                               "reason": getattr(e, "reason", str(e))})
            for case in result.cases:
                half = getattr(case, "xray_half", None)
                items.append(XrayInput(safe_id(case.id), Path(case.xray), normalize_side(case.side),
                                       {"half": half} if half else {}))
        else:
            items.append(XrayInput(safe_id(file_id(p)), p))
    given: set[tuple[Any, ...]] = set()
    seen: dict[str, Path] = {}
    unique = []
    for it in items:
        same = (it.path.resolve(), it.id, it.side, tuple(sorted(it.options.items())))
        if same in given:  # the same input again
            continue
        given.add(same)
        name = output_name(it.id)
        if unique_ids and name in seen:
            errors.append({"id": it.id, "file": str(it.path),
                           "reason": f"output name {name!r} is also that of {seen[name]}; rename one of the files"})
            continue
        seen.setdefault(name, it.path)
        unique.append(it)
    return unique, errors


def read_input(item: XrayInput, config: PreprocessConfig, roi: Any, *, normalize: bool = True) -> PreparedXray:
    """Read and prepare one input file (InputError naming the file on failure):
    `prepare_xray`, or only its ROI crop and mirroring (`crop_xray`) when not `normalize`."""
    from kneetf.io.readers import read_xray

    image, meta = read_xray(item.path, **item.options)
    side = item.side or getattr(meta, "laterality", None)
    info = meta.to_dict() if hasattr(meta, "to_dict") else dict(meta or {})
    prepare = prepare_xray if normalize else crop_xray
    return prepare(image, config, roi, case_id=item.id, side=side, source=str(item.path), meta=info)


def patient_module(path: Path) -> dict[str, Any]:
    """The patient attributes `keep_patient` copies from a DICOM X-ray
    (`kneetf.inference.outputs.PATIENT_KEYWORDS`); {} for other files."""
    source = SourceXray.read(path)
    return dict(source.patient) if source is not None else {}


def resolve_names(names: str, keep_patient: bool) -> str:
    """"auto" -> "pseudonym", or "id" with `keep_patient`; ConfigError for unknown names."""
    if names not in NAMES:
        raise ConfigError(f"names must be one of {', '.join(NAMES)}. Received: {names!r}")
    if names == "auto":
        return "id" if keep_patient else "pseudonym"
    return names


def _scrub(text: str, item: XrayInput | None, file: str, pseudonym: str) -> str:
    """`text` with the input's path and file name replaced by its pseudonym where they stand
    as a path or a file name: the path as given, absolute or resolved, the file name with
    whatever folders precede it, and the id or stem in quotes (`id 'x'`). A word of the
    message that only equals the file's stem stays."""
    paths = {Path(p) for p in (file, str(item.path) if item else "") if p}
    forms = {str(q) for p in paths for q in (p, p.absolute(), p.resolve())}
    names = {p.name for p in paths} | {p.resolve().name for p in paths}
    start, end = r"(?<![A-Za-z0-9_./\\-])", r"(?![A-Za-z0-9_]|\.[A-Za-z0-9])"
    for form in sorted(forms, key=len, reverse=True):
        text = re.sub(start + re.escape(form) + end, pseudonym, text)
    for name in sorted(names, key=len, reverse=True):  # with the folders before it, however written
        text = re.sub(rf"{start}(?:[^\s'\"]*[/\\])?{re.escape(name)}{end}", pseudonym, text)
    stems = {item.id if item else "", *(file_id(p) for p in paths)}
    for stem in sorted((w for w in stems if w), key=len, reverse=True):
        text = re.sub(rf"(['\"]){re.escape(stem)}\1", rf"\g<1>{pseudonym}\g<1>", text)
    return text


@dataclass
class PredictReport:
    """What `predict_files` did: `written` maps id -> paths; `errors` lists id/file/reason;
    `flagged` the ids whose ROI box is worth a look."""

    out_dir: Path
    written: dict[str, list[Path]] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    #: ids of the outputs whose ROI box its source flagged for review (roi_flagged = 1)
    flagged: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.written)


def error_reason(e: BaseException) -> str:
    """What went wrong with one input, for a report that names the file beside it."""
    if isinstance(e, InputError):
        return e.reason
    if isinstance(e, KneetfError):
        return str(e)
    return f"{type(e).__name__}: {e}"


def known_preprocess(model: Any, preprocess: PreprocessConfig | str | Path | None = None
                     ) -> PreprocessConfig | None:
    """The preprocessing config `load_predictor(model, preprocess)` will use, when it can be
    told without loading the model: given, or recorded beside a model path. None otherwise
    (an in-memory model, or a model file without a record: its input size decides). A model
    path that does not exist raises InputError here."""
    from kneetf.inference.predictor import Predictor

    if isinstance(model, Predictor):
        return model.preprocess
    if isinstance(preprocess, PreprocessConfig):
        return preprocess
    if preprocess is not None:
        found = read_preprocess_config(preprocess)
        if found is None:
            raise InputError(preprocess, "holds no preprocessing config (a 'preprocess' entry)")
        return found
    if not isinstance(model, (str, Path)):
        return None
    kind, file = resolve_model_path(model)
    found = read_preprocess_config(file)
    if found is None and kind == "keras":
        found = _keras_archive_sizes(file)
    return found


def _keras_archive_sizes(file: Path) -> PreprocessConfig | None:
    """PreprocessConfig(image_size, num_slices) of a KneeNet `.keras` archive's model config
    (what `load_predictor` derives from the loaded model), read without loading it."""
    import zipfile

    try:
        with zipfile.ZipFile(file) as z:
            blob = json.loads(z.read("config.json"))
        sizes = blob["config"]["config"]
        return PreprocessConfig(image_size=int(sizes["image_size"]), num_slices=int(sizes["num_slices"]))
    except Exception:  # not a KneeNet archive as kneetf writes it: the loaded model will tell
        return None


def predict_files(model: Any, inputs: Sequence[str | Path], out_dir: str | Path, *,
                  formats: Sequence[str] = ("nifti",), roi: Any = None, keep_patient: bool = False,
                  batch_size: int = 8, preprocess: PreprocessConfig | str | Path | None = None,
                  allow_outside: bool = False, progress: bool = True, trust_model: bool = False,
                  names: str = "auto",
                  pseudonym_key: str | Path | None = None) -> PredictReport:
    """Reconstruct every X-ray of `inputs` (files, folders, manifest CSVs) into `out_dir`.

    A file that fails (unreadable, no ROI, a kneetf output, ...) is reported in the returned
    report and in `out_dir/errors.csv`; the others are written. `out_dir/predictions.csv`
    lists what was written (id, source, side, mirrored, ROI box, its source, confidence and
    review flag), one row appended as each
    reconstruction's files are all in place (each file, and a DICOM series as a folder, is
    renamed into place whole): a killed run leaves the finished ones listed and nothing
    half-written, and the same call again writes them all. The table keeps the rows of an
    earlier run's outputs still in the folder (at the end, one row per output: the last); an
    X-ray that an earlier run wrote loses its earlier outputs when it fails now as it is read
    or written (the error says so) and, when written again, those in formats this run does
    not write (a DICOM series folder holding a user's file stays): the folder holds what its
    `predictions.csv` lists, one reconstruction per name. `names` (`NAMES`): output names
    are the ids, or pseudonyms ("auto": pseudonyms unless `keep_patient`); with pseudonyms
    `source` is left empty, errors name pseudonyms, and `pseudonym_key` (default
    `out_dir/PSEUDONYM_KEY`, written before any output) maps each pseudonym to its source
    file; a rerun after a killed run gives its unfinished sources the same pseudonyms. An
    `out_dir` that is or holds an input is refused (ConfigError); an output name that exists
    and was not written by kneetf is reported and not replaced. Only `out_dir` (and
    `pseudonym_key`) is written to, unless a SavedModel or TFLite model loaded with
    `trust_model` does otherwise (`load_predictor`). `roi` (see
    `kneetf.preprocess.xray.roi_source`) overrides the ROI source recorded with the model
    (`kneetf.inference.loading.model_roi_source`).
    """
    from tqdm.auto import tqdm

    formats = parse_formats(formats)
    names = resolve_names(names, keep_patient)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1. Received: batch_size={batch_size}")
    out = Path(out_dir)
    folder = OutputFolder(out)
    try:
        folder.refuse_inputs(inputs)
        key_path = Path(pseudonym_key) if pseudonym_key else out / PSEUDONYM_KEY
        run_files = [out / PREDICTIONS_CSV, out / ERRORS_CSV]
        if names == "pseudonym" and key_path.parent.resolve() == out.resolve():
            run_files.append(key_path)
        key = PseudonymKey(key_path) if names == "pseudonym" else None
        for p in run_files:
            if not folder.owns(p):
                raise ConfigError(f"{p} exists and was not written by kneetf; it is left as it is (move it, or "
                                  "choose another --out)")
        roi = model_roi_source(model if isinstance(model, (str, Path)) else None, roi)
        items, errors = collect_named_inputs(inputs, names, roi, allow_outside=allow_outside)
        folder.refuse_inputs(it.path for it in items)
        # the model loads once an X-ray is read: a batch of unreadable files never loads it (nor TensorFlow)
        predictor = None
        config = known_preprocess(model, preprocess)
        if config is None:
            predictor = load_predictor(model, preprocess, trust_model=trust_model)
            config = predictor.preprocess
        if key is not None:
            key.assign(items)
        else:
            for it in items:
                it.name = output_name(it.id)
        usable = []
        for it in items:
            marker = written_by_kneetf(it.path)
            if marker is not None:
                errors.append({"id": it.id, "file": str(it.path), "item": it,
                               "reason": f"is an output of kneetf (listed in {marker}), not an X-ray"})
            else:
                usable.append(it)
        items = usable
        folder.claim(run_files)
        remove_debris(out, names=folder.names | {MARKER})  # what a killed run left half-written; not a user's .tmp-*
        if key is not None:  # the key first: outputs of an interrupted run stay traceable
            key.write((it.name, str(it.path), "") for it in items)
            for e in errors:
                _pseudonymise_error(e, key)
        report = PredictReport(out, errors=list(errors))
        # a row is appended once the files of its reconstruction are all in place: a killed run
        # leaves a predictions.csv that lists exactly the finished ones
        rows = CsvLog(out / PREDICTIONS_CSV, PREDICTION_FIELDS, _listed_outputs(out / PREDICTIONS_CSV),
                      fault="predict.row")
        failures = CsvLog(out / ERRORS_CSV, ERROR_FIELDS, report.errors)

        def fail(item: XrayInput, reason: str) -> None:
            # what an earlier run wrote for this input is not this run's: a folder lists only what its run wrote
            try:
                stale = folder.discard(output_paths(out, item.name, FORMATS), _removable)
            except OSError as e:
                log.warning("%s: cannot remove the earlier outputs of %s (%s)", out, item.name, e)
                stale = []
            if stale:
                removed = ", ".join(p.name for p in stale)
                reason += f" (its earlier output{'s' if len(stale) > 1 else ''} {removed} removed)"
            e: dict[str, Any] = {"id": item.id, "file": str(item.path), "item": item, "reason": reason}
            if key is not None:
                _pseudonymise_error(e, key)
            report.errors.append(e)
            failures.append(e)

        numbers = SeriesNumbers()
        bar = tqdm(total=len(items), desc="predict", unit="xray", disable=not progress)
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prepared = []
            for item in chunk:
                try:
                    prepared.append((item, read_input(item, config, roi)))
                except Exception as e:  # report, keep going with the others
                    fail(item, error_reason(e))
                    bar.update(1)
            if not prepared:
                continue
            if predictor is None:
                predictor = load_predictor(model, preprocess, trust_model=trust_model)
            try:
                mri = predictor(np.stack([p.xray for _, p in prepared]))
            except Exception as e:
                for item, _ in prepared:
                    fail(item, f"model: {error_reason(e)}")
                bar.update(len(prepared))
                continue
            for (item, prep), vol in zip(prepared, mri):
                try:
                    folder.claim(output_paths(out, item.name, formats))
                    # formats an earlier run wrote and this one does not: another reconstruction under this name
                    folder.discard(output_paths(out, item.name, [f for f in FORMATS if f not in formats]), _removable)
                    source = SourceXray.read(item.path) if keep_patient and "dicom" in formats else None
                    paths = write_prediction(out, item.name, prep, to_output_volume(vol, prep.mirrored), formats,
                                             source=source, pseudonym=item.name if names == "pseudonym" else None,
                                             series_number=numbers.next(source))
                except Exception as e:
                    if storage_reason(e) is not None:  # every other output would fail alike: stop, keep
                        raise                               # the earlier ones
                    fail(item, f"writing: {error_reason(e)}")
                else:
                    report.written[item.name] = paths
                    found = prep.roi
                    if found is not None and found.flagged:
                        report.flagged.append(item.name)
                    rows.append({"id": item.name, "source": str(item.path) if names == "id" else "", "side": prep.side,
                                 "mirrored": int(prep.mirrored),
                                 **dict(zip(("x0", "y0", "x1", "y1"), (round(v, 2) for v in prep.box.as_tuple()))),
                                 "roi_source": found.source if found else "",
                                 "roi_confidence": "" if found is None or np.isnan(found.confidence)
                                 else round(found.confidence, 3),
                                 "roi_flagged": int(found.flagged) if found else 0})
                bar.update(1)
        bar.close()
        # one row per output still in the folder: a rewritten output's earlier row, and that of one
        # removed because its input failed, go now (a killed run leaves them, and the next run tidies)
        write_csv_atomic(out / PREDICTIONS_CSV, PREDICTION_FIELDS, _listed_outputs(out / PREDICTIONS_CSV),
                         fault="predict.table")
        if key is not None:  # each pseudonym's result
            key.write([(it.name, str(it.path), "written") for it in items if it.name in report.written]
                      + [(e["id"], e["source"], "failed") for e in report.errors])
        for e in report.errors:
            e.pop("item", None)
        return report
    finally:
        folder.release()


def _removable(path: Path) -> bool:
    """Whether an earlier output may be removed: a file, or a DICOM series folder that holds
    nothing but its slices (a user's file added to it keeps it)."""
    return not path.is_dir() or not foreign_files(path)


def _listed_outputs(path: Path) -> list[dict[str, str]]:
    """The rows of `predictions.csv` (at `path`) of outputs still in its folder, the last row of
    each id (a rewritten output's), so that a run into a folder adds to its table instead of
    replacing it. An unreadable table is started afresh, with a warning."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        log.warning("%s: unreadable (%s); it lists only this run's outputs", path, e)
        return []
    last = {r["id"]: r for r in rows if isinstance(r.get("id"), str)}
    return [r for name, r in last.items() if any(p.exists() for p in output_paths(path.parent, name, FORMATS))]


def collect_named_inputs(paths: Sequence[str | Path], names: str, roi: Any, *, allow_outside: bool = False
                         ) -> tuple[list[XrayInput], list[dict[str, Any]]]:
    """`collect_inputs` for outputs named by `names` ("id" or "pseudonym") and boxes from
    `roi`: ids are the output names with "id", and the keys of the boxes of a boxes CSV, so
    either way an input whose id an earlier one has is reported, not processed."""
    items, errors = collect_inputs(paths, allow_outside=allow_outside, unique_ids=names == "id")
    if names != "id" and isinstance(roi, CsvRoi):
        items = _one_box_each(items, errors)
    return items, errors


def _one_box_each(items: list[XrayInput], errors: list[dict[str, Any]]) -> list[XrayInput]:
    """`items` less those whose id an earlier one has: a boxes CSV gives one box per id. Each
    one left out is reported (its reason names no other input: it may be pseudonymised)."""
    seen: set[str] = set()
    kept = []
    for it in items:
        if it.id in seen:
            errors.append({"id": it.id, "file": str(it.path), "item": it,
                           "reason": "another input has the same file name (stem), and the boxes CSV gives one "
                                     "box per name; rename one of the files"})
        else:
            seen.add(it.id)
            kept.append(it)
    return kept


def _pseudonymise_error(e: dict[str, Any], key: PseudonymKey) -> None:
    """Turn one error row into a pseudonymous one (the input's pseudonym, or that of its source
    for an input that never got one); the source stays in "source" for the caller and the key."""
    item = e.get("item")
    name = item.name if item is not None and item.name else key.name_for(e["file"]) if e["file"] else key.new()
    e["source"] = e["file"]
    e["reason"] = _scrub(e["reason"], item, e["file"], name)
    e["id"], e["file"] = name, ""


__all__ = ["known_preprocess", "KEY_FIELDS", "read_pseudonym_key", "XRAY_SUFFIXES", "NAMES", "PSEUDONYM_KEY", "PREDICTIONS_CSV", "ERRORS_CSV", "XrayInput", "safe_id", "collect_named_inputs",
           "file_id", "collect_inputs", "read_input", "patient_module", "resolve_names", "PredictReport",
           "error_reason", "predict_files"]
