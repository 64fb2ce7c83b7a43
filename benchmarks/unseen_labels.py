"""Labels without training points (issue 20) and labels added to a trained model (issue 21's quality, offline form).

    python benchmarks/unseen_labels.py --seeds 0 1 2                   # a default run per seed (trained, or reused)
    python benchmarks/unseen_labels.py --seeds 0 --run 0=/tmp/h2/deps  # a run already trained with seed 0
    python benchmarks/unseen_labels.py --seeds 0 --holdout 2000        # also: 2,000 trained labels removed, re-added

Runs are what `elmo train --data <data>` trains (the recipe chosen from the data, every default), one per seed, in
<runs>/seed<s> (a finished run there is reused). Each is then scored on tst.json with its filter pairs removed, as
evaluation does, by one top-10 ranking per variant:
- "trained": the run's head as training left it (labels with no training point keep the rows that negatives pushed);
- "reset:<calibration>": the labels with no training point re-set to their zero-shot rows through the trained
  encoder (`training.zero_shot.set_rows`), with that calibration ("config": label_init_gain and the 0-point prior
  bias; "tail": measured on the trained tail labels, `training.zero_shot.calibrate`);
- "reset:tail+map": re-set as `--zero-shot-unseen` does (`training.zero_shot.reset_unseen`): the title map's rows.

Recall of a label set U at k (the figures of issue 20): over the test (row, label) pairs with label in U, the
fraction whose label is in the row's top k ("pairs", the headline); "rows": the mean over test rows carrying a label
of U of the fraction of their U labels found; "labels": the mean over the labels of U present in the test split of
the fraction of their test rows that rank them in the top k. P@1 / P@5 are the trainer's (every test row).

--holdout N: N labels with training points (drawn with --holdout-seed) are removed from the label set and from every
training row (a reduced copy of the data under <runs>), a model is trained on the rest with the run's seed, exported
as an artifact (export fits the title map, `training.zero_shot.fit_title_map`), and the N labels are added back as
`Artifact.zero_shot_rows` of their titles (rows appended to the head, as a live catalogue adds them: the map's rows;
the title rows without the map are measured beside them); their recall on the test rows that carry them is reported
next to the run trained with them. A table is printed; rows are appended to the JSON (--out) with the date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

from training import data as xd  # noqa: E402
from training.artifact import load_artifact, save_artifact  # noqa: E402
from training.build import encoder_inputs, featurize, load_data  # noqa: E402
from training.checkpoint import model_from_checkpoint  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.evaluation import filter_pairs  # noqa: E402
from training.metrics import XMCMetrics  # noqa: E402
from training.model import HeadConfig, XMCHead, XMCModel  # noqa: E402
from training.train import train  # noqa: E402
from training.unseen_offset import target_pairs  # noqa: E402
from training.zero_shot import (  # noqa: E402
    CALIBRATIONS,
    Calibration,
    calibrate,
    reset_unseen,
    set_rows,
    stored_rows,
    title_embeddings,
    true_rows,
)

DATA = ROOT.parent / "shared" / "data" / "debian-deps"
K = 10


def trained_run(data: str, out: Path, seed: int, threads: int) -> Path:
    """The run directory of a default `elmo train` on `data` with `seed` (trained here unless finished already)."""
    if not (out / "metrics.json").is_file():
        train(TrainConfig(data=data, out=str(out), seed=seed, threads=threads, progress=False, checkpoint_every=0))
    return out


@torch.no_grad()
def top_ids(model: XMCModel, ds: xd.XMCDataset, feats, head: XMCHead | None = None, batch: int = 1024) -> np.ndarray:
    """(rows, K) top label ids (head order) of every row of `ds`, its filter pairs removed before ranking."""
    head = head or model.head
    filt = ds.filter_matrix() if len(ds.filters) else None
    out = []
    for start in range(0, ds.num_rows, batch):
        rows = np.arange(start, min(start + batch, ds.num_rows))
        x = model.embed(*encoder_inputs(model, ds, feats, rows))
        excl = filter_pairs(filt[rows].tocoo()) if filt is not None else None
        out.append(head.topk(x, K, exclude=excl)[1].cpu().numpy())
    return np.concatenate(out)


def recall(top: np.ndarray, truth: sp.csr_matrix, targets: np.ndarray, ks=(5, 10)) -> dict:
    """Recall of the labels `targets` at each k (module doc: "pairs", "rows", "labels"), in %, and the pair count."""
    y = sp.csr_matrix(truth, dtype=bool)
    mask = np.zeros(y.shape[1], dtype=bool)
    mask[targets] = True
    rows, cols = target_pairs(y, mask)
    out: dict = {"pairs": int(len(rows)), "labels_in_test": int(len(np.unique(cols)))}
    if not len(rows):
        return out
    for k in ks:
        hit = (top[rows, :k] == cols[:, None]).any(1)
        per_row = np.bincount(rows, hit, minlength=y.shape[0])[np.unique(rows)] / np.bincount(rows)[np.unique(rows)]
        lab = np.unique(cols)
        per_label = np.bincount(cols, hit, minlength=y.shape[1])[lab] / np.bincount(cols)[lab]
        out[f"R@{k}"] = round(100 * float(hit.mean()), 2)
        out[f"R@{k}_rows"] = round(100 * float(per_row.mean()), 2)
        out[f"R@{k}_labels"] = round(100 * float(per_label.mean()), 2)
    return out


def precision(top: np.ndarray, truth: sp.csr_matrix) -> dict:
    """P@1 / P@5 in %, the trainer's definition (`training.evaluation.evaluate_model`)."""
    m = XMCMetrics(ks=(1, 5))
    m.update(top, truth)
    return {k: round(100 * v, 2) for k, v in m.compute().items() if k in ("P@1", "P@5")}


class Snapshot:
    """The head's weights, master bias and Kahan rows, to restore between variants."""

    def __init__(self, head: XMCHead):
        self.head, self.state = head, {n: b.clone() for n, b in head.named_buffers()}

    def restore(self) -> None:
        for n, b in self.head.named_buffers():
            b.copy_(self.state[n])


def unseen_variants(run: Path, calibrations: list[str]) -> tuple[list[dict], dict]:
    """Rows for the trained head and each zero-shot re-set of a run; and what the holdout comparison needs."""
    model, cfg, _ = model_from_checkpoint(run)
    train_ds, test_ds = load_data(cfg)
    order = model.label_order.cpu().numpy()
    train_ds, test_ds = xd.permute_labels(train_ds, order), xd.permute_labels(test_ds, order)
    feats = featurize(model, test_ds)
    counts = train_ds.label_counts()
    unseen = np.flatnonzero(counts == 0)
    snap = Snapshot(model.head)
    rows, tops = [], {}
    for variant in ["trained", *(f"reset:{c}" for c in calibrations), "reset:tail+map"]:
        cal = None
        if variant == "reset:tail+map":  # what --zero-shot-unseen does: the rows of the title map fitted now
            done = reset_unseen(
                model,
                train_ds.label_titles,
                counts,
                gain=cfg.label_init_gain,
                num_rows=train_ds.num_rows,
                labels=train_ds.labels,
                texts=train_ds.texts,
                exclude=train_ds.filters,
            )
            cal = Calibration.from_dict(done["calibration"])
        elif variant != "trained":
            cal = calibrate(
                model,
                train_ds.label_titles,
                counts,
                gain=cfg.label_init_gain,
                num_rows=train_ds.num_rows,
                method=variant.split(":")[1],
            )
            set_rows(model, unseen, [train_ds.label_titles[j] for j in unseen], cal)
        top = top_ids(model, test_ds, feats)
        tops[variant] = top
        rows.append(
            {
                "seed": cfg.seed,
                "variant": variant,
                "unseen_labels": int(len(unseen)),
                **precision(top, test_ds.labels),
                **recall(top, test_ds.labels, unseen),
                **({"calibration": cal.as_dict()} if cal else {}),
            }
        )
        snap.restore()
    return rows, {"order": order, "tops": tops, "test": test_ds, "cfg": cfg}


def reduced_data(src: Path, dst: Path, removed: np.ndarray) -> np.ndarray:
    """A copy of the LF data in `src` without the labels `removed` (label set, every row, filter pairs); returns kept
    (reduced id -> original id)."""
    num_labels = sum(1 for _ in open(src / "lbl.json"))
    gone = np.zeros(num_labels, dtype=bool)
    gone[removed] = True
    kept = np.flatnonzero(~gone)
    new_id = np.full(num_labels, -1)
    new_id[kept] = np.arange(len(kept))
    tmp = dst.parent / f".{dst.name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    with open(src / "lbl.json") as f, open(tmp / "lbl.json", "w") as g:
        g.writelines(line for i, line in enumerate(f) if not gone[i])
    for split in ("trn", "tst"):
        with open(src / f"{split}.json") as f, open(tmp / f"{split}.json", "w") as g:
            for line in f:
                obj = json.loads(line)
                obj["target_ind"] = [int(new_id[t]) for t in obj["target_ind"] if not gone[t]]
                g.write(json.dumps(obj, ensure_ascii=False) + "\n")
        with open(src / f"filter_labels_{split}.txt") as f, open(tmp / f"filter_labels_{split}.txt", "w") as g:
            for line in f:
                r, lab = line.split()
                if not gone[int(lab)]:
                    g.write(f"{r} {new_id[int(lab)]}\n")
    os.replace(tmp, dst)
    return kept


def holdout(args, full: dict) -> list[dict]:
    """Train without `args.holdout` trained labels, add them back through the artifact's zero-shot rows."""
    cfg = full["cfg"]
    src = Path(cfg.data)
    full_train, full_test = load_data(cfg)
    counts = full_train.label_counts()
    rng = np.random.default_rng(args.holdout_seed)
    removed = np.sort(rng.choice(np.flatnonzero(counts > 0), args.holdout, replace=False))
    base = Path(args.runs) / f"holdout{args.holdout}-h{args.holdout_seed}-seed{cfg.seed}"
    data = base / "data"
    kept = reduced_data(src, data, removed) if not (data / "lbl.json").is_file() else None
    if kept is None:
        gone = np.zeros(full_train.num_labels, dtype=bool)
        gone[removed] = True
        kept = np.flatnonzero(~gone)
    run = trained_run(str(data), base / "run", cfg.seed, args.threads)
    model, rcfg, _ = model_from_checkpoint(run)
    rtrain, _ = load_data(rcfg)
    rtrain = xd.permute_labels(rtrain, model.label_order.cpu().numpy())
    art_path = base / "artifact"
    save_artifact(art_path, model, rtrain, config=asdict(rcfg))  # export measures and records the calibration
    art = load_artifact(art_path)
    titles = [full_train.label_titles[j] for j in removed]
    new_rows = art.zero_shot_rows(titles)  # what the service adds: the title map's rows (title rows without one)
    # the artifact's head (label id order: reduced ids) with the new labels appended: original ids via `ids`
    h = art.model.head
    head = XMCHead(replace_head(h.config, h.num_labels + len(removed)))
    head.weight[: h.num_labels] = h.weight[: h.num_labels]
    head.weight[h.num_labels : h.num_labels + len(removed)] = new_rows
    ids = np.concatenate([kept, removed])  # extended head row -> original label id
    ext_of_orig = np.empty_like(ids)
    ext_of_orig[ids] = np.arange(len(ids))
    test = xd.permute_labels(full_test, ids)  # the full test split, labels in extended-head order
    top = top_ids(art.model, test, featurize(art.model, test), head=head)
    targets = ext_of_orig[removed]
    kind = "title map" if art.title_map else "title rows"
    added = {
        "seed": cfg.seed,
        "variant": f"holdout {args.holdout}: added by zero_shot_rows ({kind})",
        **precision(top, test.labels),
        **recall(top, test.labels, targets),
        "calibration": art.zero_shot.as_dict(),
        **({"title_map": art.title_map.details} if art.title_map else {}),
    }
    variants = [added]
    if art.title_map is not None:  # the title rows the artifact would give without its map, for comparison
        head.weight[h.num_labels : h.num_labels + len(removed)] = stored_rows(art.model, titles, art.zero_shot)
        top = top_ids(art.model, test, featurize(art.model, test), head=head)
        variants.append(
            {
                "seed": cfg.seed,
                "variant": f"holdout {args.holdout}: added as title rows (no map)",
                **precision(top, test.labels),
                **recall(top, test.labels, targets),
            }
        )
    for spec in args.neighbours:  # rows that also borrow from the nearest trained labels (by title)
        k, lam, mu, off = (float(v) for v in spec.split(":"))
        head.weight[h.num_labels : h.num_labels + len(removed)] = h.stored_rows(
            neighbour_rows(art, titles, int(k), lam, mu, off)
        )
        top = top_ids(art.model, test, featurize(art.model, test), head=head)
        variants.append(
            {
                "seed": cfg.seed,
                "variant": f"holdout {args.holdout}: + neighbours K={int(k)} lambda={lam} mu={mu} offset={off}",
                **precision(top, test.labels),
                **recall(top, test.labels, targets),
            }
        )
    # the run trained with them: the same labels in its own head order
    order = full["order"]
    head_of_orig = np.empty_like(order)
    head_of_orig[order] = np.arange(len(order))
    top_full = full["tops"]["trained"]
    with_them = {
        "seed": cfg.seed,
        "variant": f"holdout {args.holdout}: trained with them",
        **precision(top_full, full["test"].labels),
        **recall(top_full, full["test"].labels, head_of_orig[removed]),
    }
    return [with_them, *variants]


@torch.no_grad()
def neighbour_rows(art, titles: list[str], k: int, lam: float, mu: float, offset: float, tau: float = 0.05):
    """Zero-shot rows (true units) that borrow from trained labels: the title's row (`zero_shot.true_rows`) plus lam
    times the softmax(cos / tau)-weighted mean of the rows of the k trained labels whose titles embed nearest; the
    bias (1 - mu) * the calibrated bias + mu * those labels' weighted bias, + offset (logits)."""
    model, head = art.model, art.model.head
    dim, cal = head.config.dim, art.zero_shot
    rows = true_rows(model, titles, cal)
    unit = lambda e: e / e.norm(dim=1, keepdim=True).clamp_min(1e-6)  # noqa: E731
    sim = unit(title_embeddings(model, titles)) @ unit(title_embeddings(model, [lb["title"] for lb in art.labels])).T
    near_s, near_i = sim.topk(k, dim=1)
    w = torch.softmax(near_s / tau, dim=1)
    trained = head.true_weight()
    rows[:, :dim] += lam * (w[:, :, None] * trained[near_i][:, :, :dim]).sum(1)
    if head.config.bias:
        bias = (1 - mu) * cal.bias + mu * (w * trained[near_i][:, :, dim]).sum(1) * head.config.bias_input
        rows[:, dim] = (bias + offset) / head.config.bias_input
    return rows


def replace_head(c: HeadConfig, num_labels: int) -> HeadConfig:
    return HeadConfig(
        num_labels=num_labels, dim=c.dim, precision=c.precision, bias=c.bias, bias_input=c.bias_input, scale=c.scale
    )


def table(rows: list[dict]) -> str:
    cols = ["seed", "variant", "P@1", "P@5", "R@5", "R@10", "R@5_rows", "R@10_rows", "R@5_labels", "R@10_labels"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--run", action="append", default=[], help="SEED=DIR: a finished run of that seed to reuse")
    p.add_argument("--runs", default="/tmp/unseen_runs", help="where runs (and holdout data) are written")
    p.add_argument("--calibrations", nargs="+", default=list(CALIBRATIONS), choices=CALIBRATIONS)
    p.add_argument("--holdout", type=int, default=0, help="labels removed and re-added (0: off); first seed only")
    p.add_argument("--holdout-seed", type=int, default=0)
    p.add_argument(
        "--neighbours",
        nargs="*",
        default=[],
        metavar="K:LAMBDA:MU:OFFSET",
        help="with --holdout: also add the labels with rows that borrow from their K nearest trained labels",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "unseen_labels.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    given = {int(s): Path(d) for s, d in (item.split("=", 1) for item in args.run)}
    rows = []
    for i, seed in enumerate(args.seeds):
        run = given.get(seed) or trained_run(args.data, Path(args.runs) / f"seed{seed}", seed, args.threads)
        seed_rows, full = unseen_variants(run, args.calibrations)
        rows += seed_rows
        print(table(seed_rows), flush=True)
        if args.holdout and i == 0:
            hold = holdout(args, full)
            rows += hold
            print(table(hold), flush=True)
    print(table(rows))
    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "command": "python benchmarks/unseen_labels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps(old + [{**meta, **r} for r in rows], indent=2))


if __name__ == "__main__":
    main()
