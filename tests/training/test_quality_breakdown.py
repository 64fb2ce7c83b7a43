"""`benchmarks/quality.py --by-label-count`: the top-1 breakdown agrees with the evaluation it explains."""

import importlib.util
from pathlib import Path

import pytest
from lf_data import write_lf

from training.config import TrainConfig
from training.train import train

QUALITY = Path(__file__).parents[2] / "benchmarks" / "quality.py"


def _quality_module():
    spec = importlib.util.spec_from_file_location("quality_bench", QUALITY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_by_label_count_matches_the_runs_p_at_1(tmp_path):
    data = write_lf(tmp_path / "data")
    cfg = TrainConfig(
        data=str(data), out=str(tmp_path / "run"), dim=32, epochs=1, batch_size=32, min_df=1, precision="fp8",
        progress=False, threads=2, checkpoint_every=0,
    )  # fmt: skip
    p_at_1 = train(cfg)["metrics"]["P@1"]
    got = _quality_module().by_label_count(tmp_path / "run")
    assert 0 < p_at_1 < 100  # some misses to break down
    assert got["P@1"] == pytest.approx(p_at_1, abs=0.01)  # the same ranking, filter pairs removed alike
    groups = got["groups"]
    assert sum(g["points_pct"] for g in groups) == pytest.approx(100, abs=0.3)
    assert sum(g["misses_pct"] for g in groups) == pytest.approx(100, abs=0.3)
    weighted = sum(g["points_pct"] * g["P@1"] for g in groups) / 100
    assert weighted == pytest.approx(p_at_1, abs=0.3)
    assert got["most_often_wrong_first"] and all(w["times"] > 0 for w in got["most_often_wrong_first"])
