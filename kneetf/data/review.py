"""ROI review of a cache: contact sheets of every crop, so that a person checks hundreds of
knees in a minute.

A sheet is a grid of thumbnails of the X-ray crops exactly as the model sees them (the
cache's normalised X-ray; left knees mirrored back when the cache mirrors them), in the
cache's order, each labelled with its id and framed in a colour that says where the box came
from and whether to look twice:

- green: boxes CSV or the synthetic truth;
- blue: found by the classical fallback or a detector, and sure;
- orange: found, but flagged for review (low confidence);
- red, with no crop: an X-ray whose knee was not found (the pair was skipped; the reason
  is in `errors.csv`).

At most `per_sheet` tiles a sheet (`sheet-001.png`, `sheet-002.png`, ...). The sheets read
the cache (`rois.csv`, `errors.csv`, the shards), so they can be made again for any cache;
one written before `rois.csv` existed gets neutral frames.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from kneetf.data.cache import ROI_STAGE, SPLITS, read_info, read_rois
from kneetf.io.atomic import atomic_path

#: frame colours (BGR)
COLOURS = {"given": (60, 180, 60), "found": (200, 120, 30), "flagged": (0, 150, 255), "failed": (40, 40, 220),
           "unknown": (128, 128, 128)}
TILE = 96
PER_SHEET = 300
COLUMNS = 20


def tile_kind(record: dict[str, Any] | None) -> str:
    """The colour key of a pair's ROI record (None: no record)."""
    if record is None:
        return "unknown"
    if record.get("flagged"):
        return "flagged"
    return "given" if record.get("source") in ("csv", "truth", "fixed") else "found"


def _crops(cache_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(id, crop as it looks: (H, W) in [0, 1]) of every cached pair, split by split."""
    import tensorflow as tf

    from kneetf.data.records import parse_example

    info = read_info(cache_dir)
    size, slices = info["shapes"]["mri"][0], info["shapes"]["mri"][2]
    for split in SPLITS:
        files = [str(cache_dir / n) for n in info["shards"].get(split, []) if (cache_dir / n).exists()]
        if not files:
            continue
        for serialized in tf.data.TFRecordDataset(files):
            ex = parse_example(serialized, size, slices)
            xray = ex["xray"].numpy()[..., 0]
            if int(ex["mirrored"].numpy()):
                xray = xray[:, ::-1]
            yield ex["id"].numpy().decode(), xray


def _tile(image: np.ndarray | None, label: str, kind: str, note: str = "") -> np.ndarray:
    import cv2

    tile = np.full((TILE, TILE, 3), 24, np.uint8)
    if image is not None:
        thumb = cv2.resize(np.clip(image, 0.0, 1.0).astype(np.float32), (TILE, TILE), interpolation=cv2.INTER_AREA)
        tile[:] = np.round(thumb * 255.0).astype(np.uint8)[..., None]
    elif note:
        for k, line in enumerate((note[i:i + 16] for i in range(0, min(len(note), 64), 16))):
            cv2.putText(tile, line, (4, 34 + 12 * k), cv2.FONT_HERSHEY_PLAIN, 0.7, (220, 220, 220), 1, cv2.LINE_AA)
    cv2.rectangle(tile, (0, 0), (TILE - 1, TILE - 1), COLOURS[kind], 3)
    text = label if len(label) <= 15 else label[:7] + "~" + label[-7:]
    cv2.rectangle(tile, (3, TILE - 15), (TILE - 4, TILE - 4), (0, 0, 0), -1)
    cv2.putText(tile, text, (5, TILE - 6), cv2.FONT_HERSHEY_PLAIN, 0.75, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def _legend(width: int) -> np.ndarray:
    import cv2

    bar = np.full((22, width, 3), 255, np.uint8)
    x = 6
    for kind, text in (("given", "boxes CSV / truth"), ("found", "found, sure"), ("flagged", "flagged: look"),
                       ("failed", "knee not found (skipped)")):
        cv2.rectangle(bar, (x, 5), (x + 12, 17), COLOURS[kind], -1)
        cv2.putText(bar, text, (x + 16, 16), cv2.FONT_HERSHEY_PLAIN, 0.9, (0, 0, 0), 1, cv2.LINE_AA)
        x += 28 + 8 * len(text)
    return bar


def _failures(cache_dir: Path) -> list[dict[str, str]]:
    """The X-rays whose knee was not found, from the shards' sidecars (which keep each
    error's stage)."""
    import json

    info = read_info(cache_dir)
    out = []
    for split in SPLITS:
        for name in info["shards"].get(split, []):
            side = cache_dir / (name + ".json")
            if side.exists():
                out += [e for e in json.loads(side.read_text()).get("errors", []) if e.get("stage") == ROI_STAGE]
    return out


def write_contact_sheets(cache_dir: str | Path, out_dir: str | Path, *, per_sheet: int = PER_SHEET,
                         columns: int = COLUMNS) -> list[Path]:
    """Contact sheets of every crop of the cache in `cache_dir` (and a red tile per X-ray
    whose knee was not found) as `out_dir/sheet-NNN.png`; returns their paths. Sheets of an
    earlier run are replaced."""
    import cv2

    cache_dir, out_dir = Path(cache_dir), Path(out_dir)
    records = {r["id"]: r for r in read_rois(cache_dir)}
    tiles = []
    for case_id, crop in _crops(cache_dir):
        r = records.get(case_id)
        tiles.append(_tile(crop, case_id, tile_kind(r)))
    for e in _failures(cache_dir):
        tiles.append(_tile(None, e.get("id") or Path(e.get("file", "")).name, "failed", e.get("reason", "")))
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("sheet-*.png"):
        old.unlink()
    paths = []
    n_sheets = max(1, math.ceil(len(tiles) / per_sheet))
    for k in range(n_sheets):
        chunk = tiles[k * per_sheet:(k + 1) * per_sheet]
        cols = min(columns, max(1, len(chunk)))
        rows = max(1, math.ceil(len(chunk) / cols))
        sheet = np.full((rows * TILE, cols * TILE, 3), 255, np.uint8)
        for i, t in enumerate(chunk):
            y, x = divmod(i, cols)
            sheet[y * TILE:(y + 1) * TILE, x * TILE:(x + 1) * TILE] = t
        sheet = np.vstack([_legend(sheet.shape[1]), sheet])
        ok, data = cv2.imencode(".png", sheet)
        if not ok:
            raise OSError(f"OpenCV could not encode contact sheet {k + 1}")
        path = out_dir / f"sheet-{k + 1:03d}.png"
        with atomic_path(path) as tmp:
            tmp.write_bytes(data.tobytes())
        paths.append(path)
    return paths


__all__ = ["write_contact_sheets", "tile_kind", "COLOURS", "PER_SHEET"]
