"""Evaluation of a model on a split: P@k, nDCG@k, PSP@k with the split's filter pairs removed before ranking."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from training import data as xd
from training.build import encoder_inputs, featurize, load_data
from training.config import TrainConfig
from training.metrics import XMCMetrics, jain_propensity
from training.model import XMCModel


def filter_pairs(filtered: sp.coo_matrix | None) -> torch.Tensor | None:
    """A batch's filter pairs (COO over its rows) as the (P, 2) (row, label) tensor `XMCHead.topk` excludes."""
    if filtered is None:
        return None
    return torch.from_numpy(np.stack([filtered.row, filtered.col], 1).astype(np.int64))


def propensity_of(train_ds: xd.XMCDataset, cfg: TrainConfig) -> np.ndarray:
    """Jain et al.'s label propensities from the training split's label counts (the PSP@k weights)."""
    return jain_propensity(train_ds.label_counts(), train_ds.num_rows, cfg.psp_a, cfg.psp_b)


@torch.no_grad()
def ranked_batches(
    model: XMCModel, ds: xd.XMCDataset, feats, k: int, batch: int = 1024
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield (rows, top-k label ids (B, k) on the CPU) over a split, its filter pairs removed as in evaluation."""
    filt = ds.filter_matrix() if len(ds.filters) else None
    for start in range(0, ds.num_rows, batch):
        rows = np.arange(start, min(start + batch, ds.num_rows))
        x = model.embed(*encoder_inputs(model, ds, feats, rows))
        excl = filter_pairs(filt[rows].tocoo()) if filt is not None else None
        yield rows, model.head.topk(x, k, exclude=excl)[1].cpu()


# rank(x, filtered) -> (B, 5) label ids: x the batch's embeddings, filtered its (row, label) filter pairs (COO)
RankFn = Callable[[torch.Tensor, sp.coo_matrix | None], torch.Tensor]


@torch.no_grad()
def evaluate_model(
    model: XMCModel,
    ds: xd.XMCDataset,
    feats,
    propensity: np.ndarray | None,
    batch: int = 1024,
    master_bias: bool = False,
    rank: RankFn | None = None,
) -> dict[str, float]:
    """P@k, nDCG@k, PSP@k (k = 1, 3, 5) with the split's filter pairs removed before ranking; values in %.

    Scores use the head's stored bias column (what is exported and served), or with master_bias its fp32 master.
    `rank` replaces the head's own top-5 (a label-sharded head merges its shards' lists)."""

    def own_top5(x: torch.Tensor, filtered: sp.coo_matrix | None) -> torch.Tensor:
        return model.head.topk(x, 5, exclude=filter_pairs(filtered), master_bias=master_bias)[1]

    rank = rank or own_top5
    model.eval()
    metrics = XMCMetrics(propensity=propensity)
    filt = ds.filter_matrix() if len(ds.filters) else None
    for start in range(0, ds.num_rows, batch):
        rows = np.arange(start, min(start + batch, ds.num_rows))
        x = model.embed(*encoder_inputs(model, ds, feats, rows))
        ids = rank(x, filt[rows].tocoo() if filt is not None else None)
        metrics.update(ids.cpu(), ds.labels[rows])
    model.train()
    return {k: 100 * v for k, v in metrics.compute().items()}


def evaluate_on(model: XMCModel, cfg: TrainConfig, split: str = "tst") -> dict[str, float]:
    """Metrics of a loaded model on the `split` of cfg.data, labels mapped through the model's label order."""
    train_ds, test_ds = load_data(cfg)
    ds = test_ds if split == "tst" else train_ds
    order = model.label_order.cpu().numpy()
    train_ds, ds = xd.permute_labels(train_ds, order), xd.permute_labels(ds, order)
    return evaluate_model(model, ds, featurize(model, ds), propensity_of(train_ds, cfg))
