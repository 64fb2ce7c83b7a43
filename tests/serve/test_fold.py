"""`elmo export ARTIFACT OUT --catalogue LOG`: the folded artifact answers what the live service answered (by uid,
score for score), keeps its encoder, records where it came from, and a swap to it reconciles the log to the same
catalogue. Bad folds are one-line errors."""

import json

import pytest
import torch
from conftest import make_artifact

from elmo_serve.catalogue import Catalogue, reconcile_log
from elmo_serve.catalogue_log import Change
from elmo_serve.cli import main
from elmo_serve.live import LiveLabels
from elmo_serve.model import Query, serving_model
from training.artifact import load_artifact

TEXTS = ["label 3 words", "a text about label 10", "zstd fast compression", "ripgrep search tool", "x"]


def answers(model, texts=TEXTS, k=8):
    """Top-k (uid, score) of each text: comparable across artifacts whose ids differ."""
    out = model.predict_batch([Query(list(texts), k)])[0]
    return [[(model.uids[i], s) for i, s in zip(ids, scores, strict=True)] for ids, scores in out]


@pytest.fixture
def served(tmp_path):
    """An artifact, a catalogue log with every kind of change, and the live model replaying it."""
    src = make_artifact(tmp_path / "v1", seed=3)
    log = tmp_path / "catalogue.log"
    art = load_artifact(src)
    uids = [lb["uid"] for lb in art.labels]
    cat = Catalogue(log, uids, [lb["title"] for lb in art.labels])
    cat.change([Change("add", "zstd", "zstd fast compression"), Change("add", "rg", "ripgrep search tool")])
    cat.change([Change("update", uids[5], "a new title for label five"), Change("retire", uids[2])])
    cat.change([Change("add", "gone", "a label added then retired")])
    cat.change([Change("retire", "gone")])
    live = serving_model(src, "torch", live_labels=True)
    LiveLabels(log, live)
    return src, log, live, uids


def test_a_folded_artifact_answers_what_the_live_service_answered(served, tmp_path, capsys):
    src, log, live, uids = served
    out = tmp_path / "v1-folded"
    assert main(["export", str(src), str(out), "--catalogue", str(log)]) == 0
    assert "(version 6) folded in: 2 added, 1 retitled, 2 retired labels" in capsys.readouterr().out
    folded = load_artifact(out)
    assert folded.verified and folded.num_labels == 64 + 2 - 1  # "gone" was added, then retired
    got = [lb["uid"] for lb in folded.labels]
    assert got == [u for u in uids if u != uids[2]] + ["zstd", "rg"]  # retired left out, the rest in id order
    assert folded.labels[got.index(uids[5])]["title"] == "a new title for label five"
    record = folded.manifest["relabelled"]
    assert record["catalogue_version"] == 6 and (record["added"], record["retitled"], record["retired"]) == (2, 1, 2)
    assert record["from_version"] == load_artifact(src).version
    # the encoder is the source's, byte for byte; rows not changed by the log too
    for name, digest in load_artifact(src).files.items():
        if name.startswith("encoder/"):
            assert folded.files[name] == digest
    source_head = load_artifact(src).model.head.weight
    assert torch.equal(folded.model.head.weight[0].view(torch.uint8), source_head[0].view(torch.uint8))
    model = serving_model(out, "torch")
    assert answers(model) == answers(live)
    assert answers(model)[2][0][0] == "zstd"
    # a swap of the service to the folded artifact reconciles the log: the same catalogue, the same answers
    reconcile_log(log, model.uids, model.titles)
    swapped = serving_model(out, "torch", live_labels=True)
    LiveLabels(log, swapped)
    assert answers(swapped) == answers(live)
    live_labels = {(u, t) for i, (u, t) in enumerate(zip(live.uids, live.titles, strict=True)) if i not in live.retired}
    swapped_labels = {
        (u, t) for i, (u, t) in enumerate(zip(swapped.uids, swapped.titles, strict=True)) if i not in swapped.retired
    }
    assert swapped_labels == live_labels


def test_bad_folds_are_one_line_errors(served, tmp_path, capsys):
    src, log, _, _ = served
    other = make_artifact(tmp_path / "other", seed=4, labels=40)
    cases = [
        (["export", str(src), str(tmp_path / "o1")], "is an artifact: `elmo export ARTIFACT OUT --catalogue LOG`"),
        (["export", str(src), str(tmp_path / "o2"), "--catalogue", str(tmp_path / "none.log")], "no catalogue log"),
        (["export", str(other), str(tmp_path / "o3"), "--catalogue", str(log)], "was written for another artifact"),
        (["export", str(src), str(src), "--catalogue", str(log)], "another directory than its source"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o3").exists() and load_artifact(src).num_labels == 64  # nothing written, source intact
    assert json.loads((src / "manifest.json").read_text()).get("relabelled") is None
