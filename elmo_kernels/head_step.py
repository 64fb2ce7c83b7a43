"""The ELMO classifier-head step: logits, gradient, dX and the stochastic-rounding SGD update of BF16/FP8 weights.

Per label chunk W (Lc x D), embeddings X (B x D) and targets Y (given as positive (row, label) pairs):

    G  = sigmoid(X W^T) - Y                       (the gradient of the summed BCE w.r.t. the logits)
    dX += G W                                      (with W before its update)
    W  <- SR(W - lr (G^T X + wd W))                (the weight gradient G^T X is never written to memory)

Paths (`HeadStepConfig.kernel` picks the Triton one; "auto", the default, takes the one measured fastest for the
shape on the H200, BENCHMARKS.md: two-pass for bf16 weights with B > 128, three-pass otherwise):
  "three-pass" `elmo_kernels.head_step_three`: logits/G, dX and update kernels per chunk, W read three times
  "two-pass"   `elmo_kernels.head_step_two`: logits/G, then dX and the update from the same W tiles, W read twice;
               30 % faster than three-pass for bf16 at B = 256, slower for fp8 (9.0 vs 8.2 ms at 2.8M, B = 128)
  "fused"      `elmo_kernels.head_step_fused`: one persistent kernel per super-chunk of the head, W read once from DRAM;
               correct, but 3x slower than three-pass on the H200 (24.7 vs 8.2 ms at 2.8M fp8), so opt-in
  impl="torch" the plain-torch reference (`elmo_kernels.reference`), the CPU fallback
All round with the same rule on the same random stream (`elmo_kernels.rounding.random_u16`), so they agree bit for
bit up to the summation order of the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import triton.language as tl

from elmo_kernels import head_step_utils as hsu
from elmo_kernels import reference
from elmo_kernels.common import LABEL_ALIGN, has_fp8_tensor_cores, interpreting
from elmo_kernels.head_step_fused import fused_step
from elmo_kernels.head_step_three import three_pass_step
from elmo_kernels.head_step_two import two_pass_step

__all__ = [
    "KAHAN_DTYPES",
    "LABEL_ALIGN",
    "MAX_BATCH",
    "WEIGHT_DTYPES",
    "HeadStepConfig",
    "HeadStepOutput",
    "head_logits",
    "head_step",
]

WEIGHT_DTYPES = (torch.bfloat16, torch.float8_e4m3fn)
KAHAN_DTYPES = (torch.bfloat16, torch.float8_e5m2)
MAX_BATCH = 256  # the logits tile of a label block lives in registers
KERNELS = ("three-pass", "two-pass", "fused")


@dataclass(frozen=True)
class HeadStepConfig:
    """Hyper-parameters of one head step. fp8_dots=None uses FP8 tensor cores where the GPU has them (sm_89+)."""

    lr: float
    weight_decay: float = 0.0
    seed: int = 0
    compute_loss: bool = False
    fp8_dots: bool | None = None
    stochastic_rounding: bool = True  # False rounds weights to nearest: the ablation that shows why SR exists
    kernel: Literal["auto", "three-pass", "two-pass", "fused"] = "auto"  # the Triton path (impl="triton")


class HeadStepOutput(NamedTuple):
    dx: torch.Tensor  # (B, D) fp32: gradient of the summed BCE w.r.t. the embeddings
    loss: float | None  # summed BCE over valid (row, label) pairs divided by B, when asked for


def _check_inputs(chunks, x, pos_rows, pos_cols, num_labels, kahan) -> int:
    if not chunks:
        raise ValueError("chunks is empty: the head needs at least one (Lc, D) weight chunk")
    if x.dim() != 2:
        raise ValueError(f"x must be (B, D), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"x must be bfloat16 or float32, got {x.dtype}")
    batch, dim = x.shape
    if batch < 1:
        raise ValueError("x has no rows")
    dtype = chunks[0].dtype
    total = 0
    for i, w in enumerate(chunks):
        if w.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"chunk {i} has dtype {w.dtype}; the head is bfloat16 or float8_e4m3fn")
        if w.dtype != dtype:
            raise ValueError(f"chunk {i} has dtype {w.dtype} but chunk 0 has {dtype}: all chunks share one dtype")
        if w.dim() != 2 or w.shape[1] != dim:
            raise ValueError(f"chunk {i} has shape {tuple(w.shape)}; expected (Lc, {dim}) to match x")
        if w.shape[0] % LABEL_ALIGN:
            raise ValueError(f"chunk {i} has {w.shape[0]} rows; pad each chunk to a multiple of {LABEL_ALIGN}")
        if w.device != x.device:
            raise ValueError(f"chunk {i} is on {w.device} but x is on {x.device}")
        if not w.is_contiguous():
            raise ValueError(f"chunk {i} is not contiguous: the update writes it in place")
        total += w.shape[0]
    num_labels = total if num_labels is None else num_labels
    if not 0 < num_labels <= total:
        raise ValueError(f"num_labels={num_labels} must be in [1, {total}] (the rows of all chunks)")
    _check_pairs(pos_rows, pos_cols, batch, num_labels, "pos")
    if kahan is not None:
        if kahan.dtype not in KAHAN_DTYPES:
            raise ValueError(f"kahan must be bfloat16 or float8_e5m2, got {kahan.dtype}")
        if kahan.dim() != 2 or kahan.shape[1] != dim or kahan.shape[0] > num_labels:
            raise ValueError(f"kahan must be (H, {dim}) with H <= num_labels={num_labels}, got {tuple(kahan.shape)}")
        if kahan.device != x.device or not kahan.is_contiguous():
            raise ValueError("kahan must be contiguous and on the device of x")
    return num_labels


def _check_pairs(rows: torch.Tensor, cols: torch.Tensor, batch: int, num_labels: int, name: str) -> None:
    if rows.shape != cols.shape or rows.dim() != 1:
        raise ValueError(f"{name}_rows and {name}_cols must be 1-D tensors of the same length")
    if rows.dtype.is_floating_point or cols.dtype.is_floating_point:
        raise ValueError(f"{name}_rows and {name}_cols must be integer tensors")
    if rows.numel():
        # one host synchronisation for the four bounds
        lo_row, hi_row, lo_col, hi_col = torch.stack([rows.min(), rows.max(), cols.min(), cols.max()]).tolist()
        if lo_row < 0 or hi_row >= batch:
            raise ValueError(f"{name}_rows must lie in [0, {batch})")
        if lo_col < 0 or hi_col >= num_labels:
            raise ValueError(f"{name}_cols must lie in [0, {num_labels}) (padded labels take no pairs)")


def head_step(
    chunks: list[torch.Tensor],
    x: torch.Tensor,
    pos_rows: torch.Tensor,
    pos_cols: torch.Tensor,
    config: HeadStepConfig,
    *,
    num_labels: int | None = None,
    kahan: torch.Tensor | None = None,
    impl: Literal["auto", "triton", "torch"] = "auto",
    label_offset: int = 0,
    exclude_rows: torch.Tensor | None = None,
    exclude_cols: torch.Tensor | None = None,
) -> HeadStepOutput:
    """One SGD step of the whole head, in place on `chunks` (and `kahan`); returns dX for the encoder.

    chunks: label chunks of the head, each (Lc_i, D) bfloat16 or float8_e4m3fn with Lc_i a multiple of 16, in label
    order; rows past `num_labels` are padding and never change. x: (B, D) bf16/fp32, B <= 256 for impl="triton".
    pos_rows/pos_cols: the positive (batch row, global label) pairs. kahan: optional (H, D) bfloat16/float8_e5m2
    compensation for the first H labels. impl: "triton" (GPU, or CPU under TRITON_INTERPRET=1), "torch" (the
    reference, CPU fallback) or "auto" (triton on CUDA tensors, torch otherwise). label_offset: the global id of the
    first row when `chunks` is one shard of a larger head; it places the shard in the random stream, so a sharded
    step rounds exactly like the unsharded one (pos_cols stay shard-local). exclude_rows/exclude_cols: (row, label)
    pairs that get no gradient and no loss (e.g. an item's own label when it is filtered at evaluation).
    """
    num_labels = _check_inputs(chunks, x, pos_rows, pos_cols, num_labels, kahan)
    if not 0 <= config.seed < 2**62:
        raise ValueError(f"seed must be in [0, 2**62), got {config.seed}")
    if not 0 <= label_offset <= 2**32 - sum(w.shape[0] for w in chunks):
        raise ValueError(f"label_offset must be >= 0 and leave the head's global ids below 2**32, got {label_offset}")
    if config.kernel not in ("auto", *KERNELS):
        raise ValueError(f"config.kernel must be 'auto' or one of {KERNELS}, got {config.kernel!r}")
    if impl == "auto":
        impl = "triton" if x.is_cuda else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    fp8_dots = config.fp8_dots
    if fp8_dots is None:
        fp8_dots = chunks[0].dtype == torch.float8_e4m3fn and has_fp8_tensor_cores(x.device)
    if fp8_dots and chunks[0].dtype != torch.float8_e4m3fn:
        raise ValueError("fp8_dots needs float8_e4m3fn weights")
    rows, cols = hsu.sorted_pairs(pos_rows.to(x.device), pos_cols.to(x.device), x.shape[0])
    excluded = None
    if exclude_rows is not None or exclude_cols is not None:
        if exclude_rows is None or exclude_cols is None:
            raise ValueError("exclude_rows and exclude_cols go together")
        _check_pairs(exclude_rows, exclude_cols, x.shape[0], num_labels, "exclude")
        excluded = hsu.sorted_pairs(exclude_rows.to(x.device), exclude_cols.to(x.device), x.shape[0])
    if impl == "torch":
        return _head_step_torch(chunks, x, rows, cols, config, num_labels, kahan, fp8_dots, label_offset, excluded)
    if x.shape[0] > MAX_BATCH:
        raise ValueError(f"impl='triton' takes at most {MAX_BATCH} rows per step, got {x.shape[0]}")
    return _head_step_triton(chunks, x, rows, cols, config, num_labels, kahan, fp8_dots, label_offset, excluded)


def _chunk_kahan(kahan: torch.Tensor | None, start: int, rows: int) -> tuple[torch.Tensor | None, int]:
    if kahan is None or start >= kahan.shape[0]:
        return None, 0
    part = kahan[start : start + rows]
    return part, part.shape[0]


def _head_step_torch(
    chunks, x, rows, cols, config, num_labels, kahan, fp8_dots, label_offset, excluded
) -> HeadStepOutput:
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    loss = 0.0
    start = 0
    for w in chunks:
        n = w.shape[0]
        num_valid = max(0, min(n, num_labels - start))
        y = torch.zeros((x.shape[0], n), dtype=torch.float32, device=x.device)
        sel = (cols >= start) & (cols < start + n)
        y[rows[sel], cols[sel] - start] = 1.0
        keep = None
        if excluded is not None:
            keep = torch.ones_like(y, dtype=torch.bool)
            ex_sel = (excluded[1] >= start) & (excluded[1] < start + n)
            keep[excluded[0][ex_sel], excluded[1][ex_sel] - start] = False
        if config.compute_loss and num_valid:
            z = reference.quantize_embeddings(x, fp8_dots).float() @ w[:num_valid].float().T
            bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y[:, :num_valid], reduction="none")
            loss += float(bce[keep[:, :num_valid]].sum() if keep is not None else bce.sum())
        part, _ = _chunk_kahan(kahan, start, n)
        dx += reference.head_step_chunk(
            w,
            x,
            y,
            lr=config.lr,
            weight_decay=config.weight_decay,
            seed=config.seed,
            row_offset=label_offset + start,
            num_valid=num_valid,
            kahan=part,
            fp8_dots=fp8_dots,
            stochastic=config.stochastic_rounding,
            keep=keep,
        )
        start += n
    return HeadStepOutput(dx, loss / x.shape[0] if config.compute_loss else None)


def _head_step_triton(
    chunks, x, rows, cols, config, num_labels, kahan, fp8_dots, label_offset, excluded
) -> HeadStepOutput:
    interp = interpreting()
    xq = reference.quantize_embeddings(x, fp8_dots).contiguous()
    rows32 = rows.to(torch.int32)
    cols64 = (cols + label_offset).contiguous()  # global ids: the kernels place every block by its global label
    if excluded is not None:
        ex_rows32, ex_cols64 = excluded[0].to(torch.int32), (excluded[1] + label_offset).contiguous()
    else:
        ex_rows32, ex_cols64 = rows32, cols64  # not read (HAS_EXCLUDE=False)
    prep = hsu.StepInputs(
        config=config,
        xq=xq,
        xt=xq.t().contiguous(),
        pos_rows=rows32,
        pos_cols=cols64,
        ex_rows=ex_rows32,
        ex_cols=ex_cols64,
        has_exclude=excluded is not None,
        num_labels=num_labels,
        label_offset=label_offset,
        fp8_dots=fp8_dots,
        dot_dtype=tl.float32 if interp else (tl.float8e4nv if fp8_dots else tl.bfloat16),
        hot_dtype=tl.float32 if interp else tl.float16,
        num_sms=torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1,
        dx=torch.zeros(x.shape, dtype=torch.float32, device=x.device),
        loss=torch.zeros(1, dtype=torch.float32, device=x.device),
    )
    kernel = config.kernel
    if kernel == "auto":
        kernel = "two-pass" if chunks[0].dtype == torch.bfloat16 and x.shape[0] > 128 else "three-pass"
    if kernel == "fused":
        fused_step(prep, chunks, kahan)
    elif kernel == "two-pass":
        two_pass_step(prep, chunks, kahan)
    else:
        three_pass_step(prep, chunks, kahan)
    return HeadStepOutput(prep.dx, float(prep.loss) / x.shape[0] if config.compute_loss else None)


def head_logits(chunks: list[torch.Tensor], x: torch.Tensor, num_labels: int | None = None) -> torch.Tensor:
    """(B, num_labels) fp32 logits, one chunk at a time (evaluation at small L; serving uses elmo_kernels.topk)."""
    total = sum(w.shape[0] for w in chunks)
    num_labels = total if num_labels is None else num_labels
    if x.dim() != 2 or any(w.dim() != 2 or w.shape[1] != x.shape[1] for w in chunks):
        raise ValueError("x must be (B, D) and every chunk (Lc, D)")
    if not 0 < num_labels <= total:
        raise ValueError(f"num_labels={num_labels} must be in [1, {total}]")
    xf = x.float()
    return torch.cat([xf @ w.float().T for w in chunks], dim=1)[:, :num_labels]
