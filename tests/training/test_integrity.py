"""Fault injection: corrupt artifacts and checkpoints are refused naming the file (or tensor and rows), and a run
that meets a NaN stops with an error instead of training on garbage and exiting 0."""

import json
import logging
import shutil

import pytest
import torch
from lf_data import write_lf
from safetensors.torch import load_file, save_file
from sharded_runs import run_sharded

from elmo_serve.cli import main
from training.artifact import file_sha256, load_artifact
from training.checkpoint import COMMON, read_checkpoint, shard_file, sums_file
from training.config import TrainConfig
from training.train import SingleProcess, train


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        dim=16,
        epochs=1,
        batch_size=32,
        min_df=1,
        precision="fp8",
        loss_every=3,
        checkpoint_every=4,
        progress=False,
        threads=2,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run (13 steps) with its checkpoint and exported artifact."""
    root = tmp_path_factory.mktemp("integrity")
    data = write_lf(root / "data")
    train(_cfg(data, root / "run", export=str(root / "art")))
    return data, root / "run", root / "art"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rehash(art, name):
    """Write the checksum of `name` into the manifest (a change made "under" a valid checksum)."""
    m = json.loads((art / "manifest.json").read_text())
    m["files"][name] = file_sha256(art / name)
    (art / "manifest.json").write_text(json.dumps(m))


def _set_head_bytes(art, rows, value):
    t = load_file(art / "head.safetensors")
    t["weight"].view(torch.uint8)[rows] = value
    save_file(t, art / "head.safetensors")


# -- artifacts


def test_a_clean_artifact_is_verified(run):
    art = load_artifact(run[2])
    assert art.verified and "head.safetensors" in art.files and "labels.jsonl" in art.files
    assert set(art.manifest["files"]) == set(art.files)


def test_truncated_head(run, tmp_path):
    art = _copy(run[2], tmp_path / "a")
    data = (art / "head.safetensors").read_bytes()
    (art / "head.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="head.safetensors is unreadable"):
        load_artifact(art)


def test_nan_bytes_under_the_old_checksum(run, tmp_path):
    art = _copy(run[2], tmp_path / "a")
    _set_head_bytes(art, slice(3, 6), 0x7F)  # NaN in e4m3
    with pytest.raises(ValueError, match="head.safetensors does not match its checksum"):
        load_artifact(art)


def test_nan_bytes_with_the_checksum_updated(run, tmp_path):
    art = _copy(run[2], tmp_path / "a")
    _set_head_bytes(art, slice(3, 6), 0x7F)
    _rehash(art, "head.safetensors")
    with pytest.raises(ValueError, match=r"'head.weight' is not finite \(NaN/inf\) in rows \[3, 4, 5\]$"):
        load_artifact(art)


def test_wrong_shape(run, tmp_path):
    art = _copy(run[2], tmp_path / "a")
    t = load_file(art / "head.safetensors")
    t["weight"] = t["weight"][:-16].contiguous()
    save_file(t, art / "head.safetensors")
    _rehash(art, "head.safetensors")
    with pytest.raises(ValueError, match="head weight shape"):
        load_artifact(art)


def test_labels_manifest_mismatch(run, tmp_path):
    art = _copy(run[2], tmp_path / "a")
    lines = (art / "labels.jsonl").read_text().splitlines()
    (art / "labels.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    _rehash(art, "labels.jsonl")
    with pytest.raises(ValueError, match="label count mismatch: labels.jsonl has 59 labels, the manifest 60"):
        load_artifact(art)


def test_encoder_table_changed_and_a_listed_file_missing(run, tmp_path):
    art = _copy(run[2], tmp_path / "a")
    state = load_file(art / "encoder" / "encoder.safetensors")
    state["bag.weight"][7] += 1
    save_file(state, art / "encoder" / "encoder.safetensors")
    with pytest.raises(ValueError, match="encoder/encoder.safetensors does not match its checksum"):
        load_artifact(art)
    state["bag.weight"][7] = float("inf")
    save_file(state, art / "encoder" / "encoder.safetensors")
    _rehash(art, "encoder/encoder.safetensors")
    with pytest.raises(ValueError, match=r"the encoder: tensor 'bag.weight' is not finite \(NaN/inf\) in rows \[7\]"):
        load_artifact(art)
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["frozen/model.safetensors"] = "0" * 64
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="missing file frozen/model.safetensors"):
        load_artifact(art)


def test_version_follows_the_content(run, tmp_path):
    from elmo_serve.model import serving_model

    art = _copy(run[2], tmp_path / "a")
    v0 = serving_model(art, "torch").version
    assert serving_model(art, "torch").version == v0
    t = load_file(art / "head.safetensors")
    t["weight"].view(torch.uint8)[0, 0] ^= 1  # one bit of one weight
    save_file(t, art / "head.safetensors")
    _rehash(art, "head.safetensors")
    assert serving_model(art, "torch").version != v0


def test_an_artifact_without_checksums_loads_unverified(run, tmp_path, caplog):
    art = _copy(run[2], tmp_path / "a")
    m = json.loads((art / "manifest.json").read_text())
    del m["files"]
    (art / "manifest.json").write_text(json.dumps(m))
    with caplog.at_level(logging.WARNING, logger="training.artifact"):
        a = load_artifact(art)
    assert not a.verified and "not verified" in caplog.text


# -- checkpoints


def _ckpt(run, tmp_path):
    out = tmp_path / "run"
    _copy(run[1], out)
    return out, out / "checkpoint"


def test_checkpoint_with_changed_bytes(run, tmp_path, capsys):
    out, ck = _ckpt(run, tmp_path)
    raw = bytearray((ck / shard_file(0)).read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = b"\xff" * 64
    (ck / shard_file(0)).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard-0.pt does not match its checksum"):
        read_checkpoint(ck)
    assert main(["eval", str(out)]) == 2  # through the CLI: one line naming the file
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "shard-0.pt does not match its checksum" in err


def test_truncated_checkpoint(run, tmp_path):
    out, ck = _ckpt(run, tmp_path)
    raw = (ck / COMMON).read_bytes()
    (ck / COMMON).write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ValueError, match="common.pt does not match its checksum"):
        read_checkpoint(ck)
    (ck / sums_file(0)).unlink()  # without checksums: torch.load's own error, as one ValueError naming the file
    with pytest.raises(ValueError, match=r"common.pt is unreadable \(\w+: truncated or corrupt\)"):
        read_checkpoint(ck)


def test_torn_checkpoint_without_its_checksums(run, tmp_path):
    _, ck = _ckpt(run, tmp_path)
    (ck / sums_file(0)).unlink()
    with pytest.raises(ValueError, match="lacks its checksums sha256-0.json"):
        read_checkpoint(ck)


def _fill_table_ff(ck, rehash):
    common = torch.load(ck / COMMON, weights_only=False)
    common["encoder"]["bag.weight"].view(torch.uint8).fill_(0xFF)  # 0xffffffff: NaN in fp32
    torch.save(common, ck / COMMON)
    if rehash:
        sums = json.loads((ck / sums_file(0)).read_text())
        sums[COMMON] = file_sha256(ck / COMMON)
        (ck / sums_file(0)).write_text(json.dumps(sums))


@pytest.mark.parametrize("rehash", [False, True])
def test_encoder_table_of_0xff_is_caught_on_resume(run, tmp_path, rehash):
    out, ck = _ckpt(run, tmp_path)
    _fill_table_ff(ck, rehash)
    want = r"'encoder.bag.weight' is not finite \(NaN/inf\) in rows \[0, 1, 2, 3, 4\] and" if rehash else "checksum"
    with pytest.raises(ValueError, match=want):
        train(_cfg(run[0], out, epochs=2, resume=True))


# -- training


class NaNAt(SingleProcess):
    """A run whose encoder output turns NaN from its `at`-th step on."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def encode(self, model, inputs):
        x = super().encode(model, inputs)
        self.calls += 1
        return x * float("nan") if self.calls > self.at else x


@pytest.mark.parametrize(("loss_every", "message"), [(1, "step 5: the loss is nan"), (0, "step 5: the update is")])
def test_nan_during_training_stops_the_run(run, tmp_path, loss_every, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train(_cfg(run[0], out, loss_every=loss_every), parallel=NaNAt(5))
    assert not (out / "metrics.json").exists()
    assert read_checkpoint(out / "checkpoint").state["step"] == 4  # the last checkpoint: before the NaN, finite


def test_nan_on_one_worker_stops_every_worker_at_that_step(run, tmp_path):
    """NaN embeddings on rank 1 only: its rows of dL/dx are NaN, rank 0's are not; both stop at step 5 (before, rank 0
    went on into the next step's collectives and waited for a worker that had stopped)."""
    out = tmp_path / "run"
    cfg = vars(_cfg(run[0], out, loss_every=0, threads=1))
    ranks = run_sharded(2, nan_at=(1, 5), **cfg)
    assert [r.get("error", "")[:22] for r in ranks] == ["step 5: the update is "] * 2, ranks
    assert read_checkpoint(out / "checkpoint").state["step"] == 4


def test_nan_during_training_is_a_cli_error(run, tmp_path, monkeypatch, capsys):
    calls = []

    def encode(self, model, inputs):
        calls.append(1)
        x = model.embed(*inputs)
        return x * float("nan") if len(calls) > 2 else x

    monkeypatch.setattr(SingleProcess, "encode", encode)
    argv = ["train", "--data", str(run[0]), "--out", str(tmp_path / "r"), "--dim", "16", "--epochs", "1"]
    assert main([*argv, "--min-df", "1", "--batch-size", "32", "--threads", "2", "--progress", "false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("elmo train: error: step 2: ") and "\n" not in err
