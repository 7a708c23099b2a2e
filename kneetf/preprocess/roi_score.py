"""Scoring ROI boxes against true ones: is the joint found, and how close is the box.

A box FINDS the joint when its centre lies within `CENTRE_TOLERANCE` (15 %) of the true
box's side from the true centre and its side is within [0.5, 2] x the true side. A source
may report an image as failed (no box, or a box flagged unsure); a reported failure is
not a find, but it is not a silent one either. numpy only.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from kneetf.preprocess.roi import Box, iou

CENTRE_TOLERANCE = 0.15
SIDE_RANGE = (0.5, 2.0)


def centre_error(pred: Box, true: Box) -> float:
    """Distance between the box centres as a fraction of the true box's (longer) side."""
    side = max(true.width, true.height)
    return math.hypot(pred.cx - true.cx, pred.cy - true.cy) / side if side > 0 else math.inf


def side_ratio(pred: Box, true: Box) -> float:
    """Longer side of `pred` / longer side of `true`."""
    side = max(true.width, true.height)
    return max(pred.width, pred.height) / side if side > 0 else math.inf


def is_found(pred: Box | None, true: Box) -> bool:
    """Whether `pred` finds the joint of `true` (centre within 15 % of the side, side 0.5-2x)."""
    if pred is None:
        return False
    return centre_error(pred, true) <= CENTRE_TOLERANCE and SIDE_RANGE[0] <= side_ratio(pred, true) <= SIDE_RANGE[1]


def score_boxes(pred: Sequence[Box | None], true: Sequence[Box],
                flagged: Sequence[bool] | None = None) -> dict[str, float]:
    """Found-rate, IoU and centre error of predicted boxes (None = the source failed).

    `flagged[i]` marks a box its source reported as unsure. Returns `n`, `found_rate` (finds /
    all images), `median_iou`, `mean_iou`, `median_centre_error` (fraction of the true side;
    failures count as misses with IoU 0 and infinite error), `reported_rate` (failed or
    flagged), `silent_miss_rate` (missed and not reported: the harmful case) and
    `found_rate_unflagged` (finds among the boxes not reported).
    """
    if len(pred) != len(true):
        raise ValueError(f"need as many predicted as true boxes. Received: {len(pred)} and {len(true)}")
    n = len(true)
    if n == 0:
        raise ValueError("score_boxes needs at least one box")
    flags = np.zeros(n, bool) if flagged is None else np.asarray(flagged, bool)
    failed = np.asarray([p is None for p in pred])
    reported = failed | flags
    found = np.asarray([is_found(p, t) for p, t in zip(pred, true)])
    ious = np.asarray([0.0 if p is None else iou(p, t) for p, t in zip(pred, true)])
    errors = np.asarray([math.inf if p is None else centre_error(p, t) for p, t in zip(pred, true)])
    kept = ~reported
    return {
        "n": int(n),
        "found_rate": float(found.mean()),
        "median_iou": float(np.median(ious)),
        "mean_iou": float(ious.mean()),
        "median_centre_error": float(np.median(errors)),
        "reported_rate": float(reported.mean()),
        "silent_miss_rate": float((~found & kept).mean()),
        "found_rate_unflagged": float(found[kept].mean()) if kept.any() else float("nan"),
    }


__all__ = ["CENTRE_TOLERANCE", "SIDE_RANGE", "centre_error", "side_ratio", "is_found", "score_boxes"]
