"""The low-precision classification head over the fused ELMO step, and the model (encoder + head) around it.

The head stores one padded weight matrix W (L_pad x D_in) in fp32, bf16 or float8_e4m3fn, split into label chunks
whose size comes from a memory budget. Its input is `head_input(x)` = [x / s, c / s]: the encoder output divided by
a fixed power-of-two scale s (so that W_stored = s W sits in e4m3's normal range), plus an optional constant bias
column (then the last column of W is a per-label bias). Scores are head_input(x) @ W_stored^T, i.e. exactly
x @ W^T + b in true units: what the artifact stores and serving computes.

The bias's master copy is a separate (L_pad,) fp32 vector `bias` (true units), for every precision (so the recipe
is the same across heads); the column is its mirror in the storage dtype. An e4m3 column alone resolves a bias near
-10 only to about +-0.6 logits, and stochastic rounding of its small updates added noise that cost ~0.4 P@1:
- CPU / torch path: the training logits use the fp32 master; its SGD update (the one the column would get: lr c^2
  times the batch-summed gradient in true units) is applied in fp32, then the column is set to the master rounded
  to nearest. Evaluation (`scores`) uses the column, i.e. measures what is exported and served;
  `scores(x, master_bias=True)` uses the master instead.
- CUDA kernels (bf16 / fp8): `kernels.head_step` has no bias input, and a separate bias gradient (the logits'
  column sums) is not affordable at millions of labels outside the fused kernel, so there the kernels train the
  column as before (stochastic rounding) and the master is re-read from the column after each step.
- Export: the artifact has only the column, which already mirrors the master: unchanged format.

Training is plain SGD on the summed BCE over all labels (the kernels' convention: lr multiplies the gradient summed
over the batch rows), with the weight gradient fused into the update and rounded stochastically for bf16 / fp8:
- CUDA: `kernels.head_step.head_step` (Triton), B <= 256 rows per call (larger batches go as several calls);
- CPU: the same mathematics chunk by chunk in torch with bf16 GEMMs and torch's RNG for the rounding bits (the
  kernels' plain-torch reference draws Philox bits in numpy, ~2 s a step at 42K labels; this path is ~10x faster);
- fp32: plain torch SGD, the comparison row (fp32 weights, the same GEMM precision).
Excluded pairs (a row's own label, from the training filter file) get zero gradient on the torch paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kernels import reference
from kernels.head_step import LABEL_ALIGN, HeadStepConfig, head_step

PRECISIONS = ("fp32", "bf16", "fp8", "fp8+kahan")
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
E4M3_MAX = 448.0


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
    return -(-n // LABEL_ALIGN) * LABEL_ALIGN


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


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """fp32 x -> dtype (bf16 / e4m3) with unbiased stochastic rounding, the kernels' rounding rule with 16 random
    bits per element drawn from `gen` (torch's RNG: much faster on CPU than the Philox stream of the reference)."""
    if dtype not in (torch.bfloat16, torch.float8_e4m3fn):
        return x.to(dtype)
    rand16 = torch.randint(0, 1 << 16, x.shape, generator=gen, dtype=torch.int32, device=x.device)
    return reference.round_to(x, dtype, rand16).to(dtype)


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
        full[: cfg.num_labels] = w * self.scale
        self.weight.copy_(full.clamp(-E4M3_MAX, E4M3_MAX) if self.weight.dtype == torch.float8_e4m3fn else full)
        self.kahan.zero_()
        if cfg.bias:
            self.bias.zero_()
            self.bias[: cfg.num_labels] = b

    @property
    def _bias_unit(self) -> float:
        """True-unit value of one stored unit of the bias column: bias_input / s."""
        return self.config.bias_input / float(self.scale)

    def _column_of(self, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """fp32 true-unit biases -> the stored column, rounded to nearest (saturating for e4m3)."""
        col = bias / self._bias_unit
        return (col.clamp(-E4M3_MAX, E4M3_MAX) if dtype == torch.float8_e4m3fn else col).to(dtype)

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
        """(B, L) fp32 scores, a label chunk at a time (evaluation; serving uses the top-k kernel).

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
        """Top-k (scores, label ids) per row; exclude: (P, 2) (row, label) pairs removed before ranking."""
        s = self.scores(x, master_bias=master_bias)
        if exclude is not None and len(exclude):
            s[exclude[:, 0], exclude[:, 1]] = -torch.inf
        return s.topk(min(k, self.num_labels), dim=1)

    @torch.no_grad()
    def step(
        self,
        x: torch.Tensor,
        pos_rows: torch.Tensor,
        pos_cols: torch.Tensor,
        *,
        lr: float,
        weight_decay: float = 0.0,
        seed: int = 0,
        compute_loss: bool = False,
        exclude: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, float | None]:
        """One SGD step on the summed BCE; returns (dL/dx (B, D) fp32, mean-over-rows loss or None).

        lr and weight_decay are in true units; the scale s is applied here (stored lr = lr s^2, stored wd = wd).
        """
        xin = self.head_input(x.detach())
        s = float(self.scale)
        if self.weight.is_cuda and self.config.precision != "fp32":
            dxin, loss = self._step_kernels(
                xin, pos_rows, pos_cols, lr * s * s, weight_decay, seed, compute_loss, exclude
            )
        else:
            dxin, loss = self._step_torch(
                xin, pos_rows, pos_cols, lr * s * s, weight_decay, seed, compute_loss, exclude
            )
        return dxin[:, : self.config.dim] / s, loss

    def _step_kernels(self, xin, pos_rows, pos_cols, lr, wd, seed, compute_loss, exclude=None):
        dx, loss, rows = [], 0.0, xin.shape[0]
        kahan = self.kahan if len(self.kahan) else None
        for i, start in enumerate(range(0, rows, 256)):
            sel = (pos_rows >= start) & (pos_rows < start + 256)
            cfg = HeadStepConfig(lr=lr, weight_decay=wd, seed=(seed * 7919 + i) % 2**62, compute_loss=compute_loss)
            excluded = {}
            if exclude is not None and len(exclude):
                e = (exclude[:, 0] >= start) & (exclude[:, 0] < start + 256)
                excluded = {"exclude_rows": exclude[e, 0] - start, "exclude_cols": exclude[e, 1]}
            out = head_step(
                self.chunks(),
                xin[start : start + 256].to(torch.bfloat16),
                pos_rows[sel] - start,
                pos_cols[sel],
                cfg,
                num_labels=self.num_labels,
                kahan=kahan,
                label_offset=self.config.label_offset,
                **excluded,
            )
            dx.append(out.dx)
            loss += (out.loss or 0.0) * out.dx.shape[0]
        if self.config.bias:
            self._bias_from_column()  # the kernels trained the column (module doc)
        return torch.cat(dx), loss / rows if compute_loss else None

    def _step_torch(self, xin, pos_rows, pos_cols, lr, wd, seed, compute_loss, exclude):
        fp32 = self.weight.dtype == torch.float32
        gemm = torch.bfloat16 if xin.device.type == "cpu" else torch.float32
        xq = xin.to(gemm)
        # a label shard draws its own stream (torch's RNG cannot skip ahead to the shard's rows)
        stream = int(seed) + self.config.label_offset * 1_000_003
        gen = torch.Generator(device=xin.device).manual_seed(stream % 2**63)
        dx = torch.zeros_like(xin)
        loss = 0.0
        start = 0
        bias = self.config.bias
        unit = self._bias_unit
        # the column's SGD step in true units: lr_stored unit^2 times the batch-summed gradient; its decay
        # multiplies by 1 - lr_stored wd. The fp32 master gets the same, so the recipe does not change.
        bias_lr = lr * unit * unit
        for w in self.chunks():
            n = w.shape[0]
            valid = max(0, min(n, self.num_labels - start))
            if valid == 0:
                break
            wv = w[:valid]
            wf = wv.float()
            wg = wv if wv.dtype == gemm else wf.to(gemm)
            z = (xq @ wg.T).float()
            if bias:
                bv = self.bias[start : start + valid]
                z += bv - wf[:, -1] * unit  # the master replaces the column's rounded value
            y = torch.zeros_like(z)
            sel = (pos_cols >= start) & (pos_cols < start + valid)
            y[pos_rows[sel], pos_cols[sel] - start] = 1.0
            g = torch.sigmoid(z) - y
            if exclude is not None and len(exclude):
                e = (exclude[:, 1] >= start) & (exclude[:, 1] < start + valid)
                g[exclude[e, 0], exclude[e, 1] - start] = 0.0
            if compute_loss:
                loss += float(nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum"))
            gq = g.to(gemm)
            dx += (gq @ wg).float()
            delta = (gq.T @ xq).float()
            if wd:
                delta.add_(wf, alpha=wd)
            delta.mul_(-lr)
            if bias:
                delta[:, -1] = 0.0
                if wd:
                    bv.mul_(1.0 - lr * wd)
                bv.add_(g.sum(0), alpha=-bias_lr)  # in place: a view of self.bias
            if fp32:
                wv.add_(delta)
            else:
                self._apply_update(wv, wf, delta, start, gen)
            if bias:
                wv[:, -1] = self._column_of(bv, wv.dtype)
            start += n
        return dx, loss / xin.shape[0] if compute_loss else None

    def _apply_update(self, wv, wf, delta, start, gen):
        h = max(0, min(len(self.kahan) - start, wv.shape[0]))
        if h:
            comp = self.kahan[start : start + h].float()
            delta[:h] -= comp
        new = stochastic_round(wf + delta, wv.dtype, gen)
        if h:
            lost = (new[:h].float() - wf[:h]) - delta[:h]
            self.kahan[start : start + h] = lost.to(torch.bfloat16)
        wv.copy_(new)

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
        from training.encoders import FusedFeatures, HFTextEncoder, bag_inputs

        if isinstance(self.encoder, HFTextEncoder):
            enc = self.encoder.tokenize(texts)
            return enc["input_ids"], enc["attention_mask"]
        if features is None:
            features = self.featurize(texts)
        if isinstance(features, FusedFeatures):
            return features.inputs()
        return bag_inputs(features)

    def featurize(self, texts):
        """Texts -> the features `encoder_inputs` takes: the featurizer's CSR (with the frozen embeddings, if any)."""
        from training.encoders import FusedFeatures

        if self.featurizer is None:
            raise ValueError("this model has no featurizer: pass features")
        bag = self.featurizer.transform(texts)
        return bag if self.frozen is None else FusedFeatures(bag, self.frozen(texts))

    def embed(self, *inputs) -> torch.Tensor:
        dev = self.head.weight.device
        return self.encoder(*(t.to(dev) for t in inputs)).float()
