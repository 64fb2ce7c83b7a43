"""How far below the map's intercept the re-set rows of labels with no training point sit, chosen on a held-out
slice of the training rows (issue 20).

With `zero_shot_unseen`, the rows of labels that no training point has are re-set at the end of training to the
title map's rows (`training.zero_shot.reset_unseen`). The map's intercept is shifted to the trained labels' biases,
weighted by their training points; on DebianDeps the rows want to sit about one logit below that, and no statistic
of the training split lands there (BENCHMARKS.md, labels without training points). So it is measured:

1. `holdout_split`: a seeded `fraction` of the training rows is held out;
2. a nested run (`training.train.choose_unseen_offset`) trains the same config on the rest, with the held-out rows
   as its test split. Labels with no point in the rest play the unseen ones: those whose points all fell in the
   held-out slice have positives there;
3. `sweep_offsets`, at its end: the title map fitted as the re-set fits it, then for each offset of OFFSETS the
   unseen rows re-set with it and the held-out rows ranked (filter pairs removed, as evaluation does). The offset
   with the best held-out P@1 (then P@5) is the run's: "more recall of unseen labels without losing P@1".
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from training import data as xd
from training.config import TrainConfig
from training.evaluation import ranked_batches
from training.metrics import XMCMetrics
from training.model import XMCModel
from training.zero_shot import set_unseen, unseen_source

OFFSETS = tuple(-0.25 * i for i in range(13))  # logits, 0 (the map's own intercept) down to -3
HOLDOUT_SEED = 7919  # added to the run's seed: the split's own stream


def holdout_split(ds: xd.XMCDataset, fraction: float, seed: int) -> tuple[xd.XMCDataset, xd.XMCDataset]:
    """(rest, held out): a seeded `fraction` of the rows held out (at least one row each side), both in row order."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    if ds.num_rows < 2:
        raise ValueError("a holdout split needs at least 2 training rows")
    perm = np.random.default_rng(seed + HOLDOUT_SEED).permutation(ds.num_rows)
    held = min(ds.num_rows - 1, max(1, round(fraction * ds.num_rows)))
    return ds.subset(np.sort(perm[held:])), ds.subset(np.sort(perm[:held]))


def target_pairs(labels: sp.spmatrix, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, labels) of the (row, label) pairs of `labels` (rows x L) whose label is a target (bool per label)."""
    coo = sp.coo_matrix(labels)
    keep = targets[coo.col]
    return coo.row[keep], coo.col[keep]


def unseen_recall(ids: torch.Tensor, labels: sp.spmatrix, unseen: np.ndarray) -> tuple[int, int]:
    """(found, total): the (row, label) pairs of `labels` (rows x L) with an `unseen` label (bool per label), and
    how many of them are among the row's ranked `ids` (rows, k)."""
    rows, cols = target_pairs(labels, unseen)
    found = (np.asarray(ids)[rows] == cols[:, None]).any(1).sum() if len(rows) else 0
    return int(found), int(len(rows))


def sweep_offsets(
    model: XMCModel,
    fit_ds: xd.XMCDataset,
    held_ds: xd.XMCDataset,
    held_feats,
    cfg: TrainConfig,
    offsets: tuple[float, ...] = OFFSETS,
) -> dict:
    """The offset for `model` trained on `fit_ds` (head order), measured on `held_ds` (module doc): {"offset",
    "curve": [{"offset", "P@1", "P@5", "unseen_R@5"}], "unseen_labels", "unseen_pairs", "held_rows"}. Leaves the
    unseen rows re-set with the last offset of `offsets`."""
    counts = fit_ds.label_counts()
    cal, title_map = unseen_source(
        model,
        fit_ds.label_titles,
        counts,
        gain=cfg.label_init_gain,
        num_rows=fit_ds.num_rows,
        labels=fit_ds.labels,
        texts=fit_ds.texts,
        exclude=fit_ds.filters,
    )
    unseen = counts == 0
    model.eval()
    curve = []
    for offset in offsets:
        set_unseen(model, fit_ds.label_titles, counts, cal, title_map, offset)
        metrics = XMCMetrics()
        found = total = 0
        for rows, ids in ranked_batches(model, held_ds, held_feats, k=5):
            metrics.update(ids, held_ds.labels[rows])
            f, t = unseen_recall(ids, held_ds.labels[rows], unseen)
            found, total = found + f, total + t
        m = {k: 100 * v for k, v in metrics.compute().items()}
        curve.append({"offset": offset, "P@1": m["P@1"], "P@5": m["P@5"], "unseen_R@5": 100 * found / max(1, total)})
    model.train()
    best = max(curve, key=lambda c: (round(c["P@1"], 6), round(c["P@5"], 6), c["offset"]))
    return {
        "offset": best["offset"],
        "curve": curve,
        "unseen_labels": int(unseen.sum()),
        "unseen_pairs": total,
        "held_rows": held_ds.num_rows,
    }
