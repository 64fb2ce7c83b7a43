"""The live label catalogue: an artifact's labels with the changes of its catalogue log applied on top.

A served artifact's labels (ids 0..N-1) can be added to, retitled and retired without retraining. Each change is a
record of a catalogue log (`elmo_serve.catalogue_log`: the file format, reading and appending); the log is the source
of truth that every replica follows: a replica replays it on load (`Catalogue(path, uids, titles)`) and then polls it
(`Catalogue.refresh`), so a restart or a new replica serves the same catalogue. `reconcile_log` folds a log into a
retrained artifact. Pure Python: no Ray, torch or HTTP here.

Labels: artifact labels keep their ids; an added label takes the next id (N, N+1, ... in log order). A retired uid is
a tombstone: it keeps its id and is never served again, and it cannot be updated or added again (a revived uid would
inherit what clients cached about the old label, and a retirement would not be final): add a new uid instead.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from elmo_serve.catalogue_log import (
    CatalogueError,
    CatalogueLog,
    CatalogueWarning,
    Change,
    Limits,
    LogRead,
    Record,
    check_change,
    renumbered,
    uids_digest,
)


class CatalogueConflict(CatalogueError):
    """A change that conflicts with the catalogue: an add of an existing or retired uid, a change of a retired one."""


class CatalogueUnknown(CatalogueError):
    """An update or retirement of a uid the catalogue does not hold."""


class CatalogueStale(CatalogueError):
    """The log was rewritten (reconciled with another artifact) under a catalogue that follows it: build a new one."""


@dataclass(frozen=True)
class Label:
    """A label of the catalogue: a retired one keeps its id and uid but is never served."""

    id: int
    uid: str
    title: str | None  # None: an artifact label whose title the state was not given
    retired: bool


class CatalogueState:
    """An artifact's labels (ids 0..N-1, in the order of `artifact_uids`) with the log's records applied on top.

    Added labels take ids N, N+1, ... in log order; `version` is that of the last record applied (or `version`,
    the log header's, before any). Raises CatalogueError for an artifact uid that is empty or appears twice."""

    def __init__(
        self, artifact_uids: Sequence[str], artifact_titles: Sequence[str] | None = None, version: int = 0
    ) -> None:
        uids = list(artifact_uids)
        if artifact_titles is not None and len(artifact_titles) != len(uids):
            raise CatalogueError(f"{len(artifact_titles)} artifact titles for {len(uids)} uids")
        ids: dict[str, int] = {}
        for i, u in enumerate(uids):
            if not isinstance(u, str) or not u:
                raise CatalogueError(f"artifact label {i}: uid {u!r} is not a non-empty string")
            if ids.setdefault(u, i) != i:
                raise CatalogueError(f"artifact uid {u!r} appears twice (label ids {ids[u]} and {i})")
        self.num_artifact_labels = len(uids)
        self.artifact_digest = uids_digest(uids)
        self.version = version
        self.records: list[Record] = []  # applied, in order: what `reconcile` filters
        self._uids, self._ids = uids, ids
        self._artifact_titles = artifact_titles
        self._titles: dict[int, str] = {}  # titles the log set (added labels, updates)
        self._retired: set[int] = set()

    @property
    def num_labels(self) -> int:
        """Ids handed out: artifact labels plus added ones, retired ones included (ids are never reused)."""
        return len(self._uids)

    def id_of(self, uid: str) -> int | None:
        return self._ids.get(uid)

    def label(self, id: int) -> Label:
        if not 0 <= id < len(self._uids):
            raise CatalogueError(f"label id {id} out of range [0, {len(self._uids)})")
        title = self._titles.get(id)
        if title is None and self._artifact_titles is not None and id < self.num_artifact_labels:
            title = self._artifact_titles[id]
        return Label(id, self._uids[id], title, id in self._retired)

    def get(self, uid: str) -> Label | None:
        id = self._ids.get(uid)
        return None if id is None else self.label(id)

    def labels(self) -> list[Label]:
        """Every label in id order, retired ones included (`retired` says which)."""
        return [self.label(i) for i in range(len(self._uids))]

    def check(self, changes: Sequence[Change], limits: Limits | None = None) -> None:
        """Raise CatalogueError (naming the change) unless the whole batch applies: each change well formed and
        within `limits` (default `Limits()`), each uid changed at most once, adds of new uids only, updates and
        retirements of live labels only. Checks only: the state does not change."""
        limits = limits or Limits()
        if not changes:
            raise CatalogueError("a batch needs at least one change")
        if len(changes) > limits.max_batch:
            raise CatalogueError(f"{len(changes)} changes in one batch: at most {limits.max_batch}")
        seen: dict[str, int] = {}
        for n, c in enumerate(changes):
            try:
                check_change(c, limits)
                if c.uid in seen:
                    raise CatalogueError(f"uid {c.uid!r} is changed twice in one batch (changes {seen[c.uid]} and {n})")
                seen[c.uid] = n
                self._check_one(c.op, c.uid)
            except CatalogueError as e:
                raise type(e)(f"change {n}: {e}") from None

    def _check_one(self, op: str, uid: str) -> None:
        # One change per uid in a batch, so each change is checked against the state alone.
        id = self._ids.get(uid)
        if op == "add" and id is not None:
            if id in self._retired:
                raise CatalogueConflict(
                    f"add {uid!r}: the uid was retired (label id {id}); a retired uid is never "
                    "reused: add the label under a new uid"
                )
            raise CatalogueConflict(f"add {uid!r}: the uid exists (label id {id}); update it to change its title")
        if op != "add" and id is None:
            raise CatalogueUnknown(f"{op} {uid!r}: unknown uid")
        if op != "add" and id in self._retired:
            raise CatalogueConflict(f"{op} {uid!r}: the label is retired (label id {id})")

    def apply(self, records: Iterable[Record]) -> int:
        """Apply records read from a log, batch by batch; returns how many were applied.

        Limits are not applied (they bind new changes, and may have changed since). Raises CatalogueError when a
        batch does not apply (a version out of sequence, or a change that does not fit this artifact: the log
        belongs to another one); the state is then as it was after the last batch that applied."""
        records, n, i = list(records), 0, 0
        while i < len(records):
            j = next((k + 1 for k in range(i, len(records)) if records[k].version == records[k].batch_end), None)
            if j is None:
                raise CatalogueError(f"the batch ending at version {records[i].batch_end} is incomplete")
            batch, seen = records[i:j], set()
            for k, r in enumerate(batch):
                if r.version != self.version + 1 + k:
                    raise CatalogueError(f"record version {r.version} where {self.version + 1 + k} was due")
                try:
                    if r.uid in seen:
                        raise CatalogueError(f"uid {r.uid!r} twice in one batch")
                    seen.add(r.uid)
                    self._check_one(r.op, r.uid)
                except CatalogueError as e:
                    raise CatalogueError(f"log record version {r.version} does not apply: {e}") from None
            for r in batch:
                self._apply_one(r)
            n, i = n + len(batch), j
        return n

    def _apply_one(self, r: Record) -> None:
        if r.op == "add":
            id = len(self._uids)
            self._uids.append(r.uid)
            self._ids[r.uid] = id
            self._titles[id] = r.title
        elif r.op == "update":
            self._titles[self._ids[r.uid]] = r.title
        else:
            self._retired.add(self._ids[r.uid])
        self.version = r.version
        self.records.append(r)

    def reconcile(self, new_artifact_uids: Iterable[str]) -> list[Record]:
        """`reconcile(self.records, new_artifact_uids)`."""
        return reconcile(self.records, new_artifact_uids)


def reconcile(records: Sequence[Record], new_artifact_uids: Iterable[str]) -> list[Record]:
    """The records that still matter on top of a retrained artifact with these uids.

    Adds of labels the artifact now holds leave the log (the artifact has them); their later updates and
    retirements stay, and so do updates and retirements of labels of the old artifact that the new one still holds
    (the retrained model may still contain a label that was retired). The records of a label the log added and the
    artifact lacks all stay. Updates and retirements of a label neither the artifact nor the log holds any more
    (the retrain dropped it) leave. Needs only the records, not the old artifact."""
    new = set(new_artifact_uids)
    added = {r.uid for r in records if r.op == "add" and r.uid not in new}
    return [r for r in records if r.uid in added or (r.uid in new and r.op != "add")]


def reconcile_log(
    path: str | os.PathLike, new_artifact_uids: Sequence[str], new_artifact_titles: Sequence[str] | None = None
) -> int:
    """Fold the log at `path` into a retrained artifact; returns the new version.

    Keeps the records that still matter (`reconcile`), checks that they apply to the new artifact, then rewrites the
    log atomically for it (CatalogueLog.rewrite); nothing is written when they do not apply or when the log changed
    meanwhile (CatalogueError: run it again). Catalogues following the old log get CatalogueStale."""
    log = CatalogueLog(path)
    read = log.read_from(0)
    version = read.records[-1].version if read.records else read.base_version
    kept = reconcile(read.records, new_artifact_uids)
    probe = CatalogueState(new_artifact_uids, new_artifact_titles, version=version + 1)
    probe.apply(renumbered(kept, version + 1))
    return log.rewrite(kept, expected_version=version, artifact=probe.artifact_digest)


class Catalogue:
    """One replica's live catalogue: an artifact's labels and the log at `path` beside it, replayed on construction.

    `change` checks a batch, appends it and applies it (all or nothing); `refresh` applies what other writers
    appended. Both raise CatalogueStale once the log has been rewritten for another artifact. Raises CatalogueError
    when the log was written for another artifact (reconcile it first: `reconcile_log`) or does not apply to it."""

    def __init__(
        self,
        path: str | os.PathLike,
        artifact_uids: Sequence[str],
        artifact_titles: Sequence[str] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.state = CatalogueState(artifact_uids, artifact_titles)
        self.log = CatalogueLog(path, artifact=self.state.artifact_digest)
        self._lock = threading.Lock()
        self._log_id: str | None = None
        self._offset = 0
        read = self.log.read_from(0)
        if read.pending:
            warnings.warn(
                f"{self.log.path}: ignored {read.pending} bytes at the end: a torn record (the next append "
                "drops it) or a write in progress",
                CatalogueWarning,
                stacklevel=2,
            )
        self._take(read)

    @property
    def version(self) -> int:
        return self.state.version

    def refresh(self) -> int:
        """Apply the records appended since the last read; returns how many (a cheap call when there are none)."""
        with self._lock:
            return self._take(self.log.read_from(self._offset, self._log_id))

    def change(self, changes: Sequence[Change]) -> int:
        """Check `changes` (`CatalogueState.check` with this catalogue's limits), append them as one batch and apply
        them; returns the new version. A refused batch raises CatalogueError and writes nothing."""
        changes = list(changes)

        def validate(log_id: str, version: int) -> None:
            # Catch up first: no one else can write while the file lock is held, so the check below is final.
            self._take(self.log.read_from(self._offset, self._log_id))
            if log_id != self._log_id or version != self.state.version:
                raise CatalogueStale(f"{self.log.path} changed under this catalogue: load a new one")
            self.state.check(changes, self.limits)

        with self._lock:
            # Catch up with other writers first (a label another replica just added can be changed here at once),
            # then refuse early, before taking the file lock or creating the file.
            self._take(self.log.read_from(self._offset, self._log_id))
            self.state.check(changes, self.limits)
            version = self.log.append(changes, validate)
            self._take(self.log.read_from(self._offset, self._log_id))
            return version

    def _take(self, read: LogRead) -> int:
        if read.log_id is None:
            return 0
        if self._log_id is None:  # the first sight of this log
            if read.artifact is not None and read.artifact != self.state.artifact_digest:
                raise CatalogueError(
                    f"{self.log.path} was written for another artifact (uids digest {read.artifact}, "
                    f"not {self.state.artifact_digest}): reconcile it with this one first"
                )
            self._log_id, self.state.version = read.log_id, read.base_version
        elif read.log_id != self._log_id:
            raise CatalogueStale(f"{self.log.path} was rewritten (reconciled with another artifact): load a new one")
        n = self.state.apply(read.records)
        self._offset = read.offset
        return n
