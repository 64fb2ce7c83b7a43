"""Fold a live label catalogue into a new artifact: what the service answers, as an artifact of its own.

`elmo export ARTIFACT OUT --catalogue LOG` writes OUT = the artifact with the log's changes applied: added labels
become ordinary labels (their head rows are the zero-shot rows the service computed for them, bit for bit), retitled
labels keep their new title and row, retired labels are left out (the labels after them move up one id; uids are
stable, ids are not). A hot swap to OUT then reconciles the log (`catalogue.reconcile_log`): the adds leave it, the
retirements of labels OUT no longer holds leave it, so the service answers what it answered before the swap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from elmo_serve.catalogue import Catalogue
from training.artifact import Artifact, load_artifact, save_relabelled


@dataclass(frozen=True)
class Folded:
    """What `fold_catalogue` wrote."""

    path: Path
    version: int  # the catalogue version folded in
    num_labels: int
    added: int  # labels the log added that are live
    retitled: int  # artifact labels with a new title
    retired: int  # labels left out: artifact labels and added ones the log retired


def fold_catalogue(artifact: str | os.PathLike | Artifact, log: str | os.PathLike, out: str | os.PathLike) -> Folded:
    """Write `out`: `artifact` with the changes of the catalogue log `log` applied (see the module docstring).

    Raises CatalogueError when the log belongs to another artifact or is damaged before its end (a torn last record
    is dropped with a warning, as a replica does), ValueError when every label is retired or `log` does not exist."""
    art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
    if not Path(log).is_file():
        raise ValueError(f"{log}: no catalogue log there")
    uids = [str(lb.get("uid", lb["id"])) for lb in art.labels]  # as the service reads them
    titles = [lb["title"] for lb in art.labels]
    state = Catalogue(log, uids, titles).state
    weight = art.model.head.weight
    labels, rows, fresh = [], [], []  # fresh: (position in rows, title) of the rows made from a title
    added = retitled = retired = 0
    for label in state.labels():
        if label.retired:
            retired += 1
            continue
        new = label.id >= len(uids)
        changed = not new and label.title != titles[label.id]
        added, retitled = added + new, retitled + changed
        if new or changed:
            fresh.append((len(rows), label.title))
            rows.append(None)
        else:
            rows.append(weight[label.id].cpu())
        labels.append((label.uid, label.title))
    if not labels:
        raise ValueError(f"{log}: every label is retired; an artifact needs at least one")
    if fresh:
        made = art.zero_shot_rows([t for _, t in fresh]).cpu()  # as the service makes them (ServingModel.apply)
        for (i, _), row in zip(fresh, made, strict=True):
            rows[i] = row
    provenance = {"catalogue": str(Path(log).resolve()), "catalogue_version": state.version}
    provenance.update(added=added, retitled=retitled, retired=retired)
    path = save_relabelled(art, out, labels, torch.stack(rows), provenance)
    return Folded(Path(path), state.version, len(labels), added, retitled, retired)
