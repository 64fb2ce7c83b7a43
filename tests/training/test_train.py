"""The training loop: config handling, schedule, kill-and-resume equivalence, and a real-data run beating popularity."""

import json
import shutil

import numpy as np
import pytest
import torch
from lf_data import write_lf

from training.checkpoint import model_from_checkpoint
from training.config import TrainConfig, load_config
from training.data import read_lf
from training.metrics import evaluate
from training.train import lr_factor, train


def test_config_file_and_overrides(tmp_path):
    (tmp_path / "c.toml").write_text('precision = "bf16"\nepochs = 7\n')
    (tmp_path / "c.json").write_text('{"epochs": 2}')
    cfg = load_config(str(tmp_path / "c.toml"), {"epochs": 9})
    assert (cfg.precision, cfg.epochs, cfg.batch_size) == ("bf16", 9, TrainConfig.batch_size)
    assert load_config(str(tmp_path / "c.json")).epochs == 2
    with pytest.raises(ValueError, match="unknown config keys: nope"):
        load_config(None, {"nope": 1})


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 100, 0.1, 0.0) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False)) and f[-1] < 0.01


def _cfg(data, out, **kw):
    base = dict(
        data=str(data),
        out=str(out),
        dim=32,
        epochs=2,
        batch_size=32,
        min_df=1,
        precision="fp8",
        loss_every=3,
        checkpoint_every=4,
        progress=False,
        threads=2,
    )
    return TrainConfig(**{**base, **kw})


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    data = write_lf(tmp_path / "data")
    full = train(_cfg(data, tmp_path / "full"))
    # 26 steps (2 epochs x 13); stopped at step 17, mid-epoch 1: the last checkpoint is step 16, step 17 is lost
    stopped = train(_cfg(data, tmp_path / "part", stop_after=17))
    assert stopped == {"stopped": True, "step": 17}
    resumed = train(_cfg(data, tmp_path / "part", resume=True))
    assert resumed["metrics"] == full["metrics"]
    a, _, sa = model_from_checkpoint(tmp_path / "full")
    b, _, sb = model_from_checkpoint(tmp_path / "part")
    assert sa["step"] == sb["step"] == 26
    assert torch.equal(a.head.weight.float(), b.head.weight.float())
    assert torch.equal(a.encoder.bag.weight, b.encoder.bag.weight)
    assert (tmp_path / "full" / "training_curve.png").stat().st_size > 1000
    assert (tmp_path / "full" / "p_at_k_by_decile.png").stat().st_size > 1000
    assert [h["step"] for h in full["history"] if "loss" in h][:3] == [0, 3, 6]  # skip-loss: sampled


def test_short_run_on_debian_tags_beats_most_popular(debian_tags, tmp_path):
    cfg = TrainConfig(
        data=str(debian_tags),
        out=str(tmp_path / "run"),
        train_rows=4000,
        test_rows=1000,
        epochs=2,
        batch_size=128,
        dim=64,
        char_ngrams="0-0",
        label_init=False,
        progress=False,
        threads=2,
        checkpoint_every=0,
    )
    result = train(cfg)
    trn, tst = read_lf(debian_tags, "trn"), read_lf(debian_tags, "tst")
    top = np.argsort(-np.bincount(trn.labels.indices[: trn.labels.indptr[4000]], minlength=trn.num_labels))[:5]
    popular = evaluate(np.tile(top, (1000, 1)), tst.labels[:1000])
    assert result["metrics"]["P@1"] > 100 * popular["P@1"] + 10, (result["metrics"], popular)
    assert result["metrics"]["P@5"] > 100 * popular["P@5"]


def test_frozen_encoder_run_trains_reloads_and_exports(tmp_path):
    """A hashed bag fused with a frozen (tiny, built here) BERT: trains, reloads from its checkpoint, exports an
    artifact that carries the frozen model, and that artifact embeds texts exactly as the run's model does."""
    transformers = pytest.importorskip("transformers")
    from training.artifact import load_artifact
    from training.encoders import HFTextEncoder

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "label", "text", "word", "a", "b"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    config = transformers.BertConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48
    )
    bert = tmp_path / "bert"
    HFTextEncoder(
        transformers.BertModel(config), transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    ).save_pretrained(bert)
    data = write_lf(tmp_path / "data")
    art = tmp_path / "art"
    cfg = _cfg(
        data,
        tmp_path / "run",
        frozen_encoder=str(bert),
        frozen_cache=str(tmp_path / "cache"),
        epochs=1,
        export=str(art),
    )
    result = train(cfg)
    assert result["metrics"]["P@1"] > 0
    model, _, _ = model_from_checkpoint(tmp_path / "run")
    assert model.frozen is not None and model.encoder.proj.weight.shape == (32, 32)

    loaded = load_artifact(art)
    assert loaded.manifest["encoder"]["frozen"] == {"dim": 32, "max_length": cfg.frozen_max_length}
    assert (art / "frozen" / "config.json").is_file()
    texts = ["a word of text", "label b", "text"]
    for m in model.encoder.modules():  # the artifact stores the hashed bag's tables in bf16, rounded to nearest
        if isinstance(m, torch.nn.EmbeddingBag):
            m.weight.data = m.weight.data.bfloat16().float()
    with torch.no_grad():
        want = model.embed(*model.encoder_inputs(texts))
        got = loaded.model.embed(*loaded.model.encoder_inputs(texts))
    assert torch.equal(got, want)

    # The frozen model is part of the artifact: without it, or with another hidden size, loading names the problem.
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["encoder"]["frozen"]["dim"] = 48
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="hidden size 32 does not match"):
        load_artifact(art)
    shutil.rmtree(art / "frozen")
    with pytest.raises(ValueError, match="frozen/config.json"):
        load_artifact(art)


def test_fp8_encoder_needs_an_fp8_gpu():
    from training.build import fp8_linears

    with pytest.raises(ValueError, match="FP8 tensor cores"):
        fp8_linears(torch.nn.Sequential(torch.nn.Linear(32, 32)), torch.device("cpu"))
