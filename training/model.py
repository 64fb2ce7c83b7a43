"""The low-precision classification head over the fused ELMO step, and the model (encoder + head) around it.

The head stores one padded weight matrix W (L_pad x D_in) in fp32, bf16 or float8_e4m3fn, split into label chunks
whose size comes from a memory budget. Its input is `head_input(x)` = [x / s, c / s]: the encoder output divided by
a fixed power-of-two scale s (so that W_stored = s W sits in e4m3's normal range), plus an optional constant bias
column (then the last column of W is a per-label bias). Scores are head_input(x) @ W_stored^T, i.e. exactly
x @ W^T + b in true units: what the artifact stores and serving computes.

The bias's master copy is a separate (L_pad,) fp32 vector `bias` (true units), for every precision (so the recipe
is the same across heads); the column is its mirror in the storage dtype. An e4m3 column alone resolves a bias near
-10 only to about +-0.6 logits, and stochastic rounding of its small updates added noise that cost ~0.4 P@1:
- CPU / torch path (`elmo_kernels.head_step_cpu`, `MasterBias`): the training logits use the fp32 master; its SGD
  update (the one the column would get: lr c^2 times the batch-summed gradient in true units) is applied in fp32,
  then the column is set to the master rounded to nearest. Evaluation (`topk`) uses the column, i.e. measures what
  is exported and served; `topk(x, k, master_bias=True)` uses the master instead.
- CUDA kernels (bf16 / fp8): `elmo_kernels.head_step` has no bias input, and a separate bias gradient (the logits'
  column sums) is not affordable at millions of labels outside the fused kernel, so there the kernels train the
  column as before (stochastic rounding) and the master is re-read from the column after each step.
- Export: the artifact has only the column, which already mirrors the master: unchanged format.

Training is plain SGD on the summed BCE over all labels (the kernels' convention: lr multiplies the gradient summed
over the batch rows), with the weight gradient fused into the update and rounded stochastically for bf16 / fp8:
- CUDA: `elmo_kernels.head_step.head_step` (Triton), B <= 256 rows per call (larger batches go as several calls);
- CPU: `elmo_kernels.head_step_cpu.head_step_cpu`, the same mathematics chunk by chunk in torch with bf16 GEMMs and
  torch's RNG for the rounding bits (~10x faster on CPU than the kernels' Philox reference);
- fp32: plain torch SGD through the same function, the comparison row (fp32 weights, the same GEMM precision).
Positives and excluded pairs (a row's own label, from the training filter file: no gradient) are (P, 2) int64
(row, label) tensors, the form `training.data.Batch` carries. Ranking (`topk`) goes through
`elmo_kernels.topk.topk_scores` a chunk at a time: no B x L score matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from elmo_kernels.common import FP8_E4M3, FP8_E4M3_MAX, LABEL_ALIGN, round_up
from elmo_kernels.head_step import MAX_BATCH, HeadStepConfig, head_step
from elmo_kernels.head_step_cpu import MasterBias, head_step_cpu
from elmo_kernels.topk import KEY_EMPTY, keys_to_scores, scores_to_keys, topk_scores
from training.data import pairs_in_rows

PRECISIONS = ("fp32", "bf16", "fp8", "fp8+kahan")
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": FP8_E4M3}
STEP_IMPLS = ("auto", "kernels", "cpu")


@dataclass
class HeadConfig:
    num_labels: int
    dim: int  # encoder output dimension (the head's input has one more column with bias=True)
    precision: str = "fp8"  # fp32 | bf16 | fp8 | fp8+kahan
    bias: bool = True  # a per-label bias: fp32 master vector, mirrored in the last weight column (module doc)
    bias_input: float = 4.0  # the bias column's value in true units: the bias learns bias_input^2 x faster
    scale: float = 0.0  # fixed power-of-two weight scale s; 0 picks it from the init (fp8 only; 1 otherwise)
    kahan_labels: int = 4096  # fp8+kahan: compensation rows for the first (most frequent) labels
    chunk_budget_mb: float = 64.0  # transient memory of one chunk's step (B x Lc logits, Lc x D temporaries)
    batch_hint: int = 256  # batch size the chunk budget is sized for
    label_offset: int = 0  # a label shard's first global label: its rounding bits follow the global row ids


def padded(n: int) -> int:
    """Rows of a head over n labels: n rounded up to LABEL_ALIGN."""
    return round_up(n, LABEL_ALIGN)


def chunk_rows(num_labels: int, dim: int, batch: int, budget_mb: float) -> int:
    """Labels per chunk: a multiple of 16 such that ~4 fp32 (B x Lc) and 4 fp32 (Lc x D) temporaries fit the budget."""
    per_label = 16 * (batch + dim)
    rows = int(budget_mb * 2**20 // per_label) // LABEL_ALIGN * LABEL_ALIGN
    return max(LABEL_ALIGN, min(rows, padded(num_labels)))


def power_of_two_scale(rms: float, target: float = 1.0) -> float:
    """The power of two s that brings weights of this rms near `target` (e4m3: normals span 2^-6 .. 448)."""
    if not rms > 0 or not math.isfinite(rms):
        return 1.0
    return 2.0 ** round(math.log2(target / rms))


def chunked_topk(
    x: torch.Tensor,
    chunks: Iterable[torch.Tensor],
    k: int,
    num_labels: int,
    exclude: torch.Tensor | None = None,
    *,
    config=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores fp32 (B, k) descending, label ids int64 (B, k)) of queries x (B, D) against a head held as row
    chunks in label order, through `elmo_kernels.topk.topk_scores` one chunk at a time (the kernels' scores, tie rule).

    exclude: (P, 2) int64 (row, label) pairs never returned. A row left with fewer than k labels ends in (-inf, -1)
    entries (empty slots). config: the kernels' TopkConfig.
    """
    best = x.new_empty((x.shape[0], 0), dtype=torch.int64)
    exclude = None if exclude is None else exclude.to(x.device)
    start = 0
    for w in chunks:
        n = max(0, min(w.shape[0], num_labels - start))
        if n == 0:
            break
        ex, extra = None, 0
        if exclude is not None and len(exclude):
            ex = exclude[(exclude[:, 1] >= start) & (exclude[:, 1] < start + n)]
            extra = int(torch.bincount(ex[:, 0]).max()) if len(ex) else 0
        # k + (the row's exclusions in this chunk) candidates hold the row's best k allowed ones
        s, i = topk_scores(x, w, min(k + extra, n), n, config=config)
        keys = scores_to_keys(s, i + start)
        if extra:
            code = torch.arange(x.shape[0], device=x.device)[:, None] * num_labels + i + start
            keys.masked_fill_(torch.isin(code, ex[:, 0] * num_labels + ex[:, 1]), KEY_EMPTY)
        best = torch.cat([best, keys], 1)
        best = best.topk(min(k, best.shape[1]), dim=1).values
        start += w.shape[0]
    if best.shape[1] < k:
        best = torch.cat([best, best.new_full((best.shape[0], k - best.shape[1]), KEY_EMPTY)], 1)
    scores, ids = keys_to_scores(best)
    empty = best == KEY_EMPTY
    return scores.masked_fill(empty, -math.inf), ids.masked_fill(empty, -1)


class XMCHead(nn.Module):
    """Padded (L_pad, D_in) weights in the storage dtype of `precision`, updated in place by `step`."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        if config.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {config.precision!r}")
        self.config = config
        dtype = STORAGE_DTYPES[config.precision.split("+")[0]]
        self.in_dim = config.dim + (1 if config.bias else 0)
        self.register_buffer("weight", torch.zeros(padded(config.num_labels), self.in_dim, dtype=dtype))
        self.register_buffer("scale", torch.tensor(1.0 if config.scale <= 0 else config.scale))
        self.register_buffer("bias", torch.zeros(padded(config.num_labels) if config.bias else 0))
        kahan_rows = min(config.kahan_labels, config.num_labels) if config.precision == "fp8+kahan" else 0
        self.register_buffer("kahan", torch.zeros(kahan_rows, self.in_dim, dtype=torch.bfloat16))
        self.rows_per_chunk = chunk_rows(config.num_labels, self.in_dim, config.batch_hint, config.chunk_budget_mb)

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def chunks(self) -> list[torch.Tensor]:
        """Contiguous row views of `weight`, each a multiple of 16 rows: the kernels update them in place."""
        return list(self.weight.split(self.rows_per_chunk))

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """[x, bias_input] / scale, (B, D_in) fp32: what the stored weights multiply."""
        x = x.float()
        if self.config.bias:
            x = torch.cat([x, x.new_full((x.shape[0], 1), self.config.bias_input)], dim=1)
        return x / self.scale

    @torch.no_grad()
    def init_weights(
        self,
        label_vectors: torch.Tensor | None = None,
        label_prior: np.ndarray | None = None,
        *,
        init_std: float = 0.01,
        seed: int = 0,
    ) -> None:
        """Set W (true units) to `label_vectors` (L, D) or N(0, init_std); the bias to logit(label_prior)."""
        cfg = self.config
        if label_vectors is None:
            g = torch.Generator().manual_seed(seed)
            w = init_std * torch.randn(cfg.num_labels, cfg.dim, generator=g)
        else:
            w = label_vectors.float()
            if w.shape != (cfg.num_labels, cfg.dim):
                raise ValueError(f"label_vectors must be ({cfg.num_labels}, {cfg.dim}), got {tuple(w.shape)}")
        b = None
        if cfg.bias:
            p = np.full(cfg.num_labels, 0.5) if label_prior is None else np.clip(label_prior, 1e-6, 1 - 1e-6)
            b = torch.from_numpy(np.log(p / (1 - p))).float()
            w = torch.cat([w, (b / cfg.bias_input)[:, None]], dim=1)
        if cfg.precision.startswith("fp8") and cfg.scale <= 0:
            self.scale.fill_(power_of_two_scale(float(w.pow(2).mean().sqrt())))
        full = torch.zeros(self.weight.shape)
        full[: cfg.num_labels] = w
        self.weight.copy_(self.stored_rows(full))
        self.kahan.zero_()
        if cfg.bias:
            self.bias.zero_()
            self.bias[: cfg.num_labels] = b

    @torch.no_grad()
    def stored_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows (n, D_in) in true units (bias column = bias / bias_input) as the head stores them: times the scale s,
        rounded to nearest in the storage dtype (e4m3 saturated at +-448 first: a cast would give NaN)."""
        if rows.dim() != 2 or rows.shape[1] != self.in_dim:
            raise ValueError(f"rows must be (n, {self.in_dim}), got {tuple(rows.shape)}")
        w = rows.float() * float(self.scale)
        if self.weight.dtype == FP8_E4M3:
            w = w.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
        return w.to(self.weight.dtype)

    @property
    def _bias_unit(self) -> float:
        """True-unit value of one stored unit of the bias column: bias_input / s."""
        return self.config.bias_input / float(self.scale)

    def _master_bias(self) -> MasterBias | None:
        """The fp32 master of the bias column, as the CPU step updates it (in place)."""
        return MasterBias(self.bias, self._bias_unit) if self.config.bias else None

    @torch.no_grad()
    def _bias_from_column(self) -> None:
        self.bias.copy_(self.weight[:, -1].float() * self._bias_unit)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = self.config.bias and prefix + "bias" not in state_dict
        if old:  # a checkpoint from before the fp32 master bias: the master is the column's value
            state_dict[prefix + "bias"] = torch.zeros_like(self.bias)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if old:
            self._bias_from_column()

    def true_bias(self) -> torch.Tensor:
        """(L,) fp32 master bias in true units (the column holds it rounded to the storage dtype)."""
        return self.bias[: self.num_labels]

    def true_weight(self) -> torch.Tensor:
        """(L, D_in) fp32 weights in true units (scale removed), padding dropped."""
        return self.weight[: self.num_labels].float() / self.scale

    @torch.no_grad()
    def scores(self, x: torch.Tensor, master_bias: bool = False) -> torch.Tensor:
        """(B, L) fp32 scores (bf16 GEMMs on CPU), a label chunk at a time: for tests and small diagnostics
        (evaluation ranks through `topk`, which never holds B x L scores).

        With the stored bias column (what is exported and served), or with master_bias the fp32 master bias."""
        xin = self.head_input(x).to(torch.bfloat16 if x.device.type == "cpu" else torch.float32)
        out = []
        for w in self.chunks():
            out.append((xin @ w.to(xin.dtype).T).float())
        s = torch.cat(out, dim=1)
        if master_bias and self.config.bias:
            s += self.bias - self.weight[:, -1].float() * self._bias_unit
        return s[:, : self.num_labels]

    @torch.no_grad()
    def topk(
        self, x: torch.Tensor, k: int, exclude: torch.Tensor | None = None, master_bias: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-min(k, L) (scores fp32, label ids int64) per row of embeddings x (B, D), scored as served
        (`elmo_kernels.topk.topk_scores`, stored weights), a chunk at a time; with master_bias the fp32 master bias
        replaces the column. exclude: (P, 2) int64 (row, label) pairs never returned; a row left with too few labels
        ends in (-inf, -1) entries."""
        xin = self.head_input(x)
        chunks: Iterable[torch.Tensor] = self.chunks()
        if master_bias and self.config.bias:
            if self.weight.dtype != torch.float32:  # the queries as topk_scores rounds them for the stored weights
                xin = xin.to(torch.bfloat16).float()
            chunks = self._master_chunks()
        return chunked_topk(xin, chunks, min(k, self.num_labels), self.num_labels, exclude)

    def _master_chunks(self) -> Iterator[torch.Tensor]:
        """fp32 copies of the chunks, one at a time, with the master bias in the column (in stored units)."""
        start = 0
        for w in self.chunks():
            c = w.float()
            c[:, -1] = self.bias[start : start + len(w)] / self._bias_unit
            yield c
            start += len(w)

    @torch.no_grad()
    def step(
        self,
        x: torch.Tensor,
        positives: torch.Tensor,
        *,
        lr: float,
        weight_decay: float = 0.0,
        seed: int = 0,
        compute_loss: bool = False,
        exclude: torch.Tensor | None = None,
        impl: str = "auto",
    ) -> tuple[torch.Tensor, float | None]:
        """One SGD step on the summed BCE; returns (dL/dx (B, D) fp32, mean-over-rows loss or None).

        positives / exclude: (P, 2) int64 (row, label) pairs, on the CPU (cheapest: the kernels' path checks and
        splits them there, with no device synchronisation) or on the device of x: the targets, and the pairs that get
        no gradient. lr and weight_decay are in true units; the scale s is applied here (stored lr = lr s^2, stored
        wd = wd). impl: "kernels" (`elmo_kernels.head_step`: Triton on CUDA, its reference elsewhere; bf16 / fp8 heads),
        "cpu" (`elmo_kernels.head_step_cpu`, with the fp32 master bias), "auto" (kernels for bf16 / fp8 heads on CUDA).
        """
        if impl not in STEP_IMPLS:
            raise ValueError(f"impl must be one of {STEP_IMPLS}, got {impl!r}")
        if impl == "auto":
            impl = "kernels" if self.weight.is_cuda and self.config.precision != "fp32" else "cpu"
        if impl == "kernels" and self.config.precision == "fp32":
            raise ValueError("the kernels train bf16 / fp8 heads; an fp32 head steps with impl='cpu'")
        xin = self.head_input(x.detach())
        s = float(self.scale)
        if impl == "kernels":
            dxin, loss = self._step_kernels(xin, positives, lr * s * s, weight_decay, seed, compute_loss, exclude)
        else:
            # a label shard draws its own stream (torch's RNG cannot skip ahead to the shard's rows)
            stream = int(seed) + self.config.label_offset * 1_000_003
            gen = torch.Generator(device=xin.device).manual_seed(stream % 2**63)
            exclude = exclude.to(xin.device) if exclude is not None else None
            dxin, loss = head_step_cpu(
                self.chunks(),
                xin,
                positives.to(xin.device),
                lr=lr * s * s,
                weight_decay=weight_decay,
                generator=gen,
                num_labels=self.num_labels,
                kahan=self.kahan if len(self.kahan) else None,
                bias=self._master_bias(),
                exclude=exclude,
                compute_loss=compute_loss,
            )
        return dxin[:, : self.config.dim] / s, loss

    def _step_kernels(self, xin, positives, lr, wd, seed, compute_loss, exclude):
        """`elmo_kernels.head_step` over MAX_BATCH rows at a time; the kernels train the bias column (module doc)."""
        dx, loss, rows = [], 0.0, xin.shape[0]
        kahan = self.kahan if len(self.kahan) else None
        for i, start in enumerate(range(0, rows, MAX_BATCH)):
            stop = start + MAX_BATCH
            cfg = HeadStepConfig(lr=lr, weight_decay=wd, seed=(seed * 7919 + i) % 2**62, compute_loss=compute_loss)
            pos = pairs_in_rows(positives, start, stop)
            excluded = {}
            if exclude is not None and len(exclude):
                ex = pairs_in_rows(exclude, start, stop)
                excluded = {"exclude_rows": ex[:, 0], "exclude_cols": ex[:, 1]}
            out = head_step(
                self.chunks(),
                xin[start:stop].to(torch.bfloat16),
                pos[:, 0],
                pos[:, 1],
                cfg,
                num_labels=self.num_labels,
                kahan=kahan,
                label_offset=self.config.label_offset,
                **excluded,
            )
            dx.append(out.dx)
            loss += (out.loss or 0.0) * out.dx.shape[0]
        if self.config.bias:
            self._bias_from_column()
        return torch.cat(dx), loss / rows if compute_loss else None

    def extra_repr(self) -> str:
        c = self.config
        return f"labels={c.num_labels}, in_dim={self.in_dim}, precision={c.precision}, chunk={self.rows_per_chunk}"


class XMCModel(nn.Module):
    """Encoder + head, plus the featurizer (hashed encoder on texts) and the head-row -> label-id order."""

    def __init__(
        self,
        encoder: nn.Module,
        head: XMCHead,
        featurizer=None,
        label_order: np.ndarray | None = None,
        frozen=None,
    ):
        super().__init__()
        self.encoder, self.head, self.featurizer = encoder, head, featurizer
        self.frozen = frozen  # optional FrozenTextEmbedder (a FusedEncoder's second input); not a submodule
        order = np.arange(head.num_labels) if label_order is None else np.asarray(label_order, dtype=np.int64)
        self.register_buffer("label_order", torch.from_numpy(order))  # head row j is dataset label label_order[j]

    def encoder_inputs(self, texts=None, features=None) -> tuple:
        """Positional inputs of the encoder for texts (featurized or tokenized) or a ready features CSR."""
        from training.encoders import FusedFeatures, HFTextEncoder, HybridFeatures, bag_inputs

        if isinstance(self.encoder, HFTextEncoder):
            enc = self.encoder.tokenize(texts)
            return enc["input_ids"], enc["attention_mask"]
        if features is None:
            features = self.featurize(texts)
        if isinstance(features, HybridFeatures):
            return features.inputs(self.encoder.hf)
        if isinstance(features, FusedFeatures):
            return features.inputs()
        return bag_inputs(features)

    def featurize(self, texts):
        """Texts -> the features `encoder_inputs` takes: the featurizer's CSR (with the frozen embeddings, if any, or
        with the texts for a transformer combined with the bag)."""
        from training.encoders import FusedFeatures, HybridEncoder, HybridFeatures

        if self.featurizer is None:
            raise ValueError("this model has no featurizer: pass features")
        bag = self.featurizer.transform(texts)
        if isinstance(self.encoder, HybridEncoder):
            return HybridFeatures(bag, list(texts))
        return bag if self.frozen is None else FusedFeatures(bag, self.frozen(texts))

    def embed(self, *inputs) -> torch.Tensor:
        dev = self.head.weight.device
        return self.encoder(*(t.to(dev) for t in inputs)).float()
