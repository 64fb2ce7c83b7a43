"""Exact top-k of an fp8 or bf16 head on the CPU: a bf16 screen of every label, then fp32 rescoring of a few.

Why two passes: one query reads the whole head. In fp32 a 42K x 257 head is 43 MB, streamed from DRAM at ~5 ms per
query on the serving CPU; its bf16 copy (every fp8 and bf16 value is a bf16 value, so the copy is exact) is half that,
and oneDNN's prepacked bf16 GEMM scores it in ~0.7 ms (cache resident). That GEMM accumulates in fp32 but returns
bf16, so a screened score `a` is an fp32 score rounded to 8 bits. For every label, with s any fp32 summation of the
exact products x_d w_d (the rescoring's included):

    |a - s| <= 2^-6 |a| + 8 D 2^-24 |x| |w| + 2^-100

(rounding to bf16 costs <= 2^-8 |s|, 2^-7 if truncated; two fp32 summation orders differ by <= 2 D 2^-24 sum |x_d w_d|
<= 2 D 2^-24 |x| |w| (Cauchy-Schwarz); the last term covers flushed subnormals. Each bound is taken 2-4x too wide: a
wider margin only adds candidates.) A label can be in the exact top-k only if its upper bound reaches the k-th largest
lower bound: 11-20 labels for k = 10 on DebianDeps, nearly always among the first 2k + 32 by screened score, which
one check proves (else every label is bounded). The candidates are rescored in fp32 and ranked with the kernels' key
(score descending, then the lower id): the answer of scoring every label in fp32, as
`elmo_kernels.topk.topk_scores(impl="torch")` does.
"""

from __future__ import annotations

import torch

from elmo_kernels.topk.inputs import check_dead, check_exclude
from elmo_kernels.topk.keys import KEY_EMPTY, keys_to_scores, scores_to_keys

_REL, _TINY = 2.0**-6, 2.0**-100  # the bounds above


def _prepack(w: torch.Tensor):
    """x (B, D) bf16 -> x @ w^T (B, L) bf16 with oneDNN's prepacked weight when torch has oneDNN, else a matmul."""
    if torch.backends.mkldnn.is_available():
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)  # the layout oneDNN wants: reordered once
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        except (AttributeError, RuntimeError):
            pass
    return lambda x: x @ w.T


class ScreenedTopk:
    """Exact top-k rows of bf16-rounded queries against the first `num_labels` rows of an fp8/bf16 head.

    The dead-row mask is an argument of each call, as for `topk_scores` (one code path; a caller that keeps one mask
    and flips it in place passes the same tensor every time). The head is copied to bf16 and prepacked here: rows
    rewritten later (labels added into spare rows) need a new ScreenedTopk.
    """

    def __init__(self, weights: torch.Tensor, num_labels: int):
        if weights.dtype not in (torch.float8_e4m3fn, torch.bfloat16) or weights.device.type != "cpu":
            raise ValueError(f"needs an fp8/bf16 head on the CPU, got {weights.dtype} on {weights.device}")
        self.num_labels = num_labels
        self.weights = weights[:num_labels]  # the stored rows: the rescoring gathers from them
        w = self.weights.to(torch.bfloat16).contiguous()
        self._norms = w.float().norm(dim=1) * (8 * w.shape[1] * 2.0**-24)  # |w| times the summation-order factor
        self._norm_max = self._norms.max()
        self._screen = _prepack(w)

    def __call__(
        self, xq: torch.Tensor, k: int, exclude: torch.Tensor | None = None, *, dead: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """xq (B, D) bf16, exclude (B, E) int64 ids padded with -1 (or B lists), dead (>= num_labels,) bool/uint8
        rows never returned (as in `topk_scores`) -> (scores fp32 (B, k), rows int64 (B, k)). Each query must keep
        >= k labels neither excluded nor dead (ValueError)."""
        if not 1 <= k <= self.num_labels:
            raise ValueError(f"k must be in [1, num_labels={self.num_labels}], got {k}")
        B = xq.shape[0]
        dead = check_dead(dead, self.num_labels, self.weights.device)
        if B == 0:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.int64)
        exclude = check_exclude(exclude, B, k, self.num_labels, xq.device, dead)
        a = self._screen(xq)
        # Excluded and dead labels screen at -inf: they bound nothing, and the final mask drops them.
        if exclude is not None:
            rows, cols = (exclude >= 0).nonzero(as_tuple=True)
            a[rows, exclude[rows, cols]] = float("-inf")
        if dead is not None:
            a.masked_fill_(dead[None, :] != 0, float("-inf"))
        qn = xq.float().norm(dim=1, keepdim=True)
        # Usually every label that can be in the top-k is among the first 2k + 32 by screened score: the k first score
        # at least `floor`, and any label after the subset at most `beyond` (the bound grows with the score).
        top_a, cand = a.topk(min(2 * k + 32, self.num_labels), dim=1)
        top_a = top_a.float()
        floor = (top_a[:, :k] - _margin(top_a[:, :k], qn, self._norms[cand[:, :k]])).min(dim=1).values
        last = top_a[:, -1]
        beyond = last + _margin(last, qn[:, 0], self._norm_max)
        if not bool((beyond < floor).all()):  # else (near ties, many exclusions): bound every label
            a = a.float()
            m = _margin(a, qn, self._norms)
            upper = (a + m).nan_to_num_(nan=float("-inf"))  # an excluded label: -inf + inf
            kth = (a - m).topk(k, dim=1).values[:, -1:]
            n = max(k, int((upper >= kth).sum(dim=1).max()))  # the widest row's candidate count
            top_a, cand = upper.topk(n, dim=1)  # holds every candidate of every row
        exact = torch.bmm(self.weights[cand].float(), xq.float().unsqueeze(2)).squeeze(2)
        keys = scores_to_keys(exact, cand).masked_fill_(top_a == float("-inf"), KEY_EMPTY)  # excluded or dead
        return keys_to_scores(keys.topk(k, dim=1).values)


def _margin(a: torch.Tensor, qn: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """The bound on |screened - exact| (module docstring) for screened scores a, |x| qn and the rows' scaled |w|."""
    return a.abs() * _REL + qn * norms + _TINY
