"""Zero-shot head rows: the label-init function shared with build_model, the head's rounding, the manifest's
calibration (export -> load -> zero_shot_rows, and the fallback), and a planted problem where rows added for labels
with no training point rank their own title first."""

import json

import numpy as np
import pytest
import torch

from training.artifact import load_artifact, save_artifact
from training.config import TrainConfig
from training.data import make_synthetic, reindex_by_frequency
from training.model import FP8_E4M3, HeadConfig, XMCHead
from training.train import build_model
from training.zero_shot import (
    ZERO_SHOT_KEY,
    Calibration,
    calibrate,
    config_calibration,
    stored_rows,
    title_embeddings,
    true_rows,
    unseen_bias,
)


def _built(precision: str, gain: float = 7.0, num_labels: int = 120, num_train: int = 150):
    train, test = make_synthetic(num_labels=num_labels, num_train=num_train, num_test=30, seed=3)
    (train, test), order = reindex_by_frequency(train, test)
    cfg = TrainConfig(dim=16, precision=precision, min_df=1, label_init_gain=gain)
    return build_model(cfg, train, order), train, test, cfg


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_zero_shot_rows_are_the_label_init_rows(precision):
    model, train, _, cfg = _built(precision)
    counts = train.label_counts()
    unseen = np.flatnonzero(counts == 0)
    assert len(unseen) >= 5  # the planted data leaves labels without a training point
    cal = config_calibration(cfg.label_init_gain, train.num_rows)
    head = model.head
    want = stored_rows(model, train.label_titles, cal)  # every label's title, the unseen bias for all
    got = head.weight[: head.num_labels]
    # the vector part is the init's for every label; the whole row (bias too) for labels with 0 training points
    assert torch.equal(want[:, :-1].view(torch.uint8 if precision == "fp8" else torch.int32), _bits(got[:, :-1]))
    assert torch.equal(_bits(want[unseen]), _bits(got[unseen]))
    assert not torch.equal(_bits(want), _bits(got))  # labels with points have their own prior bias
    e = title_embeddings(model, train.label_titles[:3])
    assert torch.allclose((true_rows(model, train.label_titles[:3], cal)[:, :-1] * e).sum(1), torch.full((3,), 7.0))
    assert head.bias[unseen].allclose(torch.tensor(unseen_bias(train.num_rows)))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_E4M3 else t.view(torch.int32)


def _nearest(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The nearest grid value to each of `values` (an independent round-to-nearest reference)."""
    idx = (values.reshape(-1, 1) - grid.reshape(1, -1)).abs().argmin(1)
    return grid[idx].reshape(values.shape)


@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_stored_rows_round_to_nearest_with_the_scale_and_saturate(precision):
    head = XMCHead(HeadConfig(num_labels=37, dim=11, precision=precision, scale=4.0 if precision == "fp8" else 0.0))
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(9, head.in_dim, generator=g) * 3
    rows[0, 0], rows[1, 1] = 1e4, -1e4  # beyond e4m3's 448 once scaled: saturates, never NaN
    out = head.stored_rows(rows)
    assert out.dtype == head.weight.dtype and out.shape == rows.shape
    scaled = rows * float(head.scale)
    if precision == "fp8":
        grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_E4M3).float()
        grid = grid[torch.isfinite(grid)]
        assert torch.equal(out.float(), _nearest(scaled.clamp(-448, 448), grid))
        assert out.float()[0, 0] == 448 and out.float()[1, 1] == -448
    else:
        err = (out.float() - scaled).abs()
        ulp = 2.0 ** (torch.floor(torch.log2(scaled.abs())) - 7)  # bf16 keeps 8 significant bits
        assert bool((err <= ulp / 2).all())
    with pytest.raises(ValueError, match=r"rows must be \(n, 12\)"):
        head.stored_rows(rows[:, :5])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, train, _, _ = _built("fp8", gain=9.0)
    path = tmp_path_factory.mktemp("zs") / "model"
    cal = Calibration(gain=5.5, bias=-3.25, method="tail", details={"tail_labels": 4})
    save_artifact(path, model, train, config={"label_init_gain": 9.0}, zero_shot=cal)
    return model, train, path, cal


def test_manifest_round_trip_gives_the_rows_of_the_recorded_calibration(exported):
    model, train, path, cal = exported
    art = load_artifact(path)
    assert art.manifest[ZERO_SHOT_KEY] == cal.as_dict() and art.zero_shot == cal
    titles = ["brand new label", train.label_titles[0], "x"]
    rows = art.zero_shot_rows(titles)
    assert rows.dtype == FP8_E4M3 and rows.shape == (3, art.model.head.in_dim)
    assert torch.equal(_bits(rows), _bits(stored_rows(art.model, titles, cal)))
    # the row's scores: the title's own query scores gain + bias (up to e4m3 rounding of the row)
    q = art.queries(titles[:1])
    score = float(q @ rows[:1].float().T)
    assert abs(score - (cal.gain + cal.bias)) < 0.15 * abs(cal.gain) + 0.5


def test_export_records_a_calibration_and_a_bad_one_is_refused(exported, tmp_path):
    model, train, path, _ = exported
    fresh = tmp_path / "measured"
    save_artifact(fresh, model, train, config={"label_init_gain": 9.0})
    z = load_artifact(fresh).manifest[ZERO_SHOT_KEY]
    measured = calibrate(model, train.label_titles, train.label_counts(), gain=9.0, num_rows=train.num_rows)
    assert z == measured.as_dict() and z["method"] == "tail"
    # an untrained model's tail rows are the init's: their own-title logit is the gain (e4m3 rounding aside)
    assert z["gain"] == pytest.approx(9.0, rel=0.05) and z["bias"] > unseen_bias(train.num_rows)
    m = json.loads((fresh / "manifest.json").read_text())
    m[ZERO_SHOT_KEY]["gain"] = "big"
    (fresh / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="zero_shot.*'gain' must be a finite number"):
        load_artifact(fresh)


def test_artifact_without_the_key_falls_back_to_the_config(exported, tmp_path):
    model, train, path, _ = exported
    old = tmp_path / "old"
    save_artifact(old, model, train, config={"label_init_gain": 9.0, "train_rows": 150})
    m = json.loads((old / "manifest.json").read_text())
    del m[ZERO_SHOT_KEY]
    (old / "manifest.json").write_text(json.dumps(m))
    art = load_artifact(old)
    assert art.zero_shot == config_calibration(9.0, 150)
    rows = art.zero_shot_rows(train.label_titles[:4])
    assert torch.equal(_bits(rows), _bits(stored_rows(art.model, train.label_titles[:4], config_calibration(9.0, 150))))


def test_training_resets_labels_without_points_to_zero_shot_rows_that_rank_their_own_title_first(tmp_path):
    """Planted: train on data where some labels have no training point. The run ends with those labels' rows re-set
    to their zero-shot rows (recorded in metrics.json, written to the checkpoint and the artifact's calibration);
    each such row outscores every trained label on a text equal to its title. Without --zero-shot-unseen (the
    default) the rows training left stay."""
    from lf_data import write_lf

    from training.checkpoint import model_from_checkpoint
    from training.data import permute_labels, read_lf
    from training.train import train as run

    data = write_lf(tmp_path / "data", num_labels=300, num_train=300, num_test=40, seed=2)
    cfg = dict(dim=32, epochs=3, batch_size=32, min_df=1, precision="fp8", progress=False, threads=2)
    art_path = tmp_path / "artifact"
    result = run(
        TrainConfig(data=str(data), out=str(tmp_path / "run"), export=str(art_path), zero_shot_unseen=True, **cfg)
    )
    model, saved, _ = model_from_checkpoint(tmp_path / "run")
    trn = permute_labels(read_lf(data, "trn"), model.label_order.numpy())
    counts = trn.label_counts()
    unseen, seen = np.flatnonzero(counts == 0), np.flatnonzero(counts > 0)
    assert len(unseen) >= 10 and result["zero_shot"]["labels"] == len(unseen)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["zero_shot"] == result["zero_shot"]
    cal = Calibration.from_dict(result["zero_shot"]["calibration"])
    assert cal == calibrate(model, trn.label_titles, counts, gain=saved.label_init_gain, num_rows=trn.num_rows)
    assert load_artifact(art_path).zero_shot == cal
    titles = [trn.label_titles[j] for j in unseen]
    assert torch.equal(_bits(model.head.weight[unseen]), _bits(stored_rows(model, titles, cal)))
    assert torch.equal(model.head.bias[unseen], torch.full((len(unseen),), cal.bias))
    x = model.embed(*model.encoder_inputs(titles))
    scores = model.head.scores(x)
    own, best_trained = scores[torch.arange(len(unseen)), unseen], scores[:, seen].max(1).values
    assert float((own > best_trained).float().mean()) >= 0.9
    assert float((model.head.topk(x, 1)[1][:, 0].numpy() == unseen).mean()) >= 0.9

    off = run(TrainConfig(data=str(data), out=str(tmp_path / "off"), **cfg))  # the default: off
    kept, _, _ = model_from_checkpoint(tmp_path / "off")
    assert off["zero_shot"] == {} and not torch.equal(_bits(kept.head.weight[unseen]), _bits(model.head.weight[unseen]))
    # the same run up to the re-set: the labels with points are untouched by it
    assert torch.equal(_bits(kept.head.weight[seen]), _bits(model.head.weight[seen]))
