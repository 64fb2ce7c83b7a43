"""The Triton path end to end on checked arguments: the queries quantised, one of the three paths chosen by shape
and memory budget, the keys decoded into scores and ids.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from elmo_kernels.topk.config import TopkConfig
from elmo_kernels.topk.inputs import prepare_queries, quantize_queries
from elmo_kernels.topk.running import topk_running
from elmo_kernels.topk.screened import screen_cap, topk_screened
from elmo_kernels.topk.tl_utils import TL_KEY_REAL_MIN, key_score
from elmo_kernels.topk.two_pass import topk_two_pass, two_pass_tiles


@triton.jit
def _decode_kernel(key_ptr, score_ptr, id_ptr, n, BLOCK: tl.constexpr):
    """`keys_to_scores` in one launch: fp32 scores and int64 ids of n keys; a sentinel key (a slot no label filled)
    becomes (-inf, -1)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(key_ptr + i, mask=i < n, other=0)
    empty = key < TL_KEY_REAL_MIN
    tl.store(score_ptr + i, tl.where(empty, float("-inf"), key_score(key)), mask=i < n)
    tl.store(id_ptr + i, tl.where(empty, -1, 0xFFFFFFFF - (key & 0xFFFFFFFF)), mask=i < n)


def topk_triton(xq, inv_scale, weights, k, num_labels, exclude, fp8_dots, cfg: TopkConfig, dead=None) -> torch.Tensor:
    """Sorted top-k keys (B, k): the two-pass path for many queries (`two_pass_tiles`), else the screened path
    where its candidate lists fit (`screen_cap`), else the running top-k kernel. dead: (num_labels,) uint8 or None."""
    tiles = two_pass_tiles(cfg, xq.shape[0], k, num_labels)
    if tiles is not None:
        return topk_two_pass(xq, inv_scale, weights, k, num_labels, exclude, fp8_dots, cfg, tiles, dead)
    cap = screen_cap(cfg, xq.shape[0], k)
    if cap is not None:
        return topk_screened(xq, inv_scale, weights, k, num_labels, exclude, fp8_dots, cfg, cap, dead)
    return topk_running(xq, inv_scale, weights, k, num_labels, exclude, fp8_dots, cfg, dead)


def triton_scores(x, weights, k, num_labels, exclude, fp8_dots, cfg: TopkConfig, dead=None):
    """The Triton path on checked arguments (dead: as `check_dead` returns it): no host synchronisation, so it can be
    captured in a CUDA graph (dead is read by address at every replay). The query quantisation and the key decoding
    are one launch each (they were ~20 small torch ops)."""
    if fp8_dots:
        xq, inv_scale = quantize_queries(x)
    else:
        xq, inv_scale = prepare_queries(x, weights.dtype, fp8_dots)
    keys = topk_triton(xq.contiguous(), inv_scale, weights, k, num_labels, exclude, fp8_dots, cfg, dead).contiguous()
    scores = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
    ids = torch.empty(keys.shape, dtype=torch.int64, device=keys.device)
    _decode_kernel[(triton.cdiv(keys.numel(), 1024),)](keys, scores, ids, keys.numel(), BLOCK=1024)
    return scores, ids
