"""Building a run: its data, the model (encoder + head) and the encoder's optimizers, from a `TrainConfig`.

Every worker of a label-sharded run builds the same model from the seed; the single-process trainer, the sharded
workers, `elmo eval` and `elmo export` all build it here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optimi
import scipy.sparse as sp
import torch

from elmo_kernels.common import has_fp8_tensor_cores
from training import data as xd
from training.artifact import load_artifact
from training.config import TrainConfig
from training.encoders import (
    FrozenTextEmbedder,
    FusedEncoder,
    HashedBagConfig,
    HashedBagEncoder,
    HashedNgramFeaturizer,
    HFTextEncoder,
    HybridEncoder,
    resolve_pretrained,
)
from training.model import HeadConfig, XMCHead, XMCModel
from training.zero_shot import frequency_prior, title_embeddings, title_vectors


def load_data(cfg: TrainConfig) -> tuple[xd.XMCDataset, xd.XMCDataset]:
    """(train, test) splits of cfg.data (the embedded default when empty), cut to cfg.train_rows / cfg.test_rows."""
    if not cfg.data:
        from training.embedded import build_embedded

        train_ds, test_ds = build_embedded(seed=cfg.seed)
    elif cfg.format == "lf":
        train_ds, test_ds = xd.read_lf(cfg.data, "trn"), xd.read_lf(cfg.data, "tst")
    elif cfg.format == "bow":
        train_ds, test_ds = xd.read_bow(Path(cfg.data) / "train.txt"), xd.read_bow(Path(cfg.data) / "test.txt")
    else:
        raise ValueError(f"format must be 'lf' or 'bow', got {cfg.format!r}")
    if cfg.train_rows:
        train_ds = train_ds.subset(np.arange(min(cfg.train_rows, train_ds.num_rows)))
    if cfg.test_rows:
        test_ds = test_ds.subset(np.arange(min(cfg.test_rows, test_ds.num_rows)))
    return train_ds, test_ds


def device_of(cfg: TrainConfig) -> torch.device:
    """The device of a single-process run: cfg.device, "auto" meaning CUDA where there is one."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def head_config(cfg: TrainConfig, num_labels: int, dim: int) -> HeadConfig:
    """The head of a run: its precision, bias, Kahan rows and chunking come from the training config."""
    return HeadConfig(
        num_labels=num_labels,
        dim=dim,
        precision=cfg.precision,
        bias=cfg.bias,
        kahan_labels=cfg.kahan_labels,
        chunk_budget_mb=cfg.chunk_budget_mb,
        batch_hint=cfg.batch_size,
    )


def build_model(
    cfg: TrainConfig, train_ds: xd.XMCDataset, order: np.ndarray, warm_record: dict | None = None
) -> XMCModel:
    """Encoder + head for this data, with label-feature init and the frequency prior for the bias; with
    cfg.init_from, the artifact's encoder and the head rows of its labels (`training.warm_start`), what was carried
    over written into `warm_record` when given."""
    torch.manual_seed(cfg.seed)
    source = None
    if cfg.init_from:
        from training.warm_start import source_encoder, source_rows

        source = load_artifact(cfg.init_from)
        encoder, featurizer, frozen = source_encoder(cfg, source, train_ds)
    else:
        encoder, featurizer, frozen = new_encoder(cfg, train_ds)
    head = XMCHead(head_config(cfg, train_ds.num_labels, encoder.dim))
    model = XMCModel(encoder, head, featurizer, order, frozen=frozen)
    prior = frequency_prior(train_ds.label_counts(), train_ds.num_rows)
    if source is not None:
        vectors, prior, record = source_rows(cfg, source, model, train_ds, prior)
        if warm_record is not None:
            warm_record.update(record)
    elif cfg.label_init and train_ds.label_titles is not None:  # the zero-shot vectors of the titles
        vectors = title_vectors(title_embeddings(model, train_ds.label_titles), cfg.label_init_gain)
    else:
        vectors = None
    model.head.init_weights(vectors, prior, seed=cfg.seed)
    return model


def new_encoder(
    cfg: TrainConfig, train_ds: xd.XMCDataset
) -> tuple[torch.nn.Module, HashedNgramFeaturizer | None, FrozenTextEmbedder | None]:
    """(encoder, featurizer, frozen embedder) of a fresh run, the featurizer fitted on the training texts."""
    featurizer = None
    if cfg.encoder == "hf":
        encoder = hf_encoder(cfg)
        if cfg.fp8_encoder:  # training only: a checkpoint's encoder is rebuilt without (`encoder_for_state`)
            fp8_linears(encoder, device_of(cfg))
        if cfg.hf_bag != "off":
            featurizer = fit_featurizer(cfg, train_ds)
            dim = encoder.dim if cfg.hf_bag == "sum" else cfg.dim
            bag = text_bag(cfg, featurizer.num_features, dim, sparse=True)
            encoder = HybridEncoder(encoder, bag, cfg.hf_bag)
    elif train_ds.features is not None:
        encoder = HashedBagEncoder(HashedBagConfig(num_features=train_ds.features.shape[1], dim=cfg.dim, sparse=True))
    else:
        featurizer = fit_featurizer(cfg, train_ds)
        encoder = text_bag(cfg, featurizer.num_features, cfg.dim, sparse=True)
    frozen = None
    if cfg.frozen_encoder:
        if featurizer is None or cfg.encoder != "hashed":
            raise ValueError("frozen_encoder needs texts and the hashed encoder (encoder='hashed', LF data)")
        frozen = frozen_embedder(cfg)
        encoder = FusedEncoder(encoder, frozen.dim)
    return encoder, featurizer, frozen


def fit_featurizer(cfg: TrainConfig, train_ds: xd.XMCDataset) -> HashedNgramFeaturizer:
    """The hashed n-gram featurizer of a run on texts, fitted on the training texts and the label titles."""
    lo, hi = (int(v) for v in cfg.char_ngrams.split("-"))
    featurizer = HashedNgramFeaturizer(char_ngrams=(lo, hi), min_df=cfg.min_df)
    return featurizer.fit(list(train_ds.texts) + list(train_ds.label_titles or []))


def text_bag(cfg: TrainConfig, num_features: int, dim: int, sparse: bool = False) -> HashedBagEncoder:
    """The hashed bag of a run on texts (alone, fused with frozen embeddings, or beside a transformer)."""
    config = HashedBagConfig(num_features=num_features, dim=dim, mlp_hidden=cfg.mlp_hidden, sparse=sparse)
    return HashedBagEncoder(config)


def encoder_for_state(cfg: TrainConfig, encoder_state: dict) -> tuple[torch.nn.Module, FrozenTextEmbedder | None]:
    """The encoder (and frozen embedder) of a saved run, its shapes read from its state dict (no data needed)."""
    if cfg.encoder == "hf":
        if cfg.hf_bag == "off":
            return hf_encoder(cfg), None
        return HybridEncoder(hf_encoder(cfg), text_bag(cfg, *encoder_state["bag.bag.weight"].shape), cfg.hf_bag), None
    if cfg.frozen_encoder:
        frozen = frozen_embedder(cfg)
        return FusedEncoder(text_bag(cfg, *encoder_state["bag.bag.weight"].shape), frozen.dim), frozen
    return text_bag(cfg, *encoder_state["bag.weight"].shape), None


def hf_encoder(cfg: TrainConfig) -> HFTextEncoder:
    """The pretrained transformer of cfg.hf_path (bf16 weights) with cfg's training options (`hf_options`)."""
    encoder = HFTextEncoder.from_pretrained(resolve_pretrained(cfg.hf_path), max_length=cfg.hf_max_length)
    return hf_options(cfg, encoder)


def hf_options(cfg: TrainConfig, encoder: HFTextEncoder) -> HFTextEncoder:
    """cfg's gradient checkpointing applied to a transformer, in place; returns it."""
    if cfg.hf_checkpointing:
        if not encoder.model.supports_gradient_checkpointing:
            raise ValueError(f"hf_checkpointing: {type(encoder.model).__name__} has no gradient checkpointing")
        kwargs = {"use_reentrant": False}
        if hasattr(encoder.model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the H200 has 5.17
            encoder.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            encoder.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return encoder


def fp8_linears(encoder: torch.nn.Module, device: torch.device) -> None:
    """Swap the encoder's Linear layers (both sides multiples of 16) for torchao's FP8 training linears, in place."""
    if not has_fp8_tensor_cores(device):
        raise ValueError("fp8_encoder needs a CUDA GPU with FP8 tensor cores (sm_89 or newer)")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise ValueError("fp8_encoder needs torchao: pip install torchao") from e

    def divisible(module: torch.nn.Module, fqn: str) -> bool:
        linear = isinstance(module, torch.nn.Linear)
        return linear and module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(encoder, module_filter_fn=divisible)


def frozen_embedder(cfg: TrainConfig) -> FrozenTextEmbedder:
    """The frozen pretrained sentence embedder of cfg.frozen_encoder."""
    path = resolve_pretrained(cfg.frozen_encoder)
    return FrozenTextEmbedder(path, max_length=cfg.frozen_max_length, cache_dir=cfg.frozen_cache)


def make_optimizers(model: XMCModel, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """SparseAdam for the sparse embedding tables, torch-optimi AdamW (Kahan summation for bf16) for the rest.

    Each param group carries its own "base_lr" and "warmup" (a fraction of the steps), which the training loop's
    schedule follows (they are saved with the optimizer's state): the encoder at encoder_lr with encoder_warmup;
    with hf_bag, only the transformer so, and the parts trained from scratch (the bag, the layer norm on the
    transformer's output) at hf_bag_lr with the head's warmup."""
    enc = model.encoder
    enc_warmup = cfg.warmup if cfg.encoder_warmup < 0 else cfg.encoder_warmup
    parts = [(list(enc.parameters()), cfg.encoder_lr, enc_warmup)]
    if isinstance(enc, HybridEncoder):
        hf_ids = {id(p) for p in enc.hf.parameters()}
        scratch = [p for p in enc.parameters() if id(p) not in hf_ids]
        parts = [(list(enc.hf.parameters()), cfg.encoder_lr, enc_warmup), (scratch, cfg.hf_bag_lr, cfg.warmup)]
    sparse_ids = {id(p) for m in enc.modules() if getattr(m, "sparse", False) for p in m.parameters(recurse=False)}
    sparse_groups, dense_groups = [], []
    for params, lr, warmup in parts:
        params = [p for p in params if p.requires_grad]
        sparse = [p for p in params if id(p) in sparse_ids]
        dense = [p for p in params if id(p) not in sparse_ids]
        group = {"lr": lr, "base_lr": lr, "warmup": warmup}
        if sparse:
            sparse_groups.append({"params": sparse, **group})
        if dense:
            dense_groups.append({"params": dense, **group, "kahan_sum": dense[0].dtype == torch.bfloat16})
    opts: list[torch.optim.Optimizer] = []
    if sparse_groups:
        opts.append(torch.optim.SparseAdam(sparse_groups, lr=sparse_groups[0]["lr"]))
    if dense_groups:
        opts.append(optimi.AdamW(dense_groups, lr=dense_groups[0]["lr"], weight_decay=0.0))
    return opts


def encoder_inputs(model: XMCModel, ds: xd.XMCDataset, feats: sp.csr_matrix | None, rows: np.ndarray) -> tuple:
    """The encoder's inputs for `rows` of a split: from its featurized matrix, else its texts."""
    if feats is not None:
        return model.encoder_inputs(features=feats[rows])
    return model.encoder_inputs(texts=[ds.texts[i] for i in rows])


def featurize(model: XMCModel, ds: xd.XMCDataset):
    """A split's features for `encoder_inputs` (None for a transformer, which tokenizes the texts per batch)."""
    if model.featurizer is not None:
        return model.featurize(ds.texts)
    return ds.features
