"""The default recipe: the levers a run does not set, chosen from what the training split shows before training.

    shape = measure(train_ds, seed=cfg.seed)     # label count, labels per point, rows, title resemblance
    recipe = choose(cfg, shape)                  # one Lever per field: its value and why
    cfg = recipe.apply(cfg)                      # fields the user set (cfg.recipe_keep, or not at their default) stay

Three measured quantities decide, each with one rule:

- title resemblance -> label_init. Label-feature init starts each label's vector at the encoder's embedding of its
  title; it is the biggest lever where items resemble their labels' titles (DebianDeps: labels are packages, +4 P@1)
  and hurts where titles are generic descriptions (DebianTags' "role::program : Role: Program": -0.9 P@1).
- training points per label (rows x labels per point / labels) -> batch_size, head_lr, mlp_hidden, encoder_lr. In a
  dense label space every label is seen in many batches: the head is easily learned and the encoder limits quality,
  so more encoder capacity (the residual MLP) and more, smaller steps pay (DebianTags, 136 points per label: batches
  of 64 with head lr 0.004 +0.35 P@1, the MLP +0.85 P@1, encoder lr 0.0015 +0.20 P@1 over 5 seeds; BENCHMARKS.md).
  The lower learning rates offset the 4x more updates from 4x more steps. A sparse label space (DebianDeps, 5.1
  points per label) keeps the defaults.

- labels with no training point, label-feature init and at least UNSEEN_MIN_ROWS rows -> zero_shot_unseen: those
  labels' rows, which only negatives trained, are re-set at the end to the title map's rows, with an offset chosen on
  a held-out slice of the training rows (`training.unseen_offset`; DebianDeps: P@1 +0.38, their recall@5 +10.6).

A pretrained transformer (encoder "hf") wants its own optimiser: encoder_lr 5e-5 with a 10% encoder warmup instead of
the hashed bag's 0.002, and no MLP after it. The choice is deterministic from the data and the seed, so every worker
of a label-sharded run chooses the same recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from training import data as xd
from training.config import TrainConfig
from training.encoders import HashedNgramFeaturizer

# Title resemblance: mean cosine (word tf-idf) of a point's text to its own labels' titles, minus the same to the
# labels of another sampled point (frequency-matched, so a common label gives no lift by itself). Measured on the
# training splits, 2,000 points, seeds 0/1/2: DebianDeps 0.174/0.176/0.157 (0.165-0.184 own vs 0.008-0.009),
# DebianTags 0.024/0.024/0.024 (0.030-0.031 own vs 0.007). The threshold sits 3x above DebianTags and 2x below
# DebianDeps.
RESEMBLANCE_THRESHOLD = 0.08
RESEMBLANCE_SAMPLE = 2000  # training points sampled for the resemblance

# Training points per label: DebianTags 136 (21,816 rows x 3.73 / 598 labels), DebianDeps 5.1 (40,952 x 5.26 /
# 42,242). The threshold sits 3.4x below DebianTags and 8x above DebianDeps (and above the ~20 of the small planted
# sets the tests train on, which keep the defaults).
DENSE_POINTS_PER_LABEL = 40.0
DENSE = {"batch_size": 64, "head_lr": 0.004, "mlp_hidden": 2048, "encoder_lr": 0.0015}
TRANSFORMER = {"encoder_lr": 5e-5, "encoder_warmup": 0.1}
# Labels with no training point (DebianDeps: 6,340 of 42,242) are re-set at the end of training to the title map's
# rows, their offset chosen on a held-out slice (`training.unseen_offset`): P@1 +0.38, P@5 +0.20 and their recall@5
# 18.1 -> 28.7 % on DebianDeps (BENCHMARKS.md). It needs label-feature init, and enough rows that the slice held out
# (zero_shot_holdout: 10 %) ranks a few thousand of them; the small planted sets of the tests stay below.
UNSEEN_MIN_ROWS = 10_000
HASHED_LEVERS = ("label_init", "batch_size", "head_lr", "mlp_hidden", "encoder_lr", "zero_shot_unseen")
LEVERS = HASHED_LEVERS + ("encoder_warmup",)  # the hashed bag keeps its warmup; a transformer gets all of LEVERS


@dataclass(frozen=True)
class DataShape:
    """What the recipe reads from a training split."""

    num_labels: int
    num_rows: int
    unseen_labels: int  # labels with no training point
    labels_per_point: float
    points_per_label: float
    title_similarity: float | None  # mean cosine of a point to its own labels' titles (None: no titles or texts)
    random_similarity: float | None  # ... to another sampled point's labels' titles

    @property
    def resemblance(self) -> float | None:
        if self.title_similarity is None or self.random_similarity is None:
            return None
        return self.title_similarity - self.random_similarity


@dataclass(frozen=True)
class Lever:
    """One field's value in a recipe and why; user_set: the user set it, and `value` is theirs."""

    field: str
    value: object
    reason: str
    user_set: bool = False

    def line(self) -> str:
        return f"{self.field} {_show(self.value)}: {self.reason}"


@dataclass(frozen=True)
class Recipe:
    levers: tuple[Lever, ...] = ()

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        """`cfg` with the recipe's values, the fields the user set left alone."""
        return replace(cfg, **{lv.field: lv.value for lv in self.levers if not lv.user_set}).validate()

    def lines(self) -> list[str]:
        return [lv.line() for lv in self.levers]

    def as_dict(self) -> dict:
        """{field: {"value", "reason", "user_set"}}: JSON for metrics.json."""
        return {lv.field: {"value": lv.value, "reason": lv.reason, "user_set": lv.user_set} for lv in self.levers}


def user_set(cfg: TrainConfig) -> set[str]:
    """The fields the user set: named in cfg.recipe_keep (load_config names every field a file or flag gives), or
    not at their default (a config built in code)."""
    named = {name for name in cfg.recipe_keep.split(",") if name}
    changed = {f.name for f in fields(TrainConfig) if getattr(cfg, f.name) != f.default}
    return named | changed - {"recipe_keep"}


def measure(ds: xd.XMCDataset, seed: int = 0, sample: int = RESEMBLANCE_SAMPLE) -> DataShape:
    """The shape of a training split and how much its points' texts resemble their own labels' titles."""
    instances = ds.labels.nnz
    own = other = None
    if ds.texts is not None and ds.label_titles is not None:
        own, other = title_resemblance(ds, seed=seed, sample=sample)
    return DataShape(
        num_labels=ds.num_labels,
        num_rows=ds.num_rows,
        unseen_labels=int((ds.label_counts() == 0).sum()),
        labels_per_point=instances / max(1, ds.num_rows),
        points_per_label=instances / max(1, ds.num_labels),
        title_similarity=own,
        random_similarity=other,
    )


def title_resemblance(ds: xd.XMCDataset, seed: int = 0, sample: int = RESEMBLANCE_SAMPLE) -> tuple[float, float]:
    """(own, other): the mean over `sample` points with labels of the mean cosine (word tf-idf, hashed) between a
    point's text and its labels' titles; other: the same with the labels of another sampled point (up to as many)."""
    rng = np.random.default_rng(seed)
    y = ds.labels.tocsr()
    rows = np.flatnonzero(np.diff(y.indptr) > 0)
    if len(rows) == 0:
        return 0.0, 0.0
    rows = np.sort(rng.choice(rows, size=min(sample, len(rows)), replace=False))
    own = [y.indices[y.indptr[i] : y.indptr[i + 1]] for i in rows]
    partner = rng.permutation(len(rows))
    other = [own[j][: len(own[i])] for i, j in enumerate(partner)]
    used = np.unique(np.concatenate(own))
    texts = [ds.texts[i] for i in rows]
    featurizer = HashedNgramFeaturizer(char_ngrams=(0, 0), word_bigrams=False, min_df=0)
    x = featurizer.fit_transform(texts + [ds.label_titles[i] for i in used])
    points, titles = x[: len(rows)], x[len(rows) :]
    position = np.full(ds.num_labels, -1, dtype=np.int64)
    position[used] = np.arange(len(used))

    def mean_cosine(groups: list[np.ndarray]) -> float:
        sizes = np.array([len(g) for g in groups])
        point = np.repeat(np.arange(len(groups)), sizes)
        cos = np.asarray(points[point].multiply(titles[position[np.concatenate(groups)]]).sum(1)).ravel()
        return float(np.mean(np.bincount(point, weights=cos, minlength=len(groups)) / sizes))

    return mean_cosine(own), mean_cosine(other)


def choose(cfg: TrainConfig, shape: DataShape) -> Recipe:
    """The recipe for a run of `cfg` on data of `shape`: every lever's value and reason (a user's value stays)."""
    mine = user_set(cfg)
    levers = []
    for name, (value, reason) in _rules(cfg, shape).items():
        if name in mine:
            levers.append(Lever(name, getattr(cfg, name), "set by the user", user_set=True))
        else:
            levers.append(Lever(name, value, reason))
    return Recipe(tuple(levers))


def recipe_for(cfg: TrainConfig, train_ds: xd.XMCDataset) -> Recipe:
    """`choose` on the measured training split; empty when cfg.recipe is "off" or the user set every lever."""
    if cfg.recipe == "off" or set(levers_of(cfg)) <= user_set(cfg):
        return Recipe()
    return choose(cfg, measure(train_ds, seed=cfg.seed))


def levers_of(cfg: TrainConfig) -> tuple[str, ...]:
    """The fields the recipe chooses for a run of `cfg` (a transformer's learning rate and warmup too)."""
    return LEVERS if cfg.encoder == "hf" else HASHED_LEVERS


def _rules(cfg: TrainConfig, shape: DataShape) -> dict[str, tuple[object, str]]:
    base = {f.name: f.default for f in fields(TrainConfig)}
    rules: dict[str, tuple[object, str]] = {}
    r = shape.resemblance
    if r is None:
        rules["label_init"] = (base["label_init"], "no label titles or item texts to compare: the default")
    else:
        above = r >= RESEMBLANCE_THRESHOLD
        rules["label_init"] = (
            above,
            f"label titles resemble item texts {shape.title_similarity:.3f} vs other points' labels "
            f"{shape.random_similarity:.3f}, lift {r:.3f} ({'>=' if above else '<'} threshold {RESEMBLANCE_THRESHOLD})",
        )
    density = (
        f"{shape.points_per_label:.1f} training points per label ({shape.num_rows} rows x "
        f"{shape.labels_per_point:.2f} labels / {shape.num_labels} labels)"
    )
    if shape.points_per_label >= DENSE_POINTS_PER_LABEL:
        dense = f"{density} >= {DENSE_POINTS_PER_LABEL:g}: a dense label space, the encoder limits quality"
        rules["batch_size"] = (DENSE["batch_size"], f"{dense}: more, smaller steps")
        rules["head_lr"] = (DENSE["head_lr"], f"{dense}: a lower head lr for 4x more steps")
        rules["mlp_hidden"] = (DENSE["mlp_hidden"], f"{dense}: more encoder capacity")
        rules["encoder_lr"] = (DENSE["encoder_lr"], f"{dense}: a lower encoder lr for 4x more steps")
    else:
        sparse = f"{density} < {DENSE_POINTS_PER_LABEL:g}: a sparse label space, the default"
        rules.update({name: (base[name], sparse) for name in ("batch_size", "head_lr", "mlp_hidden", "encoder_lr")})
    rules["zero_shot_unseen"] = _unseen_rule(cfg, shape, rules["label_init"][0])
    if cfg.encoder == "hf":
        rules["mlp_hidden"] = (0, "a pretrained transformer: its own layers are the capacity, no MLP after it")
        rules["encoder_lr"] = (TRANSFORMER["encoder_lr"], "a pretrained transformer is fine-tuned with a small lr")
        rules["encoder_warmup"] = (TRANSFORMER["encoder_warmup"], "a pretrained transformer wants a warmup of 10%")
    return rules


def _unseen_rule(cfg: TrainConfig, shape: DataShape, label_init: object) -> tuple[bool, str]:
    """zero_shot_unseen: on where label-feature init gives the labels with no training point zero-shot rows and the
    rows suffice to choose their offset on a held-out slice (UNSEEN_MIN_ROWS); never for a transformer, whose run
    the nested one would double."""
    if cfg.encoder == "hf":
        return False, "a pretrained transformer: the nested run that chooses the offset would double the fine-tuning"
    if not label_init:
        return False, "no label-feature init: no zero-shot rows for the labels with no training point"
    if shape.unseen_labels == 0:
        return False, "every label has a training point"
    unseen = f"{shape.unseen_labels} of {shape.num_labels} labels have no training point"
    if shape.num_rows < UNSEEN_MIN_ROWS:
        return False, f"{unseen}, but {shape.num_rows} training rows < {UNSEEN_MIN_ROWS}: too few to hold out a slice"
    how = (
        f"their offset chosen on {cfg.zero_shot_holdout:g} of the training rows held out (a nested run)"
        if cfg.zero_shot_holdout > 0
        else "offset 0 (zero_shot_holdout 0: no nested run)"
    )
    return True, f"{unseen}: re-set at the end to the title map's rows, {how}"


def _show(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
