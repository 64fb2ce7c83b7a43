"""XMC ranking metrics: P@k, nDCG@k and PSP@k (Jain et al., 2016), accumulated over batches, with filter pairs.

Conventions (those of the Extreme Classification Repository and pyxclib), per row with true label set Y:
- P@k    = |top-k ∩ Y| / k.
- nDCG@k = DCG@k / IDCG@k, DCG@k = sum_{i<=k} [pred_i in Y] / log2(i + 1),
  IDCG@k = sum_{i <= min(k, |Y|)} 1 / log2(i + 1).
- PSP@k  = (sum over rows of sum_{i<=k} [pred_i in Y] / p_{pred_i}) / (the same sum for the best possible top k,
  i.e. the k true labels of largest 1/p) -- the normalised form the Repository's tables and pyxclib report
  (`psp_normalize=False` gives the raw mean of sum_{i<=k} [pred_i in Y] / (k p_{pred_i}) instead).
- Every row counts in the average; a row without true labels scores 0 on every metric.
- Filters: a filtered (row, label) pair is removed from the predictions before the top k is taken -- the remaining
  predictions of the row move up, and slots left empty are misses -- and removed from the true labels too (so it
  can neither hit nor count in IDCG / the ideal PSP). Pass at least k + (filters per row) predictions per row to
  score exactly "filter the scores, then take the top k"; with exactly k columns a filtered prediction is a miss.
- Prediction ids < 0 are empty slots (misses); ids must be < L and must not repeat within a row.
All values are fractions in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch


def jain_propensity(label_counts: np.ndarray, num_points: int, a: float = 0.55, b: float = 1.5) -> np.ndarray:
    """p_l = 1 / (1 + C exp(-A log(N_l + B))), C = (log N - 1)(B + 1)^A; N_l = training rows with label l, (L,)."""
    counts = np.asarray(label_counts, dtype=np.float64)
    c = (np.log(num_points) - 1.0) * (b + 1.0) ** a
    return 1.0 / (1.0 + c * np.exp(-a * np.log(counts + b)))


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _keys(m: sp.csr_matrix) -> np.ndarray:
    """(row * L + label) for the nonzeros of a CSR matrix, int64."""
    rows = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
    return rows * m.shape[1] + m.indices.astype(np.int64)


@dataclass
class XMCMetrics:
    """Streaming accumulator: call `update` per batch, then `compute`. PSP@k needs `propensity` (L,)."""

    ks: tuple[int, ...] = (1, 3, 5)
    propensity: np.ndarray | None = None
    psp_normalize: bool = True
    rows: int = 0
    _sums: dict[str, float] = field(default_factory=dict, repr=False)

    def reset(self) -> None:
        self.rows, self._sums = 0, {}

    def update(
        self,
        pred: np.ndarray | torch.Tensor,
        true: sp.spmatrix,
        filtered: sp.spmatrix | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """pred: (B, K >= max(ks)) label ids ranked best first; true: B x L sparse; filtered: B x L sparse or
        (P, 2) (row-in-batch, label) pairs, or None."""
        pred = _as_numpy(pred).astype(np.int64, copy=True)
        true = sp.csr_matrix(true, dtype=bool)
        true.sum_duplicates()
        num_rows, num_labels = true.shape
        kmax = max(self.ks)
        if pred.ndim != 2 or pred.shape[0] != num_rows:
            raise ValueError(f"pred must be (B={num_rows}, K), got shape {pred.shape}")
        if pred.shape[1] < kmax:
            raise ValueError(f"pred has {pred.shape[1]} columns, fewer than k={kmax}")
        if pred.size and pred.max() >= num_labels:
            raise ValueError(f"pred holds label id {pred.max()} >= number of labels {num_labels}")
        srt = np.sort(pred, axis=1)
        if np.any((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)):
            raise ValueError("pred repeats a label id within a row")
        if self.propensity is not None and len(self.propensity) != num_labels:
            raise ValueError(f"propensity has {len(self.propensity)} entries for {num_labels} labels")

        row_base = np.arange(num_rows, dtype=np.int64)[:, None] * num_labels
        valid = pred >= 0
        true_keys = _keys(true)
        if filtered is not None:
            if sp.issparse(filtered):
                filt_keys = _keys(sp.csr_matrix(filtered))
            else:
                pairs = _as_numpy(filtered).astype(np.int64).reshape(-1, 2)
                filt_keys = pairs[:, 0] * num_labels + pairs[:, 1]
            drop = valid & np.isin(row_base + pred, filt_keys)
            order = np.argsort(drop, axis=1, kind="stable")  # kept predictions move up, dropped ones to the end
            pred = np.take_along_axis(pred, order, axis=1)
            valid = np.take_along_axis(valid & ~drop, order, axis=1)
            true_keys = true_keys[~np.isin(true_keys, filt_keys)]
        pred, valid = pred[:, :kmax], valid[:, :kmax]
        hits = valid & np.isin(row_base + pred, true_keys)
        true_rows = true_keys // num_labels
        n_true = np.bincount(true_rows, minlength=num_rows)

        discount = 1.0 / np.log2(np.arange(2, max(kmax, 1) + 2))
        cum_discount = np.concatenate([[0.0], np.cumsum(discount)])
        if self.propensity is not None:
            inv_p = 1.0 / np.asarray(self.propensity, dtype=np.float64)
            gain = np.where(hits, inv_p[np.where(valid, pred, 0)], 0.0)
            # best possible top k: each row's true labels by decreasing 1/p, rank within the row
            true_w = inv_p[true_keys % num_labels]
            order = np.lexsort((-true_w, true_rows))
            rank = np.arange(len(order)) - np.searchsorted(true_rows[order], true_rows[order])
        sums = self._sums
        for k in self.ks:
            hk = hits[:, :k]
            sums[f"P@{k}"] = sums.get(f"P@{k}", 0.0) + hk.sum() / k
            idcg = cum_discount[np.minimum(n_true, k)]
            dcg = (hk * discount[:k]).sum(axis=1)
            ndcg = np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)
            sums[f"nDCG@{k}"] = sums.get(f"nDCG@{k}", 0.0) + ndcg.sum()
            if self.propensity is not None:
                sums[f"PSP@{k}"] = sums.get(f"PSP@{k}", 0.0) + gain[:, :k].sum() / k
                ideal = true_w[order][rank < k].sum() / k
                sums[f"PSP_ideal@{k}"] = sums.get(f"PSP_ideal@{k}", 0.0) + ideal
        self.rows += num_rows

    def compute(self) -> dict[str, float]:
        """{"P@k", "nDCG@k", "PSP@k" (if propensities)} for each k, as fractions; {} before any update."""
        if self.rows == 0:
            return {}
        out = {}
        for name in ("P", "nDCG", "PSP"):
            for k in self.ks:
                key = f"{name}@{k}"
                if key not in self._sums:
                    continue
                if name == "PSP" and self.psp_normalize:
                    ideal = self._sums[f"PSP_ideal@{k}"]
                    out[key] = float(self._sums[key] / ideal) if ideal > 0 else 0.0
                else:
                    out[key] = float(self._sums[key] / self.rows)
        return out


def evaluate(
    pred: np.ndarray | torch.Tensor,
    true: sp.spmatrix,
    *,
    filtered: sp.spmatrix | np.ndarray | torch.Tensor | None = None,
    propensity: np.ndarray | None = None,
    ks: tuple[int, ...] = (1, 3, 5),
    psp_normalize: bool = True,
) -> dict[str, float]:
    """One-shot `XMCMetrics`: the metrics of `pred` (B, K) against `true` (B x L), filters applied."""
    m = XMCMetrics(ks=ks, propensity=propensity, psp_normalize=psp_normalize)
    m.update(pred, true, filtered)
    return m.compute()
