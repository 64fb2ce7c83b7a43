"""Sortable int64 keys of (score, id) pairs, their sentinels, and the merge of per-shard top-k lists.

Ranking: scores descending, equal scores by the lower label id (-0.0 counts as +0.0, NaN as -inf). Both are encoded
in one sortable int64 key, (monotone int32 image of the fp32 score bits) << 32 | (2^32 - 1 - id), so that "largest
key" means "best label" and every key is distinct; ids must stay below 2^32 - 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Sentinels. Real keys are >= (monotone image of -inf) << 32 = -2139095041 * 2^32 > KEY_EMPTY + 2^32, so both
# KEY_EMPTY (padded / excluded / masked entries) and the distinct fillers KEY_EMPTY + 1 + j of the running list sort
# below every real key. KEY_FULL marks running-list slots past `k`, which are never the minimum and never replaced.
KEY_EMPTY = -(2**63) + 2**20
KEY_FULL = 2**63 - 1
KEY_FILLER_MAX = KEY_EMPTY + 2**19
KEY_REAL_MIN = -2139095041 * 2**32  # the key of (-inf, the largest id): every real key is >= this
MAX_LABELS = 2**32 - 2


def scores_to_keys(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sortable int64 keys of (fp32 score, id) pairs: larger key = better label (score desc, then id asc)."""
    s = scores.float()
    s = torch.where(s == 0, torch.zeros_like(s), s)
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    bits = s.view(torch.int32)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return mono.to(torch.int64) * 2**32 + (0xFFFFFFFF - ids.to(torch.int64))


def keys_to_scores(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `scores_to_keys`: (fp32 scores, int64 ids). A sentinel key (below KEY_REAL_MIN: a slot no label
    filled, where a row has fewer than k returnable labels) becomes (-inf, -1)."""
    ids = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    mono = (keys >> 32).to(torch.int32)
    bits = mono ^ ((mono >> 31) & 0x7FFFFFFF)
    empty = keys < KEY_REAL_MIN
    return bits.view(torch.float32).masked_fill(empty, float("-inf")), ids.masked_fill(empty, -1)


def merge_topk(
    scores: Sequence[torch.Tensor],
    ids: Sequence[torch.Tensor],
    k: int,
    id_offsets: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of per-shard top-k lists: scores[i] fp32 (B, k_i), ids[i] int64 (B, k_i) -> (B, k) each.

    ids are global, or local to shard i when id_offsets[i] (the shard's first global id) is given. Same order and
    tie rule as `topk_scores`, so merging the shards' lists equals the top-k of the unsharded head.
    """
    if len(scores) == 0 or len(scores) != len(ids):
        raise ValueError(f"need one ids tensor per scores tensor and at least one shard, got {len(scores)}/{len(ids)}")
    if id_offsets is not None and len(id_offsets) != len(scores):
        raise ValueError(f"id_offsets needs one entry per shard ({len(scores)}), got {len(id_offsets)}")
    B = scores[0].shape[0] if scores[0].dim() == 2 else -1
    keys, bounds, checked = [], [], []
    for i, (s, j) in enumerate(zip(scores, ids, strict=True)):
        if s.dim() != 2 or s.shape != j.shape or s.shape[0] != B:
            raise ValueError(f"shard {i}: scores {tuple(s.shape)} and ids {tuple(j.shape)} must both be (B={B}, k_i)")
        if j.dtype.is_floating_point:
            raise ValueError(f"shard {i}: ids must be integers, got {j.dtype}")
        g = j.to(torch.int64) + (id_offsets[i] if id_offsets is not None else 0)
        if g.numel():
            bounds += [g.min(), g.max()]
            checked.append(i)
        keys.append(scores_to_keys(s, g))
    if bounds:  # one host synchronisation for every shard's bounds
        low_high = torch.stack(bounds).view(-1, 2).tolist()
        for i, (low, high) in zip(checked, low_high, strict=True):
            if low < 0 or high > MAX_LABELS:
                raise ValueError(f"shard {i}: global ids must be in [0, {MAX_LABELS}]")
    total = sum(t.shape[1] for t in keys)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
        raise ValueError(f"k must be an int in [1, {total}] (entries over all shards), got {k}")
    return keys_to_scores(torch.topk(torch.cat(keys, dim=1), k, dim=1).values)
