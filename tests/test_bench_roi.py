"""tools/bench_roi.py and the found-rate scoring (`kneetf.preprocess.roi_score`)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from kneetf.preprocess.roi import Box, square_box_around, write_boxes
from kneetf.preprocess.roi_score import centre_error, is_found, score_boxes, side_ratio

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kneetf_bench_roi", ROOT / "tools" / "bench_roi.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_found_means_centre_within_15_percent_and_side_within_half_to_double():
    true = square_box_around(100, 100, 200)
    assert is_found(square_box_around(130, 100, 200), true)        # 15 % off: found
    assert not is_found(square_box_around(130.5, 100, 200), true)
    assert is_found(square_box_around(100 + 21, 100 + 21, 100), true)  # 0.148 x side off, half the side
    assert not is_found(square_box_around(100, 100, 99), true)
    assert is_found(square_box_around(100, 100, 400), true) and not is_found(square_box_around(100, 100, 401), true)
    assert not is_found(None, true)
    assert centre_error(square_box_around(103, 104, 10), true) == pytest.approx(5 / 200)
    assert side_ratio(Box(0, 0, 50, 20), true) == 0.25


def test_score_counts_failures_flags_and_silent_misses():
    true = [square_box_around(50, 50, 100)] * 4
    pred = [square_box_around(50, 50, 100), square_box_around(90, 50, 100), None, square_box_around(55, 50, 100)]
    s = score_boxes(pred, true, flagged=[False, False, False, True])
    assert s["n"] == 4 and s["found_rate"] == 0.5                 # the exact box and the flagged good one
    assert s["reported_rate"] == 0.5                               # the failure and the flag
    assert s["silent_miss_rate"] == 0.25                           # the 40 % off box, not reported
    assert s["found_rate_unflagged"] == 0.5
    assert s["median_iou"] == pytest.approx((Box(5, 0, 100, 100).area / Box(0, 0, 105, 100).area + 3 / 7) / 2)
    assert math.isinf(score_boxes([None], true[:1])["median_centre_error"])


def test_bench_scores_sources_on_a_tiny_held_out_set(bench, tmp_path, capsys):
    from kneetf.data.radiograph import simulate

    truth = {f"clinic-{i:05d}": simulate(9101, i, "clinic").box for i in range(3)}
    shifted = {k: b.shift(0.5 * b.width, 0) for k, b in truth.items()}
    write_boxes(tmp_path / "truth.csv", truth)
    write_boxes(tmp_path / "shifted.csv", shifted)
    assert bench.main(["--sets", "clinic", "--n", "3", "--workers", "1", "--source", "classical",
                       "--source", str(tmp_path / "truth.csv"), "--source", str(tmp_path / "shifted.csv"),
                       "--save-boxes", str(tmp_path / "boxes")]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1].removeprefix("RESULT "))
    scores = result["sets"]["clinic"]
    assert scores["truth.csv"]["found_rate"] == 1.0 and scores["truth.csv"]["median_iou"] == 1.0
    assert scores["shifted.csv"]["found_rate"] == 0.0 and scores["shifted.csv"]["silent_miss_rate"] == 1.0
    assert 0.0 <= scores["classical"]["found_rate"] <= 1.0 and scores["classical"]["ms_per_image"] > 0
    assert result["summary"]["truth.csv"]["min_found_rate"] == 1.0
    assert (tmp_path / "boxes" / "clinic_truth.csv.csv").read_text().count("\n") == 4


def test_bench_scores_a_folder_of_dicom_files(bench, tmp_path, capsys):
    from kneetf.data.radiograph import get_style
    from kneetf.data.synthetic import write_synthetic_dataset

    out = write_synthetic_dataset(tmp_path / "set", n=2, seed=3, formats=("dicom",), workers=1, progress=False,
                                  radiograph=get_style("clinic")).parent
    assert bench.main(["--data", str(out), "--source", str(out / "rois.csv"), "--source", "classical"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("RESULT "))
    assert result["sets"]["set"]["rois.csv"]["found_rate"] == 1.0 and result["sets"]["set"]["rois.csv"]["n"] == 2
