"""Scoring backends against the plain reference, the serving model's batched path, and the request limits."""

import pytest
import torch

from elmo_kernels.common import interpreting
from elmo_kernels.topk import reference_topk
from elmo_kernels.topk.inputs import resolve_fp8_dots
from elmo_serve.model import Query, ServingModel
from elmo_serve.schemas import Limits, PredictRequest, RequestError, check_predict
from elmo_serve.scoring import Scorer, build_index


def _head(L=1009, D=48, dtype=torch.float8_e4m3fn, seed=0):
    g = torch.Generator().manual_seed(seed)
    pad = -(-L // 16) * 16
    w = torch.randn(pad, D, generator=g) * 2.0
    w[L:] = 100.0  # padding rows would win every query if they were ever scored
    return w.to(dtype)


def _scorer_fp8_dots(w):
    """Whether the triton backend's top-k uses fp8 x fp8 dots for this head (where its device has fp8 tensor cores)."""
    return resolve_fp8_dots(w.to("cuda" if torch.cuda.is_available() else "cpu"), None)


def _mismatch(a, b):
    bad = (a != b).nonzero()[:5].tolist()
    return f"first mismatches at {bad}"


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16, torch.float32])
def test_torch_backend_equals_reference(dtype):
    L, D = 1009, 48
    w = _head(L, D, dtype)
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(1))
    excl = [[0, 5, 17], [], [3], [1008], [], [2, 2], [100, 200, 300, 400]]
    s, i = Scorer(w, L, "torch").topk(x, 10, excl)
    rs, ri = reference_topk(x, w, 10, L, excl)
    assert torch.equal(i, ri), _mismatch(i, ri)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-4)
    assert (i < L).all()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_cpu_torch_backend_screens_fp8_and_bf16_heads(dtype):
    # The screen's exactness (ties, near ties, its error bound): tests/kernels/test_topk_cpu.py.
    scorer = Scorer(_head(dtype=dtype), 1009, "torch")
    assert scorer._screened is not None
    with pytest.raises(ValueError, match="exclude ids"):
        scorer.topk(torch.randn(1, 48), 3, [[1009]])


def test_faiss_flat_equals_exact():
    L, D = 1009, 48
    w = _head(L, D, torch.float32)
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(2))
    s, i = Scorer(w, L, "faiss").topk(x, 20)
    rs, ri = reference_topk(x, w, 20, L)
    assert torch.equal(i, ri), _mismatch(i, ri)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-4)


def test_faiss_flat_excludes_and_ivf_with_all_lists_is_exact():
    L, D = 1009, 48
    w = _head(L, D, torch.float32)
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(3))
    excl = [[1, 2], [], [7], [0, 1, 2, 3]]
    _, ri = reference_topk(x, w, 10, L, excl)
    _, i = Scorer(w, L, "faiss").topk(x, 10, excl)
    assert torch.equal(i, ri), _mismatch(i, ri)
    _, i = Scorer(w, L, "faiss", faiss_index="ivf", nlist=8, nprobe=8).topk(x, 10, excl)
    assert torch.equal(i, ri), _mismatch(i, ri)


def test_faiss_bf16_head_ranks_like_the_exact_path():
    L, D = 513, 32
    w = _head(L, D, torch.bfloat16)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(4))
    s, i = Scorer(w, L, "faiss").topk(x, 8)
    rs, ri = Scorer(w, L, "torch").topk(x, 8)
    assert torch.equal(i, ri), _mismatch(i, ri)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_backend_equals_torch():
    L, D = 4099, 64
    w = _head(L, D, torch.float8_e4m3fn)
    x = torch.randn(33, D, generator=torch.Generator().manual_seed(5))
    s, i = Scorer(w, L, "triton").topk(x, 16)
    rs, ri = reference_topk(x, w, 16, L, fp8_dots=_scorer_fp8_dots(w))
    assert torch.equal(i, ri), _mismatch(i, ri)


@pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("pad_to", [0, 24])
def test_eager_triton_calls_are_padded_and_answer_only_the_real_rows(monkeypatch, pad_to):
    """A ragged batch runs on a multiple of 16 rows (or pad_to), copies of its last query; the answer is the real
    rows', exclusions included."""
    import elmo_serve.scoring as scoring

    L, D, B = 1009, 48, 7
    w = _head(L, D, torch.float8_e4m3fn)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(2))
    excl = [[0, 5, 17], [], [3], [1008], [], [2, 2], [100, 200, 300, 400]]
    seen = []
    real = scoring.topk_scores

    def recording(q, *args, **kwargs):
        seen.append(q.shape[0])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(scoring, "topk_scores", recording)
    s, i = Scorer(w, L, "triton", cuda_graphs=False).topk(x, 10, excl, pad_to=pad_to)
    assert seen == [32 if pad_to > 16 else 16]
    assert s.shape == i.shape == (B, 10)
    rs, ri = reference_topk(x, w, 10, L, excl, fp8_dots=_scorer_fp8_dots(w))
    assert torch.equal(i, ri), _mismatch(i, ri)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-4)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        Scorer(_head(), 1009, "numpy")


def _model(L=300, D=24, row_ids=None, backend="torch"):
    w = _head(L, D, torch.bfloat16)
    proj = torch.randn(64, D, generator=torch.Generator().manual_seed(9))

    def encode(texts):  # a deterministic toy encoder: bag of hashed characters -> D
        x = torch.zeros(len(texts), 64)
        for b, t in enumerate(texts):
            for c in t:
                x[b, ord(c) % 64] += 1.0
        return x @ proj

    uids = [f"item{i}" for i in range(L)]
    titles = [f"item {i} text {chr(97 + i % 26)}{chr(97 + i * 7 % 26)}" for i in range(L)]
    return ServingModel("v-test", encode, Scorer(w, L, backend), uids, titles, row_ids=row_ids), encode, w


def test_predict_batch_equals_one_query_at_a_time_and_reference():
    model, encode, w = _model()
    qs = [Query(["abc", "hello world"], 5), Query(["zzz"], 12, [3, 4]), Query(["q"], 1)]
    batched = model.predict_batch(qs)
    for q, got in zip(qs, batched, strict=True):
        alone = model.predict_batch([q])[0]  # fp32 sums may differ in the last bit with the batch's shape
        assert [ids for ids, _ in got] == [ids for ids, _ in alone]
        assert [v for _, s in got for v in s] == pytest.approx([v for _, s in alone for v in s], rel=1e-6)
        rs, ri = reference_topk(encode(q.texts), w, q.k, 300, [q.exclude] * len(q.texts))
        for (ids, scores), r_ids, r_s in zip(got, ri.tolist(), rs.tolist(), strict=True):
            assert ids == r_ids
            assert scores == pytest.approx(r_s, rel=1e-5, abs=1e-4)


def test_predict_batch_maps_head_rows_to_label_ids():
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    model, encode, w = _model(row_ids=perm)
    (got,) = model.predict_batch([Query(["abc"], 4, [int(perm[0])])])[0]
    rs, rows = reference_topk(encode(["abc"]), w, 4, 300, [[0]])
    assert got[0] == perm[rows[0]].tolist()


def test_predict_batch_when_exclusions_leave_fewer_labels_than_kmax():
    model, *_ = _model(L=20)
    out = model.predict_batch([Query(["a"], 20), Query(["b"], 2, list(range(18)))])
    assert len(out[0][0][0]) == 20 and sorted(out[1][0][0]) == [18, 19]


def test_similar_by_embedding_excludes_the_item_and_ranks_by_cosine():
    model, _, w = _model()
    ids, scores = model.similar_by_embedding(7, 5)
    assert 7 not in ids and len(ids) == 5
    v = torch.nn.functional.normalize(w[:300].float(), dim=1)
    cos = v @ v[7]
    cos[7] = -2
    assert ids == cos.topk(5).indices.tolist()


def test_build_index_rejects_unknown_kind():
    with pytest.raises(ValueError, match="flat"):
        build_index(torch.randn(10, 4), "hnsw")


@pytest.mark.parametrize(
    "body, message",
    [
        ({"texts": ["a"] * 5}, "too many texts"),
        ({"texts": ["  "]}, "texts[0] is empty"),
        ({"texts": ["a" * 11]}, "max_text_chars"),
        ({"texts": ["a"], "k": 4}, "max_k"),
        ({"texts": ["a"], "k": 3, "exclude": [0]}, "labels left"),
        ({"texts": ["a"], "exclude": [3]}, "exclude ids"),
        ({"texts": ["a"], "exclude": [0, 1, 2]}, "max_exclude"),
    ],
)
def test_limits(body, message):
    limits = Limits(max_texts=4, max_text_chars=10, max_k=3, max_exclude=2)
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        check_predict(PredictRequest(**{"k": 1, **body}), limits, num_labels=3)
    assert e.value.status == 422


def test_direct_load_benchmark_runs(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    argv = ["--direct", "--labels", "500", "--dim", "16", "--batch-sizes", "1", "4", "--seconds", "0.05"]
    assert bench.main(argv + ["--warmup", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 4] and all(r["queries_per_s"] > 0 for r in rows)
