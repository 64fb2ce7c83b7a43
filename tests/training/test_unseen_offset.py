"""The offset of the re-set rows of labels with no training point, chosen on a held-out slice of the training rows
(`training.unseen_offset`): the split, the recall count, and a run that chooses it in a nested run and re-sets with
it (also across a resume, without running the nested run again)."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from training.config import TrainConfig
from training.data import make_synthetic, permute_labels, read_lf
from training.train import SingleProcess, wants_unseen_offset
from training.unseen_offset import OFFSETS, holdout_split, unseen_recall


def test_holdout_split_is_a_seeded_partition_of_the_rows():
    ds, _ = make_synthetic(num_labels=40, num_train=101, num_test=5, seed=1)
    rest, held = holdout_split(ds, 0.1, seed=3)
    assert (rest.num_rows, held.num_rows) == (91, 10)
    assert not set(rest.uids) & set(held.uids) and set(rest.uids) | set(held.uids) == set(ds.uids)
    position = {u: i for i, u in enumerate(ds.uids)}
    for part in (rest, held):
        rows = [position[u] for u in part.uids]
        assert rows == sorted(rows)  # row order kept
        assert (part.labels != ds.labels[rows]).nnz == 0 and part.texts == [ds.texts[i] for i in rows]
    again, other = holdout_split(ds, 0.1, seed=3)[1], holdout_split(ds, 0.1, seed=4)[1]
    assert again.uids == held.uids and other.uids != held.uids
    assert holdout_split(ds.subset(np.arange(2)), 0.01, seed=0)[1].num_rows == 1  # one row each side at least
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match="fraction"):
            holdout_split(ds, bad, seed=0)
    with pytest.raises(ValueError, match="2 training rows"):
        holdout_split(ds.subset(np.arange(1)), 0.5, seed=0)


def test_unseen_recall_counts_the_pairs_of_unseen_labels_found():
    labels = sp.csr_matrix(np.array([[1, 1, 0, 1], [0, 0, 1, 1], [1, 0, 0, 0]], dtype=np.float32))
    unseen = np.array([False, True, False, True])
    ids = torch.tensor([[1, 0], [2, 0], [3, 1]])
    # row 0: unseen 1 found, 3 missed; row 1: unseen 3 missed; row 2: none of its labels is unseen
    assert unseen_recall(ids, labels, unseen) == (1, 3)


def test_wants_an_offset_only_where_labels_without_points_are_re_set(tmp_path):
    ds, _ = make_synthetic(num_labels=300, num_train=300, num_test=5, seed=2)
    assert (ds.label_counts() == 0).any()
    on = TrainConfig(zero_shot_unseen=True)
    par = SingleProcess()
    assert wants_unseen_offset(on, ds, par)
    assert not wants_unseen_offset(TrainConfig(), ds, par)  # zero_shot_unseen off: nothing is re-set
    assert not wants_unseen_offset(TrainConfig(zero_shot_unseen=True, zero_shot_holdout=0.0), ds, par)
    assert not wants_unseen_offset(TrainConfig(zero_shot_unseen=True, label_init=False), ds, par)
    seen = ds.labels.copy().tolil()
    for j in np.flatnonzero(ds.label_counts() == 0):
        seen[int(j) % ds.num_rows, int(j)] = 1.0
    from dataclasses import replace

    assert not wants_unseen_offset(on, replace(ds, labels=seen.tocsr()), par)  # every label has a point
    with pytest.raises(ValueError, match="zero_shot_holdout"):
        TrainConfig(zero_shot_holdout=1.0).validate()


def test_a_run_chooses_the_offset_on_held_out_rows_and_re_sets_with_it(tmp_path):
    """The run's nested run (on 80 % of the rows) sweeps OFFSETS on the other 20 %; the offset with the best held-out
    P@1 is recorded and the labels with no point are re-set with it: their biases sit that far below the map's."""
    from lf_data import write_lf

    from training.artifact import load_artifact
    from training.checkpoint import model_from_checkpoint
    from training.train import train as run
    from training.zero_shot import title_embeddings

    data = write_lf(tmp_path / "data", num_labels=300, num_train=300, num_test=40, seed=2)
    cfg = dict(dim=32, epochs=3, batch_size=32, min_df=1, precision="fp8", progress=False, threads=2)
    art_path = tmp_path / "artifact"
    common = dict(data=str(data), zero_shot_unseen=True, zero_shot_holdout=0.2, **cfg)
    result = run(TrainConfig(out=str(tmp_path / "run"), export=str(art_path), **common))
    chosen = result["unseen_offset"]
    curve = chosen["curve"]
    assert [c["offset"] for c in curve] == list(OFFSETS) and chosen["held_rows"] == 60
    best = max(curve, key=lambda c: (round(c["P@1"], 6), round(c["P@5"], 6), c["offset"]))
    assert chosen["offset"] == best["offset"] and result["zero_shot"]["offset"] == chosen["offset"]
    assert chosen["unseen_pairs"] > 0
    # a lower bias pushes those labels down the lists (up to ties of the bf16 scores, which break either way)
    recall = [c["unseen_R@5"] for c in curve]
    assert recall[0] == max(recall) > min(recall) == recall[-1]
    nested = json.loads((tmp_path / "run" / "unseen-holdout" / "metrics.json").read_text())
    assert nested["config"]["zero_shot_holdout"] == 0.0 and nested["config"]["recipe"] == "off"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["unseen_offset"] == chosen

    model, _, _ = model_from_checkpoint(tmp_path / "run")
    trn = permute_labels(read_lf(data, "trn"), model.label_order.numpy())
    unseen = np.flatnonzero(trn.label_counts() == 0)
    title_map = load_artifact(art_path).title_map  # export fits the map the re-set fitted (same seed, same model)
    _, bias = title_map.vectors_and_biases(title_embeddings(model, [trn.label_titles[j] for j in unseen]))
    assert torch.allclose(model.head.bias[unseen], bias + chosen["offset"], atol=1e-5)

    # stopped after a checkpoint and resumed: the offset comes from the checkpoint, the nested run is not run again
    stamp = (tmp_path / "run" / "unseen-holdout" / "metrics.json").stat().st_mtime_ns
    part = dict(out=str(tmp_path / "run2"), checkpoint_every=5, **common)
    assert run(TrainConfig(stop_after=6, **part))["stopped"]
    nested2 = tmp_path / "run2" / "unseen-holdout" / "metrics.json"
    stamp2 = nested2.stat().st_mtime_ns
    resumed = run(TrainConfig(resume=True, **part))
    assert nested2.stat().st_mtime_ns == stamp2 and resumed["unseen_offset"] == chosen
    assert resumed["zero_shot"]["offset"] == chosen["offset"]
    assert (tmp_path / "run" / "unseen-holdout" / "metrics.json").stat().st_mtime_ns == stamp
