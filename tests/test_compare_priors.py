"""tools/compare_priors.py: the in-model priors and the baselines scored on the same knees."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compare_priors_scores_every_predictor_against_kernel_ridge(tmp_path, capsys) -> None:
    from cache_factory import learnable_cache as make_cache

    spec = importlib.util.spec_from_file_location("kneetf_compare_priors", ROOT / "tools" / "compare_priors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cache = make_cache(tmp_path / "cache", n=24)
    result = module.main(["--data", str(cache), "--splits", "val"])
    rows = result["rows"]
    assert set(rows) == {"krr_rbf", "knn_cv", "mean", "prior_previous", "prior_default"}
    assert result["knees"] == 4 and rows["krr_rbf"]["psnr_gain"] == 0.0
    for row in rows.values():  # the gain is paired over the same knees
        assert row["psnr_gain"] == pytest.approx(row["psnr"] - rows["krr_rbf"]["psnr"], abs=1e-9)
    assert result["priors"]["default"]["rank"] == 19  # at most n - 1 for 20 training pairs
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT ") and json.loads(last[7:])["rows"] == json.loads(json.dumps(rows))
