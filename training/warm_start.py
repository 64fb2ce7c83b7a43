"""Warm start (TrainConfig.init_from): a run that starts from an artifact instead of from scratch.

The run keeps the artifact's encoder (its trained weights, its featurizer as fitted: the n-gram buckets must mean
what they meant) and, for each label of the new data whose uid the artifact holds, that label's head row and bias
(true units: the artifact's stored row / its scale, so a bf16 artifact can start an fp8 run and back). A label the
artifact lacks starts as in a fresh run: its title's zero-shot vector at the artifact's calibrated gain (what the
service answers for a label added live), or random without label_init; its bias is the frequency prior of the new
data. A live catalogue is folded into the artifact first (`elmo train --init-catalogue LOG`, `elmo_serve.fold`), so
the labels added through the API become trained labels.

The fields that define the encoder are the artifact's (`adopt`): a run sets them to other values only by mistake, so
that is an error naming the field; the optimizer state starts fresh (an artifact holds none), with the run's warmup.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from training import data as xd
from training.artifact import Artifact, read_manifest
from training.config import TrainConfig
from training.encoders import HashedBagEncoder, HFTextEncoder, HybridEncoder
from training.model import XMCModel
from training.zero_shot import title_embeddings, title_vectors

# What the encoder is: taken from the artifact's training config (its "training" record).
ENCODER_FIELDS = (
    "format",
    "encoder",
    "hf_bag",
    "dim",
    "char_ngrams",
    "min_df",
    "mlp_hidden",
    "hf_max_length",
    "frozen_max_length",
)
# Paths to pretrained models: the artifact's own copies (encoder/, frozen/) replace them.
PATH_FIELDS = ("hf_path", "frozen_encoder")


def adopt(cfg: TrainConfig, user_set: set[str]) -> TrainConfig:
    """cfg with the encoder-defining fields of the artifact cfg.init_from, which the recipe then leaves alone.

    user_set: the fields the user gave (`training.recipe.user_set`); one of them with another value than the
    artifact's is a ValueError naming both."""
    path = Path(cfg.init_from)
    manifest = load_manifest(path)
    saved = manifest.get("training") or {}
    missing = [k for k in ENCODER_FIELDS if k not in saved]
    if missing:
        raise ValueError(f"--init-from {path}: its manifest records no training config ({', '.join(missing)} missing)")
    values = {k: saved[k] for k in ENCODER_FIELDS}
    enc = manifest.get("encoder", {})
    values["hf_path"] = str(path / "encoder") if enc.get("kind") == "hf" else ""
    values["frozen_encoder"] = str(path / "frozen") if enc.get("frozen") else ""
    for key in ENCODER_FIELDS:
        if key in user_set and getattr(cfg, key) != values[key]:
            flag = "--" + key.replace("_", "-")
            raise ValueError(
                f"--init-from {path}: {flag} {getattr(cfg, key)!r} conflicts with the artifact's {values[key]!r} "
                f"(a warm start keeps the artifact's encoder); leave {flag} out"
            )
    for key in PATH_FIELDS:
        if key in user_set and getattr(cfg, key) not in ("", saved.get(key), values[key]):
            raise ValueError(
                f"--init-from {path}: --{key.replace('_', '-')} {getattr(cfg, key)!r} is not the artifact's model "
                f"(a warm start uses its copy, {values[key] or 'none'}); leave it out"
            )
    keep = sorted(set(filter(None, cfg.recipe_keep.split(","))) | set(ENCODER_FIELDS) | set(PATH_FIELDS))
    return replace(cfg, **values, recipe_keep=",".join(keep)).validate()


def load_manifest(path: Path) -> dict:
    """The manifest of the artifact at `path`, read the way `load_artifact` reads it (errors name the problem)."""
    if not path.is_dir():
        raise ValueError(f"--init-from {path}: not an artifact directory")
    return read_manifest(path)


def source_encoder(cfg: TrainConfig, source: Artifact, train_ds: xd.XMCDataset):
    """(encoder, featurizer, frozen) of the artifact, ready to train: sparse table gradients (SparseAdam), training
    mode, cfg's transformer options; ValueError when the data cannot be read by it."""
    from training.build import device_of, fp8_linears, hf_options

    model = source.model
    encoder, featurizer = model.encoder, model.featurizer
    if train_ds.features is not None:
        if featurizer is not None or train_ds.features.shape[1] != _table_rows(encoder):
            want = "texts" if featurizer is not None else f"{_table_rows(encoder)} features"
            got = f"{train_ds.features.shape[1]} features"
            raise ValueError(f"--init-from {source.path}: its encoder reads {want}; the data has {got}")
    elif featurizer is None and not isinstance(encoder, HFTextEncoder):
        raise ValueError(f"--init-from {source.path}: its encoder reads feature vectors; the data has texts")
    for bag in (m for m in encoder.modules() if isinstance(m, HashedBagEncoder)):  # as a fresh run builds them
        bag.config = replace(bag.config, sparse=True)
        bag.bag.sparse = True
    hf = encoder.hf if isinstance(encoder, HybridEncoder) else encoder
    if isinstance(hf, HFTextEncoder):
        hf_options(cfg, hf)
        if cfg.fp8_encoder:
            fp8_linears(hf, device_of(cfg))
    encoder.train()
    return encoder, featurizer, model.frozen


def _table_rows(encoder: torch.nn.Module) -> int:
    bags = [m for m in encoder.modules() if isinstance(m, torch.nn.EmbeddingBag)]
    return bags[0].num_embeddings if bags else -1


@torch.no_grad()
def source_rows(
    cfg: TrainConfig, source: Artifact, model: XMCModel, train_ds: xd.XMCDataset, prior: np.ndarray
) -> tuple[torch.Tensor, np.ndarray, dict]:
    """(vectors (L, dim) true units, prior (L,), record) for `model`'s head in its label order: the artifact's row
    and sigmoid(bias) for each label whose uid it holds, else a fresh run's (see the module docstring); record says
    what was done: {init_from, version, carried, from_titles, random, left_out}."""
    uids = label_uids(train_ds, model.label_order.cpu().numpy())
    index = {str(lb["uid"]): lb["id"] for lb in source.labels}
    head, dim = source.model.head, model.head.config.dim
    carried = np.array([index.get(u, -1) for u in uids])
    have = np.flatnonzero(carried >= 0)
    true = head.true_weight()[torch.as_tensor(carried[have])]
    g = torch.Generator().manual_seed(cfg.seed)
    vectors = 0.01 * torch.randn(len(uids), dim, generator=g)  # XMCHead.init_weights' random init
    vectors[torch.as_tensor(have)] = true[:, :dim]
    prior = prior.copy()
    if head.config.bias:
        bias = true[:, dim].double().numpy() * head.config.bias_input
        prior[have] = 1 / (1 + np.exp(-bias))
    fresh = np.flatnonzero(carried < 0)
    titled = fresh[[bool(train_ds.label_titles[j]) for j in fresh]] if train_ds.label_titles and cfg.label_init else []
    if len(titled):
        titles = [train_ds.label_titles[j] for j in titled]
        model.eval()  # as the service embeds a title (no dropout)
        try:
            embeddings = title_embeddings(model, titles)
        finally:
            model.train()
        vectors[torch.as_tensor(titled)] = title_vectors(embeddings, source.zero_shot.gain)
    record = {
        "init_from": str(source.path),
        "version": source.version,
        "carried": len(have),
        "from_titles": len(titled),
        "random": len(fresh) - len(titled),
        "left_out": len(index) - len(have),  # the artifact's labels the data does not have
    }
    return vectors, prior, record


def label_uids(ds: xd.XMCDataset, order: np.ndarray) -> list[str]:
    """The uid of each label of `ds` (in its head order; `order[j]` is label j's index in the data as read), as the
    artifact writes them: the data's uids, else the index as read."""
    if ds.label_uids is not None:
        return [str(u) for u in ds.label_uids]
    return [str(int(i)) for i in order]
