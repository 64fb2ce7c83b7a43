"""The artifact: a round trip keeps the scores; each corruption fails with a ValueError that names it."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from training.artifact import FORMAT_VERSION, load_artifact, save_artifact
from training.config import TrainConfig
from training.data import make_synthetic, reindex_by_frequency
from training.train import build_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    train, test = make_synthetic(num_labels=50, num_train=300, num_test=40, seed=1)
    (train, test), order = reindex_by_frequency(train, test)
    cfg = TrainConfig(dim=16, precision="fp8", min_df=1)
    model = build_model(cfg, train, order)
    path = tmp_path_factory.mktemp("art") / "model"
    save_artifact(path, model, train, metrics={"P@1": 12.5}, config={"dim": 16})
    return model, train, test, path


def test_round_trip_keeps_scores_and_labels(trained):
    model, train, test, path = trained
    art = load_artifact(path)
    m = art.manifest
    assert m["format_version"] == FORMAT_VERSION and m["num_labels"] == 50 and m["dim"] == 16
    assert m["head"]["dtype"] == "float8_e4m3fn" and m["metrics"] == {"P@1": 12.5} and len(m["data_fingerprint"]) == 64
    assert [lab["id"] for lab in art.labels] == list(range(50))
    order = model.label_order.numpy()
    titles = {int(order[j]): t for j, t in enumerate(train.label_titles)}
    assert all(art.labels[i]["title"] == titles[i] for i in range(50))
    texts = test.texts[:8]
    x0 = _bf16_table(model).embed(*model.encoder_inputs(texts))  # the table is stored rounded to bf16
    x1 = art.model.embed(*art.model.encoder_inputs(texts))
    torch.testing.assert_close(x1, x0)
    s0 = model.head.scores(x0)  # columns in training (frequency) order
    s1 = art.model.head.scores(x1)  # columns in label-id order
    torch.testing.assert_close(s1[:, order], s0)


def _bf16_table(model):
    """A copy of `model` with its embedding table rounded to bf16 (round to nearest), as the artifact stores it."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.encoder.bag.weight.copy_(ref.encoder.bag.weight.to(torch.bfloat16).float())
    return ref


def test_table_is_stored_in_bf16_and_queries_are_the_head_inputs(trained):
    model, _, test, path = trained
    art = load_artifact(path)
    state = load_file(path / "encoder" / "encoder.safetensors")
    assert state["bag.weight"].dtype == torch.bfloat16 and art.manifest["encoder"]["table_dtype"] == "bfloat16"
    assert state["norm.weight"].dtype == torch.float32  # only the table is rounded
    assert art.model.encoder.bag.weight.dtype == torch.float32  # upcast when loaded
    texts = test.texts[:5]
    m = art.model
    want = m.head.head_input(m.embed(*m.encoder_inputs(texts))).float()
    got = art.queries(texts)
    assert got.shape == (5, 17) and got.dtype == torch.float32  # dim 16 + the bias column
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_fp32_table_without_table_dtype_still_loads(trained, tmp_path):
    model, _, test, path = trained
    old = _copy(path, tmp_path)
    spath = old / "encoder" / "encoder.safetensors"
    state = load_file(spath)
    state["bag.weight"] = model.encoder.bag.weight.detach().contiguous()  # fp32, as artifacts were written before
    save_file(state, spath)
    _edit_manifest(old, lambda m: (m["encoder"].pop("table_dtype"), m.pop("files")))  # as written before both
    art = load_artifact(old)
    texts = test.texts[:8]
    torch.testing.assert_close(
        art.model.embed(*art.model.encoder_inputs(texts)), model.embed(*model.encoder_inputs(texts))
    )
    _edit_manifest(old, lambda m: m["encoder"].update(table_dtype="bfloat16"))
    with pytest.raises(ValueError, match="bag.weight is torch.float32, the manifest says bfloat16"):
        load_artifact(old)
    _edit_manifest(old, lambda m: m["encoder"].update(table_dtype="int4"))
    with pytest.raises(ValueError, match="table_dtype 'int4'"):
        load_artifact(old)


def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_wrong_version(trained, tmp_path):
    p = _copy(trained[3], tmp_path)
    _edit_manifest(p, lambda m: m.update(format_version=99))
    with pytest.raises(ValueError, match="unsupported format_version 99"):
        load_artifact(p)


def test_shape_mismatch(trained, tmp_path):
    p = _copy(trained[3], tmp_path)
    t = load_file(p / "head.safetensors")
    t["weight"] = t["weight"][:, :-1].contiguous()
    save_file(t, p / "head.safetensors")
    with pytest.raises(ValueError, match="head weight shape"):
        load_artifact(p)


def test_dtype_mismatch(trained, tmp_path):
    p = _copy(trained[3], tmp_path)
    _edit_manifest(p, lambda m: m["head"].update(dtype="bfloat16"))
    with pytest.raises(ValueError, match="dtype"):
        load_artifact(p)


@pytest.mark.parametrize("name", ["manifest.json", "head.safetensors", "labels.jsonl", "encoder/encoder.safetensors"])
def test_missing_file(trained, tmp_path, name):
    p = _copy(trained[3], tmp_path)
    (p / name).unlink()
    with pytest.raises(ValueError, match=f"missing file {name}"):
        load_artifact(p)


def test_label_count_mismatch(trained, tmp_path):
    p = _copy(trained[3], tmp_path)
    lines = (p / "labels.jsonl").read_text().splitlines()
    (p / "labels.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="label count mismatch: labels.jsonl has 49 labels, the manifest 50"):
        load_artifact(p)


def test_encoder_config_mismatch(trained, tmp_path):
    p = _copy(trained[3], tmp_path)
    _edit_manifest(p, lambda m: m["encoder"]["config"].update(num_features=7))
    with pytest.raises(ValueError, match="encoder state shape mismatch"):
        load_artifact(p)


def test_save_replaces_atomically(trained, tmp_path):
    model, train, _, _ = trained
    path = tmp_path / "a"
    save_artifact(path, model, train)
    save_artifact(path, model, train, metrics={"P@1": 1.0})
    assert load_artifact(path).manifest["metrics"] == {"P@1": 1.0}
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a"], "no temporary directories left behind"
    assert np.isfinite(load_artifact(path).model.head.weight.float().numpy()).all()
