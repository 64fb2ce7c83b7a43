"""Zero-shot head rows: the label-init function shared with build_model, the head's rounding, the manifest's
calibration (export -> load -> zero_shot_rows, and the fallback), a planted problem where rows added for labels
with no training point rank their own title first, and the title map (fitted, stored in the artifact, and on a
planted problem where items relate to their labels' titles through a rotation, far better than the title rows)."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from training.artifact import load_artifact, save_artifact
from training.config import TrainConfig
from training.data import XMCDataset, make_synthetic, reindex_by_frequency
from training.encoders import HashedBagEncoder, HashedNgramFeaturizer
from training.model import FP8_E4M3, HeadConfig, XMCHead, XMCModel
from training.train import build_model
from training.zero_shot import (
    MAP_FILE,
    MAP_KEY,
    ZERO_SHOT_KEY,
    Calibration,
    TitleMap,
    calibrate,
    config_calibration,
    fit_title_map,
    set_rows,
    stored_rows,
    title_embeddings,
    title_vectors,
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
    save_artifact(path, model, train, config={"label_init_gain": 9.0}, zero_shot=cal, title_map=False)
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
    save_artifact(old, model, train, config={"label_init_gain": 9.0, "train_rows": 150}, title_map=False)
    m = json.loads((old / "manifest.json").read_text())
    assert MAP_KEY not in m and not (old / MAP_FILE).exists()  # as an artifact from before the title map
    del m[ZERO_SHOT_KEY]
    (old / "manifest.json").write_text(json.dumps(m))
    art = load_artifact(old)
    assert art.zero_shot == config_calibration(9.0, 150)
    rows = art.zero_shot_rows(train.label_titles[:4])
    assert torch.equal(_bits(rows), _bits(stored_rows(art.model, train.label_titles[:4], config_calibration(9.0, 150))))


def test_training_resets_labels_without_points_to_zero_shot_rows_that_rank_their_own_title_first(tmp_path):
    """Planted: train on data where some labels have no training point. The run ends with those labels' rows re-set
    to their zero-shot rows (recorded in metrics.json, written to the checkpoint and the artifact's calibration);
    each such row (the title map's, `fit_title_map`) outscores every trained label on a text equal to its title.
    Without --zero-shot-unseen (the default) the rows training left stay."""
    from lf_data import write_lf

    from training.checkpoint import model_from_checkpoint
    from training.data import permute_labels, read_lf
    from training.train import train as run

    data = write_lf(tmp_path / "data", num_labels=300, num_train=300, num_test=40, seed=2)
    cfg = dict(dim=32, epochs=3, batch_size=32, min_df=1, precision="fp8", progress=False, threads=2)
    art_path = tmp_path / "artifact"
    result = run(
        TrainConfig(
            data=str(data),
            out=str(tmp_path / "run"),
            export=str(art_path),
            zero_shot_unseen=True,
            zero_shot_holdout=0.0,  # offset 0: the map's own rows (the offset: test_unseen_offset.py)
            **cfg,
        )
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
    # the rows are the title map's, fitted at the re-set; export fits the same map again and stores it
    title_map = load_artifact(art_path).title_map
    assert title_map is not None
    drop = lambda d: {k: v for k, v in d.items() if k != "fit_seconds"}  # noqa: E731
    assert drop(result["zero_shot"]["title_map"]) == drop(title_map.details)
    assert torch.equal(_bits(model.head.weight[unseen]), _bits(stored_rows(model, titles, cal, title_map)))
    _, bias = title_map.vectors_and_biases(title_embeddings(model, titles))
    assert torch.allclose(model.head.bias[unseen], bias)
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


def _rotation(dim: int, g: torch.Generator) -> torch.Tensor:
    """A random orthogonal (dim, dim) map that keeps the all-ones direction (so zero-mean vectors stay zero-mean and
    the encoder's LayerNorm only rescales them)."""
    ones = torch.ones(dim, 1) / dim**0.5
    basis = torch.linalg.qr(torch.cat([ones, torch.randn(dim, dim - 1, generator=g)], 1))[0][:, 1:]  # ones-perp
    q = torch.linalg.qr(torch.randn(dim - 1, dim - 1, generator=g))[0]
    return basis @ q @ basis.T + ones @ ones.T


def _planted(num_labels: int = 240, held: int = 40, dim: int = 16, gain: float = 6.0, seed: int = 0):
    """Label k's title is the token n<k>; the items that carry it hold p<k>, whose embedding is n<k>'s rotated by a
    fixed R. Trained labels' rows are their title vectors rotated by R; the last `held` labels have no training point
    and start from their title rows. Returns (model, train, test texts, test labels (rows, 1) of held labels, cal)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    trained = num_labels - held
    pairs = rng.integers(0, trained, size=(1200, 2))
    texts = [f"p{a} p{b}" for a, b in pairs]
    hold = rng.integers(trained, num_labels, size=160)
    test_texts = [f"p{h} p{a}" for h, a in zip(hold, rng.integers(0, trained, size=160), strict=True)]
    titles = [f"n{k}" for k in range(num_labels)]
    feat = HashedNgramFeaturizer(
        num_buckets=2**18, char_ngrams=(0, 0), word_bigrams=False, name_parts=False, tfidf=False, min_df=1
    ).fit(texts + test_texts + titles)
    enc = HashedBagEncoder(num_features=feat.num_features, dim=dim).eval()
    col = {t: int(feat.transform([t]).indices[0]) for k in range(num_labels) for t in (f"n{k}", f"p{k}")}
    assert len(set(col.values())) == len(col)  # one bucket per token
    rot = _rotation(dim, g)
    with torch.no_grad():
        names = torch.randn(num_labels, dim, generator=g)
        names -= names.mean(1, keepdim=True)
        for k in range(num_labels):
            enc.bag.weight[col[f"n{k}"]] = names[k]
            enc.bag.weight[col[f"p{k}"]] = names[k] @ rot
    y = np.zeros((len(texts), num_labels), dtype=np.float32)
    y[np.arange(len(texts))[:, None], pairs] = 1
    train = XMCDataset(labels=sp.csr_matrix(y), texts=texts, label_titles=titles)
    head = XMCHead(HeadConfig(num_labels=num_labels, dim=dim, precision="fp8"))
    model = XMCModel(enc, head, feat).eval()
    cal = config_calibration(gain, train.num_rows)
    with torch.no_grad():
        u = title_vectors(title_embeddings(model, titles), gain)
        u[:trained] = u[:trained] @ rot
        prior = (train.label_counts() + 0.5) / (train.num_rows + 1.0)
        head.init_weights(u, prior)
    return model, train, test_texts, hold, cal


def _recall_at(model: XMCModel, texts: list[str], labels: np.ndarray, k: int) -> float:
    with torch.no_grad():
        top = model.head.topk(model.embed(*model.encoder_inputs(texts)), k)[1].numpy()
    return 100 * float((top == labels[:, None]).any(1).mean())


def test_the_title_map_learns_what_relates_items_to_titles_and_beats_the_title_rows():
    """Planted: items relate to their labels' titles through a rotation the title row cannot see. The map, fitted on
    the trained labels only, gives the labels without a training point rows that find their items."""
    model, train, test_texts, hold, cal = _planted()
    held = np.arange(200, 240)
    titles = [train.label_titles[j] for j in held]
    set_rows(model, held, titles, cal)  # the title rows (what an artifact without a map adds)
    title_recall = _recall_at(model, test_texts, hold, 5)
    fitted = fit_title_map(model, train.label_titles, train.labels, train.texts, cal)
    assert fitted is not None and fitted.details["labels_with_points"] == 200
    set_rows(model, held, titles, cal, fitted)
    map_recall = _recall_at(model, test_texts, hold, 5)
    assert map_recall >= 60 and map_recall >= title_recall + 40, (title_recall, map_recall)
    # the bias of the re-set rows is the map's, in the master and the stored column alike
    _, b = fitted.vectors_and_biases(title_embeddings(model, titles))
    assert torch.allclose(model.head.bias[held], b)
    # too few labels with points for a D x D map: none (title rows)
    few = train.labels.copy().tolil()
    few[:, 40:] = 0
    assert fit_title_map(model, train.label_titles, few.tocsr(), train.texts, cal) is None


def test_export_stores_the_title_map_and_the_service_rows_use_it(tmp_path):
    model, train, test_texts, hold, cal = _planted()
    path = tmp_path / "art"
    save_artifact(path, model, train, zero_shot=cal)
    m = json.loads((path / "manifest.json").read_text())
    assert m[MAP_KEY]["file"] == MAP_FILE and MAP_FILE in m["files"] and m[MAP_KEY]["details"]["steps"] > 0
    art = load_artifact(path)
    want = fit_title_map(model, train.label_titles, train.labels, train.texts, cal)
    assert torch.equal(art.title_map.weight, want.weight) and art.title_map.intercept == pytest.approx(want.intercept)
    titles = ["n203", "n230", "a title never seen"]
    assert torch.equal(_bits(art.zero_shot_rows(titles)), _bits(stored_rows(art.model, titles, cal, want)))
    assert not torch.equal(_bits(art.zero_shot_rows(titles)), _bits(stored_rows(art.model, titles, cal)))
    # a folded artifact (a live catalogue written into it) keeps the map: its next added labels get map rows too
    from training.artifact import save_relabelled

    labels = [(lb["uid"], lb["title"]) for lb in art.labels] + [("new", "n203")]
    rows = torch.cat([art.model.head.weight[: art.num_labels], art.zero_shot_rows(["n203"])])
    folded = load_artifact(save_relabelled(art, tmp_path / "folded", labels, rows, {"added": 1}))
    assert torch.equal(folded.title_map.weight, art.title_map.weight)
    assert torch.equal(_bits(folded.zero_shot_rows(titles)), _bits(art.zero_shot_rows(titles)))
    # a map of the wrong shape is refused, naming the file
    t = art.title_map.tensors()
    bad = TitleMap(t["weight"][:3], t["bias_weight"], 0.0)
    from safetensors.torch import save_file

    save_file({**bad.tensors(), "weight": t["weight"][:3].contiguous()}, path / MAP_FILE)
    del m["files"]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=f"{MAP_FILE}.*'weight' must have shape"):
        load_artifact(path)
