"""Figures of reconstructions and runs (matplotlib, Agg, no pyplot state), written atomically.

Volumes are in the model's layout (H, W, slices) unless a function says otherwise; X-rays
are (H, W) or (H, W, 1). Values are in the normalised [0, 1] space.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kneetf.io.atomic import atomic_path

log = logging.getLogger(__name__)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path, *, fault: str = "write") -> Path:
    """Save a matplotlib figure as PNG, atomically (`fault`: its fault-injection name)."""
    with atomic_path(path, fault=fault) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


def slice_indices(num_slices: int, count: int) -> list[int]:
    """`count` slice indices spread evenly over `num_slices` (all of them when fewer)."""
    if count >= num_slices:
        return list(range(num_slices))
    return sorted({int(round(v)) for v in np.linspace(0, num_slices - 1, count)})


def tile_slices(volume: Any, cols: int = 5, pad: int = 2, pad_value: float = 0.0) -> np.ndarray:
    """Slices-first `volume` (S, H, W) tiled row by row into one 2-D image."""
    v = np.asarray(volume, dtype=np.float32)
    if v.ndim != 3:
        raise ValueError(f"tile_slices expects (slices, H, W). Received shape {v.shape}")
    s, h, w = v.shape
    cols = max(1, min(cols, s))
    rows = -(-s // cols)
    out = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad), pad_value, np.float32)
    for k in range(s):
        r, c = divmod(k, cols)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = v[k]
    return out


def _xray2d(xray: Any) -> np.ndarray:
    x = np.asarray(xray, dtype=np.float32)
    return x[..., 0] if x.ndim == 3 else x


def montage_figure(xrays: Any, true: Any | None, pred: Any, ids: Sequence[str] | None = None, *,
                   num_slices: int = 6, titles: Sequence[str] | None = None) -> Any:
    """One block of rows per subject: the X-ray, then true slices, predicted slices and the
    absolute error (without `true`: predicted slices only). Batches: xrays (N, H, W, 1),
    true/pred (N, H, W, S)."""
    pred = np.asarray(pred, dtype=np.float32)
    xrays = np.asarray(xrays, dtype=np.float32)
    true_arr = None if true is None else np.asarray(true, dtype=np.float32)
    n, _, _, s = pred.shape
    picks = slice_indices(s, num_slices)
    kinds = ["prediction"] if true_arr is None else ["true", "prediction", "|error|"]
    rows = n * len(kinds)
    cols = len(picks) + 1
    fig = _figure(1.5 * cols, 1.5 * rows + 0.4 * n)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(n):
        for r, kind in enumerate(kinds):
            row = i * len(kinds) + r
            for c in range(cols):
                axes[row, c].set_axis_off()
            if r == 0:
                axes[row, 0].imshow(_xray2d(xrays[i]), cmap="gray", vmin=0, vmax=1)
                name = ids[i] if ids is not None else f"#{i}"
                title = titles[i] if titles is not None else f"{name}: X-ray"
                axes[row, 0].set_title(title, fontsize=7)
            for c, k in enumerate(picks, 1):
                if kind == "true":
                    img, cmap, vmax = true_arr[i, :, :, k], "gray", 1.0
                elif kind == "prediction":
                    img, cmap, vmax = pred[i, :, :, k], "gray", 1.0
                else:
                    img, cmap, vmax = np.abs(true_arr[i, :, :, k] - pred[i, :, :, k]), "magma", 0.5
                axes[row, c].imshow(img, cmap=cmap, vmin=0, vmax=vmax)
                if c == 1:
                    axes[row, c].set_title(f"{kind} s{k}", fontsize=7)
                elif row == 0:
                    axes[row, c].set_title(f"s{k}", fontsize=7)
    fig.tight_layout()
    return fig


def save_montage(path: str | Path, xrays: Any, true: Any | None, pred: Any, ids: Sequence[str] | None = None, *,
                 num_slices: int = 6, titles: Sequence[str] | None = None, fault: str = "write") -> Path:
    """`montage_figure` written to a PNG (atomically)."""
    return save_figure(montage_figure(xrays, true, pred, ids, num_slices=num_slices, titles=titles), path,
                       fault=fault)


def save_slice_psnr_plot(path: str | Path, curves: Mapping[str, tuple[Any, Any]],
                         title: str = "PSNR per slice") -> Path:
    """Mean PSNR per slice index (with a +-1 std band) of each method: {label: (mean, std)}."""
    fig = _figure(7, 4)
    ax = fig.subplots()
    for name, (mean, std) in curves.items():
        mean, std = np.asarray(mean, float), np.asarray(std, float)
        x = np.arange(len(mean))
        ax.plot(x, mean, marker="o", markersize=3, label=name)
        ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("slice (0-based, within the window)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def read_history(path: str | Path) -> dict[str, list[float]]:
    """A Keras CSVLogger file as {column: values} (non-numeric cells become NaN)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            try:
                value = float(v)
            except (TypeError, ValueError):
                value = float("nan")
            cols.setdefault(k, []).append(value)
    return cols


def save_learning_curves(path: str | Path, history_csv: str | Path) -> Path | None:
    """Plot every `<name>` / `val_<name>` pair of a run's history.csv, one panel per name
    (loss first; learning_rate on a log scale). Returns None when the history is empty."""
    hist = read_history(history_csv)
    if not hist or not next(iter(hist.values()), None):
        log.warning("%s: empty history, no learning curves", history_csv)
        return None
    epochs = hist.get("epoch") or list(range(len(next(iter(hist.values())))))
    epochs = [e + 1 for e in epochs]  # CSVLogger counts from 0
    names = [k for k in hist if k != "epoch" and not k.startswith("val_")]
    names += [k[4:] for k in hist if k.startswith("val_") and k[4:] not in names]
    names.sort(key=lambda k: (k != "loss", k))
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = _figure(4.5 * cols, 3.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        for key, style in ((name, "-"), (f"val_{name}", "--")):
            if key in hist:
                ax.plot(epochs, hist[key], style, marker=".", label=key)
        if name in ("loss", "learning_rate", "lr") or name.endswith("_loss"):
            vals = [v for key in (name, f"val_{name}") for v in hist.get(key, []) if np.isfinite(v)]
            if vals and min(vals) > 0:
                ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["save_figure", "slice_indices", "tile_slices", "montage_figure", "save_montage",
           "save_slice_psnr_plot", "read_history", "save_learning_curves"]
