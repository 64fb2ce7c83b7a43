"""PNG plots of a run: the training curve and P@k by label-frequency decile (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.evaluation import ranked_batches


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curve(history: list[dict], path: str | Path) -> Path:
    """Sampled training loss by step (left axis) and test P@1 / P@5 by step (right axis)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if losses:
        ax.plot(*zip(*losses, strict=True), color="tab:blue", label="sampled loss")
    ax.set_xlabel("step")
    ax.set_ylabel("BCE (summed over labels, mean over rows)")
    evals = [h for h in history if "P@1" in h]
    if evals:
        ax2 = ax.twinx()
        for key, color in (("P@1", "tab:red"), ("P@5", "tab:orange")):
            ax2.plot([h["step"] for h in evals], [h[key] for h in evals], "o-", color=color, label=key)
        ax2.set_ylabel("test %")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("training curve")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def precision_by_decile(model, test_ds, test_feats, train_counts: np.ndarray, path: str | Path, k: int = 5) -> Path:
    """Share of the top-k hits that fall in each decile of labels sorted by training frequency (rarest decile first),
    next to the share of the true test labels in that decile."""
    plt = _pyplot()
    num_labels = len(train_counts)
    order = np.argsort(train_counts, kind="stable")
    decile = np.empty(num_labels, dtype=np.int64)
    decile[order] = np.arange(num_labels) * 10 // num_labels
    hits = np.zeros(10)
    for rows, ids in ranked_batches(model, test_ds, test_feats, k):
        ids = ids.numpy()
        true = test_ds.labels[rows]
        for r in range(len(rows)):
            t = true.indices[true.indptr[r] : true.indptr[r + 1]]
            for label in ids[r][np.isin(ids[r], t)]:
                hits[decile[label]] += 1
    truth = np.bincount(decile[test_ds.labels.indices], minlength=10)
    denom = test_ds.num_rows * k
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = np.arange(10)
    ax.bar(xs - 0.2, 100 * hits / denom, width=0.4, label=f"P@{k} contribution")
    ax.bar(
        xs + 0.2,
        100 * truth / max(1, truth.sum()) * hits.sum() / denom,
        width=0.4,
        alpha=0.5,
        label="true labels (scaled)",
    )
    ax.set_xticks(xs, [f"{10 * i}-{10 * i + 10}%" for i in xs], rotation=45)
    ax.set_xlabel("label-frequency decile (rarest first)")
    ax.set_ylabel(f"P@{k} points")
    ax.set_title(f"P@{k} by label-frequency decile (sum = P@{k} = {100 * hits.sum() / denom:.1f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
