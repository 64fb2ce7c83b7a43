"""A scorer replica's live labels: its catalogue (`elmo_serve.catalogue`) kept in step with its served model.

The catalogue log is the source of truth. `LiveLabels(path, model)` replays it into the model on construction (a new
or restarted replica catches up before it answers); `sync()` applies what other writers appended since (the replica
polls it); `change()` checks a batch against the catalogue, appends it (fsync'd, under the log's lock) and applies it
to the model before it returns, so the writing replica answers with it at once and the others within a poll period.
`for_swap()` folds the log into a retrained artifact (`reconcile_log`) before that artifact's model replays it.

Nothing here is thread-safe on its own: the replica calls these under one lock (`elmo_serve.app.ModelScorer`), and
the model's own lock keeps predictions out of a change (`ServingModel.apply`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from elmo_serve.catalogue import Catalogue, Label, reconcile_log
from elmo_serve.catalogue_log import CatalogueError, CatalogueLog, Change, Limits, uids_digest
from elmo_serve.model import ServingModel

logger = logging.getLogger("ray.serve")
LOG_NAME = "catalogue.log"


def default_log_path(artifact: str | os.PathLike) -> str:
    """The catalogue log of a service started on `artifact`: catalogue.log in the directory that holds the artifact
    directory. Beside the artifact, not in it: an artifact's files are checksummed and stay as exported, and the log
    outlives the artifact (a swap to a retrained one reconciles it and keeps it)."""
    return os.path.join(os.path.dirname(os.path.abspath(artifact)), LOG_NAME)


@dataclass(frozen=True)
class Changed:
    """What a change did: the catalogue version after it, and the labels it touched, in request order."""

    version: int
    labels: list[Label]


class LiveLabels:
    """The catalogue of the log at `path` over `model`'s labels, replayed into `model` (see the module docstring).

    Raises CatalogueError when the log does not fit the model's labels (written for another artifact: reconcile it)."""

    def __init__(self, path: str | os.PathLike, model: ServingModel, limits: Limits | None = None):
        if model.zero_shot_rows is None:
            raise CatalogueError("this model has no zero-shot rows for new labels (zero_shot_rows): no live labels")
        if model.num_labels != len(model.uids) or model.retired:
            raise CatalogueError("the model already has changes applied: give a fresh one")
        self.path, self.model = str(path), model
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.catalogue = Catalogue(path, list(model.uids), list(model.titles), limits)
        self._applied, self._version = 0, self.catalogue.version
        n = self._apply_new()
        if n:
            seconds = time.perf_counter() - t0
            logger.info(f"catalogue {path}: {n} changes replayed (version {self.version}) in {seconds:.2f} s")

    @classmethod
    def for_swap(cls, path: str | os.PathLike, model: ServingModel, limits: Limits | None = None, tries: int = 5):
        """The live labels of a retrained artifact's `model`: the log reconciled with its labels first (adds of labels
        it now holds leave the log), unless another replica did so already; then replayed."""
        digest = uids_digest(model.uids)
        for _ in range(tries):
            read = CatalogueLog(path).read_from(0)
            if read.log_id is None or read.artifact == digest:
                break
            try:
                reconcile_log(path, list(model.uids), list(model.titles))
                logger.info(f"catalogue {path}: reconciled with the new artifact")
                break
            except CatalogueError as e:
                if "changed since" not in str(e):  # anything but a concurrent writer (another replica) is final
                    raise
        return cls(path, model, limits)

    @property
    def version(self) -> int:
        """The catalogue version the model serves (every change up to it applied)."""
        return self._version

    @property
    def limits(self) -> Limits:
        return self.catalogue.limits

    @limits.setter
    def limits(self, value: Limits) -> None:
        self.catalogue.limits = value

    def sync(self) -> int:
        """Apply what the log gained since the last call; returns how many changes (0: a cheap read)."""
        self.catalogue.refresh()
        return self._apply_new()

    def change(self, changes: Sequence[Change]) -> Changed:
        """Check, log and apply one batch (all or nothing: CatalogueError and nothing written when it does not fit)."""
        self.catalogue.change(changes)
        self._apply_new()
        state = self.catalogue.state
        return Changed(self.version, [state.get(c.uid) for c in changes])

    def label(self, uid: str) -> Label | None:
        return self.catalogue.state.get(uid)

    def _apply_new(self) -> int:
        records = self.catalogue.state.records[self._applied :]
        if records:
            self.model.apply(records)
            self._applied += len(records)
        self._version = self.catalogue.version
        return len(records)
