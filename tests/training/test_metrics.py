import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from training.metrics import XMCMetrics, evaluate, jain_propensity


def _csr(rows: list[list[int]], num_labels: int) -> sp.csr_matrix:
    m = np.zeros((len(rows), num_labels), dtype=np.float32)
    for i, labels in enumerate(rows):
        m[i, labels] = 1
    return sp.csr_matrix(m)


def _close(got: dict, want: dict) -> None:
    bad = {k: (got.get(k), v) for k, v in want.items() if not math.isclose(got.get(k, math.nan), v, abs_tol=1e-9)}
    assert not bad, f"(got, want) mismatches: {bad}"


# Two rows, six labels; true {0, 2} and {1}; 1/p = [2, 4, 1, 2, 2, 2].
TRUE = _csr([[0, 2], [1]], 6)
PRED = np.array([[2, 3, 0, 4, 5], [1, 0, 2, 3, 4]])
PROPENSITY = 1.0 / np.array([2.0, 4.0, 1.0, 2.0, 2.0, 2.0])
IDCG2 = 1 + 1 / math.log2(3)


def test_precision_and_ndcg_by_hand():
    _close(
        evaluate(PRED, TRUE),
        {
            "P@1": 1.0,
            "P@3": (2 / 3 + 1 / 3) / 2,
            "P@5": (2 / 5 + 1 / 5) / 2,
            "nDCG@1": 1.0,
            "nDCG@3": ((1 + 1 / math.log2(4)) / IDCG2 + 1.0) / 2,  # row 0: hits at ranks 1 and 3
            "nDCG@5": ((1 + 1 / math.log2(4)) / IDCG2 + 1.0) / 2,
        },
    )
    assert "PSP@1" not in evaluate(PRED, TRUE)


def test_psp_by_hand():
    # PSP@1: gains 1/p of the hits: row 0 label 2 -> 1, row 1 label 1 -> 4; best possible: 2 (label 0) and 4.
    # PSP@3: row 0 hits labels 2 and 0 -> 1 + 2, row 1 -> 4; best possible 2 + 1 and 4: ratio 1.
    _close(evaluate(PRED, TRUE, propensity=PROPENSITY), {"PSP@1": 5 / 6, "PSP@3": 1.0, "PSP@5": 1.0})
    raw = evaluate(PRED, TRUE, propensity=PROPENSITY, psp_normalize=False)
    _close(raw, {"PSP@1": (1 + 4) / 2, "PSP@3": ((1 + 2) / 3 + 4 / 3) / 2, "PSP@5": ((1 + 2) / 5 + 4 / 5) / 2})


def test_jain_propensity_by_hand():
    # N = 100, A = 0.55, B = 1.5: C = (ln 100 - 1) * 2.5^0.55 = 5.96750; p = 1 / (1 + C (N_l + 1.5)^-0.55)
    p = jain_propensity(np.array([0, 10, 1000]), num_points=100)
    np.testing.assert_allclose(p, [0.1731703, 0.3910173, 0.8822343], rtol=1e-6)
    q = jain_propensity(np.array([0, 10]), num_points=100, a=0.6, b=2.6)
    c = (math.log(100) - 1) * 3.6**0.6
    np.testing.assert_allclose(q, [1 / (1 + c * 2.6**-0.6), 1 / (1 + c * 12.6**-0.6)], rtol=1e-12)


def test_filtered_predictions_are_dropped_before_top_k():
    true = _csr([[0, 2]], 6)
    pred = np.array([[3, 2, 4, 0, 5]])
    _close(evaluate(pred, true), {"P@1": 0.0, "P@3": 1 / 3, "P@5": 2 / 5})
    # (0, 3) filtered: the ranking becomes [2, 4, 0, 5, <empty>]
    want = {"P@1": 1.0, "P@3": 2 / 3, "P@5": 2 / 5, "nDCG@3": (1 + 1 / math.log2(4)) / IDCG2}
    _close(evaluate(pred, true, filtered=np.array([[0, 3]])), want)
    _close(evaluate(pred, true, filtered=_csr([[3]], 6)), want)
    _close(evaluate(torch.from_numpy(pred), true, filtered=torch.tensor([[0, 3]])), want)
    # with exactly k columns nothing moves up: the filtered slot is a miss
    _close(evaluate(pred[:, :3], true, filtered=np.array([[0, 3]]), ks=(1, 3)), {"P@1": 1.0, "P@3": 1 / 3})


def test_filtered_true_label_leaves_the_ground_truth():
    true = _csr([[0, 2], [1]], 6)
    pred = np.array([[2, 0, 1], [1, 0, 2]])
    got = evaluate(pred, true, filtered=np.array([[0, 2], [1, 1]]), ks=(1, 3), propensity=PROPENSITY)
    # row 0 ranks [0, 1, <empty>] against truth {0}; row 1 has no truth left and scores 0
    _close(got, {"P@1": 0.5, "P@3": 1 / 6, "nDCG@1": 0.5, "nDCG@3": 0.5, "PSP@1": 1.0, "PSP@3": 1.0})


def test_empty_slots_rows_without_labels_and_validation():
    _close(evaluate(np.array([[-1, 0, -1]]), _csr([[0]], 3), ks=(1, 3)), {"P@1": 0.0, "P@3": 1 / 3})
    _close(evaluate(np.array([[0], [1]]), _csr([[], [1]], 3), ks=(1,)), {"P@1": 0.5, "nDCG@1": 0.5})
    with pytest.raises(ValueError, match="fewer than k=5"):
        evaluate(PRED[:, :3], TRUE)
    with pytest.raises(ValueError, match="label id 6 >= number of labels 6"):
        evaluate(np.array([[6, 0, 1, 2, 3], [0, 1, 2, 3, 4]]), TRUE)
    with pytest.raises(ValueError, match="repeats"):
        evaluate(np.array([[1, 1, 2, 3, 4], [0, 1, 2, 3, 4]]), TRUE)
    with pytest.raises(ValueError, match="shape"):
        evaluate(PRED[:1], TRUE)
    assert XMCMetrics().compute() == {}


def _reference(pred, true, filtered, inv_p, k):
    """Per-row loops, straight from the definitions."""
    p = n = psp = ideal = 0.0
    for i in range(pred.shape[0]):
        truth = set(true[i].indices.tolist()) - filtered.get(i, set())
        ranked = ([c for c in pred[i] if c not in filtered.get(i, set())] + [-1] * k)[:k]
        hits = [c in truth for c in ranked]
        p += sum(hits) / k
        idcg = sum(1 / math.log2(j + 2) for j in range(min(k, len(truth))))
        n += sum(h / math.log2(j + 2) for j, h in enumerate(hits)) / idcg if idcg else 0.0
        psp += sum(inv_p[c] for c, h in zip(ranked, hits, strict=True) if h) / k
        ideal += sum(sorted((inv_p[c] for c in truth), reverse=True)[:k]) / k
    rows = pred.shape[0]
    return {f"P@{k}": p / rows, f"nDCG@{k}": n / rows, f"PSP@{k}": psp / ideal}


def test_streaming_matches_reference_on_random_data():
    rng = np.random.default_rng(0)
    rows, labels = 57, 40
    true = sp.random(rows, labels, density=0.08, format="csr", random_state=rng)
    true.data[:] = 1
    pred = np.stack([rng.permutation(labels)[:8] for _ in range(rows)])
    pairs = np.stack([rng.integers(0, rows, 30), rng.integers(0, labels, 30)], axis=1)
    pairs = np.unique(np.concatenate([pairs, np.stack([np.arange(10), pred[:10, 0]], axis=1)]), axis=0)
    counts = rng.integers(0, 50, labels)
    propensity = jain_propensity(counts, num_points=500)
    metrics = XMCMetrics(propensity=propensity)
    for start in range(0, rows, 10):  # uneven batches, filters renumbered to rows-in-batch
        stop = min(start + 10, rows)
        sel = pairs[(pairs[:, 0] >= start) & (pairs[:, 0] < stop)]
        metrics.update(pred[start:stop], true[start:stop], sel - [start, 0])
    filtered: dict[int, set[int]] = {}
    for r, c in pairs:
        filtered.setdefault(int(r), set()).add(int(c))
    want = {}
    for k in (1, 3, 5):
        want.update(_reference(pred, true, filtered, 1.0 / propensity, k))
    assert metrics.rows == rows and all(type(v) is float for v in metrics.compute().values())
    _close(metrics.compute(), want)
