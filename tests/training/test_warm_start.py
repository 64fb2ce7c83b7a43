"""Warm start (`--init-from ARTIFACT`, `--init-catalogue LOG`): a run starts from an artifact's encoder and the rows
of the labels it holds; labels added to a live service become trained labels; the artifact's encoder fields win and
a flag that contradicts them is an error."""

import json

import numpy as np
import pytest
import torch
from lf_data import write_lf

from elmo_serve.catalogue import Catalogue
from elmo_serve.catalogue_log import Change
from elmo_serve.cli import main
from elmo_serve.fold import fold_catalogue
from training import data as xd
from training.artifact import load_artifact
from training.build import build_model
from training.config import load_config
from training.train import train
from training.warm_start import adopt

HELD = 12  # labels left out of the first model's data, then added live
FLAGS = ["--dim", "32", "--min-df", "1", "--batch-size", "32", "--progress", "false", "--recipe", "off"]


def drop_labels(src, dst, uids):
    """The LF dataset `src` without the labels `uids` (in lbl.json and every row; rows left with none dropped)."""
    lines = [json.loads(x) for x in (src / "lbl.json").read_text().splitlines()]
    keep = [i for i, lb in enumerate(lines) if lb["uid"] not in uids]
    new_id = {old: new for new, old in enumerate(keep)}
    dst.mkdir(parents=True)
    (dst / "lbl.json").write_text("".join(json.dumps(lines[i]) + "\n" for i in keep))
    for split in ("trn", "tst"):
        rows = [json.loads(x) for x in (src / f"{split}.json").read_text().splitlines()]
        out = []
        for row in rows:
            row["target_ind"] = [new_id[t] for t in row["target_ind"] if t in new_id]
            if row["target_ind"]:
                out.append(json.dumps(row) + "\n")
        (dst / f"{split}.json").write_text("".join(out))
    return dst


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A model trained without HELD labels, its artifact, and a catalogue log that added them through the API."""
    tmp = tmp_path_factory.mktemp("warm")
    full = write_lf(tmp / "full", num_labels=60, num_train=600, num_test=150, seed=5)
    train_ds = xd.read_lf(full, "trn")
    counts = train_ds.label_counts()
    held = [train_ds.label_uids[j] for j in np.argsort(-counts)[10 : 10 + HELD]]  # frequent enough to measure
    part = drop_labels(full, tmp / "part", set(held))
    art = tmp / "art"
    argv = ["train", "--data", str(part), "--epochs", "3", "--out", str(tmp / "run"), "--export", str(art)]
    assert main(argv + FLAGS) == 0
    labels = load_artifact(art).labels
    log = tmp / "catalogue.log"
    titles = dict(zip(train_ds.label_uids, train_ds.label_titles, strict=True))
    cat = Catalogue(log, [lb["uid"] for lb in labels], [lb["title"] for lb in labels])
    cat.change([Change("add", u, titles[u]) for u in held])
    return full, art, log, held, tmp


def recall_of(artifact, data, uids, k=5) -> float:
    """recall@k of the labels `uids` over the test rows of `data` that carry them (the artifact's own ranking)."""
    art = load_artifact(artifact)
    test = xd.read_lf(data, "tst")
    ids = {lb["uid"]: lb["id"] for lb in art.labels}
    hits = total = 0
    rows = range(test.num_rows)
    with torch.inference_mode():
        scores = art.queries([test.texts[i] for i in rows]) @ art.model.head.weight[: art.num_labels].float().T
        top = scores.topk(k, dim=1).indices.tolist()
    for i, row_top in zip(rows, top, strict=True):
        got = {art.labels[j]["uid"] for j in row_top}
        truth = {test.label_uids[t] for t in test.labels.indices[test.labels.indptr[i] : test.labels.indptr[i + 1]]}
        wanted = truth & set(uids)
        hits, total = hits + len(wanted & got), total + len(wanted)
    assert total > 0 and all(u in ids for u in uids)
    return 100 * hits / total


def test_added_labels_become_trained_labels(live, capsys):
    full, art, log, held, tmp = live
    run, out = tmp / "warm-run", tmp / "warm-art"
    argv = ["train", "--data", str(full), "--init-from", str(art), "--init-catalogue", str(log), "--epochs", "2"]
    assert main(argv + ["--out", str(run), "--export", str(out), "--batch-size", "32", "--progress", "false"]) == 0
    text = capsys.readouterr().out
    assert f"{HELD} added, 0 retitled, 0 retired labels" in text
    want = "60 labels carry its rows, 0 start from their titles, 0 at random; 0 of its labels are not in the data"
    assert want in text
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["warm_start"]["carried"] == 60 and metrics["config"]["dim"] == 32  # the artifact's encoder
    folded = run / "init-artifact"
    assert load_artifact(folded).manifest["relabelled"]["added"] == HELD
    zero_shot, trained = recall_of(folded, full, held), recall_of(out, full, held)
    assert trained > zero_shot + 10, (zero_shot, trained)  # trained on their rows, they rank far better
    # the labels the first model had are not forgotten: its P@1 on the data it knew, or better
    before = json.loads((tmp / "run" / "metrics.json").read_text())["metrics"]["P@1"]
    assert metrics["metrics"]["P@1"] >= before - 5


def test_the_warm_model_starts_as_the_artifact_answers(live):
    """Before its first step, a warm-started model scores texts as the (folded) artifact does."""
    full, art, log, held, tmp = live
    folded = fold_catalogue(art, log, tmp / "folded").path
    cfg = load_config(None, {"data": str(full), "init_from": str(folded), "out": str(tmp / "x"), "recipe": "off"})
    cfg = adopt(cfg, set())
    train_ds, test_ds = xd.read_lf(full, "trn"), xd.read_lf(full, "tst")
    (train_ds, test_ds), order = xd.reindex_by_frequency(train_ds, test_ds)
    record: dict = {}
    model = build_model(cfg, train_ds, order, record).eval()
    assert record["carried"] == 60 and record["random"] == 0
    source = load_artifact(folded)
    texts = test_ds.texts[:40]
    with torch.inference_mode():
        want = source.queries(texts) @ source.model.head.weight[: source.num_labels].float().T
        x = model.head.head_input(model.embed(*model.encoder_inputs(texts)))
        got = (x @ model.head.weight[: model.head.num_labels].float().T)[:, np.argsort(order)]  # back to data order
    uid_of_col = [train_ds.label_uids[j] for j in np.argsort(order)]
    src_col = {lb["uid"]: lb["id"] for lb in source.labels}
    want = want[:, [src_col[u] for u in uid_of_col]]
    assert torch.allclose(got, want, atol=0.15 * float(want.std()), rtol=0.05)
    assert (got.argmax(1) == want.argmax(1)).float().mean() > 0.9


def test_unknown_labels_start_from_their_titles_and_flags_that_change_the_encoder_are_refused(live, tmp_path, capsys):
    full, art, _, held, _ = live
    base = {"data": str(full), "init_from": str(art), "out": str(tmp_path / "r"), "recipe": "off"}
    record: dict = {}
    cfg = adopt(load_config(None, base), set())
    assert (cfg.dim, cfg.min_df) == (32, 1) and "dim" in cfg.recipe_keep.split(",")
    train_ds, test_ds = xd.read_lf(full, "trn"), xd.read_lf(full, "tst")
    (train_ds, _), order = xd.reindex_by_frequency(train_ds, test_ds)
    build_model(cfg, train_ds, order, record)
    assert record["carried"] == 60 - HELD and record["from_titles"] == HELD and record["left_out"] == 0
    with pytest.raises(ValueError, match=r"--dim 64 conflicts with the artifact's 32"):
        train(load_config(None, {**base, "dim": 64}))
    assert main(["train", "--data", str(full), "--init-catalogue", "x.log", "--out", str(tmp_path / "r2")]) == 2
    assert "--init-catalogue LOG folds a live catalogue into the artifact of --init-from" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not an artifact directory"):
        train(load_config(None, {**base, "init_from": str(tmp_path / "nothing")}))
