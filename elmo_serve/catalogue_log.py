"""The catalogue log: a durable, crc32-framed JSON-lines file of label changes beside an artifact.

`elmo_serve.catalogue` replays it into the live catalogue (`Catalogue`, `CatalogueState`) and reconciles it with a
retrained artifact; this module owns the file format and its reading and writing. Pure Python: no Ray, torch or HTTP.

The file: one record a line, each framed so that a torn or damaged line is detectable,

    <crc32 of the JSON bytes, 8 lowercase hex digits> <JSON object, UTF-8, no raw newline>\\n

Line 1 is a header, {"log": "elmo-catalogue", "format": 1, "log_id": hex, "version": V, "artifact": digest | null,
"time": t}. Every later line is a change, {"version": v, "op": "add" | "update" | "retire", "uid": str, "title": str
(add and update only), "time": t, "batch_end": e}: versions go up by one a line from the header's, and `batch_end`,
the version of the last record of the change's batch, lets a reader apply a batch whole or not at all.

- A line without its newline, or bad lines (checksum, framing, JSON) with nothing valid after them, are a write in
  progress or a torn tail (a crash mid-write): readers stop before them and the next writer truncates them away with
  a `CatalogueWarning`; an unfinished batch at the end counts as torn too. A bad line followed by a valid one, or a
  well-framed line that breaks the format, is corruption: `CatalogueCorrupt` names the file and the line.
- Writers append a batch as one write, then fsync, under a thread lock and an exclusive `flock` on the file, so the
  threads of a replica and the replicas of one host may all write; readers take no lock.
- A rewrite (reconciliation with a retrained artifact) writes a temporary file beside the log, fsyncs it and
  `os.replace`s the log with it under a new `log_id` and a higher version, so followers notice and reload.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

FORMAT = 1
OPS = ("add", "update", "retire")
_MAGIC = "elmo-catalogue"
_CRC = re.compile(rb"[0-9a-f]{8}")


class CatalogueError(ValueError):
    """A change that does not apply (unknown or existing uid, bad title, batch too big), or a log that does not fit."""


class CatalogueCorrupt(CatalogueError):
    """A log damaged before its end (not a torn tail): the message names the file and the line."""


class CatalogueWarning(UserWarning):
    """Bytes of a torn or unfinished record at the end of a log were ignored or dropped."""


@dataclass(frozen=True)
class Limits:
    """What one batch of changes may hold; applied to new changes only, never to records already in a log."""

    max_batch: int = 1_000  # changes per batch (one POST /v1/labels)
    max_title_chars: int = 1_000  # Debian titles run to ~200; room for a long product name
    max_uid_chars: int = 256


@dataclass(frozen=True)
class Change:
    """One requested change: add (uid, title), update (uid, title) or retire (uid)."""

    op: Literal["add", "update", "retire"]
    uid: str
    title: str | None = None


@dataclass(frozen=True)
class Record:
    """A change as the log holds it: `version` is the catalogue version once it applies."""

    version: int
    op: str
    uid: str
    title: str | None
    time: float
    batch_end: int


@dataclass(frozen=True)
class LogRead:
    """What one read of a log found after an offset: whole batches only.

    `offset` is where the next read starts (just past the last whole batch); `pending` counts the bytes after it
    (a write in progress or a torn tail). `log_id` is None while no log exists; a follower that sees it change must
    rebuild its state (the log was rewritten). `base_version` is the header's version."""

    records: list[Record]
    offset: int
    log_id: str | None
    base_version: int
    artifact: str | None
    pending: int


def uids_digest(uids: Iterable[str]) -> str:
    """A short fingerprint of an artifact's uids in id order; a log records the artifact it was written for."""
    return hashlib.sha256("\0".join(uids).encode()).hexdigest()[:16]


def check_change(change: Change, limits: Limits | None = None) -> None:
    """Raise CatalogueError unless `change` is well formed (and, given `limits`, within them)."""
    op, uid, title = change.op, change.uid, change.title
    if op not in OPS:
        raise CatalogueError(f"unknown op {op!r}: one of {', '.join(OPS)}")
    if not isinstance(uid, str) or not uid.strip():
        raise CatalogueError(f"{op}: uid {uid!r} is not a non-empty string")
    if limits is not None and len(uid) > limits.max_uid_chars:
        raise CatalogueError(f"{op} {uid[:40]!r}...: uid of {len(uid)} characters, at most {limits.max_uid_chars}")
    if op == "retire":
        if title is not None:
            raise CatalogueError(f"retire {uid!r}: a retirement takes no title")
        return
    if not isinstance(title, str) or not title.strip():
        raise CatalogueError(f"{op} {uid!r}: title {title!r} is empty or not a string")
    if limits is not None and len(title) > limits.max_title_chars:
        raise CatalogueError(f"{op} {uid!r}: title of {len(title)} characters, at most {limits.max_title_chars}")


# --- the file format ---------------------------------------------------------------------------------------------


def _frame(obj: dict) -> bytes:
    # json.dumps escapes control characters, so a record never holds a raw newline.
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _unframe(line: bytes) -> dict | str:
    """The object a line holds, or why the line is bad."""
    if len(line) < 10 or line[8:9] != b" " or not _CRC.fullmatch(line[:8]):
        return "not a '<crc32> <json>' line"
    body = line[9:]
    if zlib.crc32(body) != int(line[:8], 16):
        return "checksum mismatch"
    try:
        obj = json.loads(body)
    except ValueError:
        return "not JSON"
    return obj if isinstance(obj, dict) else "not a JSON object"


def _encode(rec: Record) -> bytes:
    obj = {"version": rec.version, "op": rec.op, "uid": rec.uid}
    if rec.title is not None:
        obj["title"] = rec.title
    return _frame(obj | {"time": rec.time, "batch_end": rec.batch_end})


def _header(log_id: str, version: int, artifact: str | None) -> bytes:
    obj = {"log": _MAGIC, "format": FORMAT, "log_id": log_id, "version": version, "artifact": artifact}
    return _frame(obj | {"time": time.time()})


class _Bad(Exception):
    def __init__(self, offset: int, why: str):
        self.offset, self.why = offset, why


def _record(obj: dict, offset: int) -> Record:
    v, end, t = obj.get("version"), obj.get("batch_end"), obj.get("time")
    if "log" in obj:
        raise _Bad(offset, "a header after the first line")
    if type(v) is not int or type(end) is not int or end < v:
        raise _Bad(offset, f"bad version {v!r} / batch_end {end!r}")
    if type(t) not in (int, float):
        raise _Bad(offset, f"bad time {t!r}")
    rec = Record(version=v, op=obj.get("op"), uid=obj.get("uid"), title=obj.get("title"), time=t, batch_end=end)
    try:
        check_change(Change(rec.op, rec.uid, rec.title))
    except CatalogueError as e:
        raise _Bad(offset, str(e)) from None
    return rec


def _parse(data: bytes, start: int, expect: int | None) -> tuple[list[Record], int]:
    """The whole batches in `data` (the file from byte `start`), and the offset just past the last of them.
    `expect`: the version the first record must have (None: whatever it has). Raises _Bad for corruption."""
    done: list[Record] = []
    batch: list[Record] = []
    end, pos, bad = start, 0, None
    while (nl := data.find(b"\n", pos)) >= 0:
        at, obj = start + pos, _unframe(data[pos:nl])
        pos = nl + 1
        if isinstance(obj, str):
            bad = bad or _Bad(at, obj)  # torn if nothing valid follows
            continue
        if bad is not None:
            raise _Bad(bad.offset, f"{bad.why}, and valid records follow")
        rec = _record(obj, at)
        if expect is not None and rec.version != expect:
            raise _Bad(at, f"version {rec.version} where {expect} was due")
        if batch and rec.batch_end != batch[-1].batch_end:
            raise _Bad(at, f"the batch ending at version {batch[-1].batch_end} stops at {batch[-1].version}")
        batch.append(rec)
        expect = rec.version + 1
        if rec.version == rec.batch_end:
            done += batch
            batch, end = [], start + pos
    return done, end


def _pread(fd: int, size: int, offset: int) -> bytes:
    parts = []
    while size > 0 and (chunk := os.pread(fd, size, offset)):
        parts.append(chunk)
        size, offset = size - len(chunk), offset + len(chunk)
    return b"".join(parts)


def _corrupt(fd: int, path: Path, bad: _Bad) -> CatalogueCorrupt:
    line = _pread(fd, bad.offset, 0).count(b"\n") + 1
    return CatalogueCorrupt(
        f"{path}: line {line} (byte {bad.offset}): {bad.why}; the log is damaged before its end "
        "(not a torn last record): restore it or repair it by hand"
    )


def _read_header(fd: int, path: Path) -> tuple[dict | None, int, int]:
    """(header or None when there is none yet, offset past it, file size)."""
    size = os.fstat(fd).st_size
    head = _pread(fd, min(size, 1 << 16), 0)
    nl = head.find(b"\n")
    obj = _unframe(head[:nl]) if nl >= 0 else "no header yet"
    if isinstance(obj, str):
        if nl < 0 or nl + 1 == size:  # a header being written, or torn: nothing to read yet
            return None, 0, size
        raise _corrupt(fd, path, _Bad(0, f"bad header: {obj}"))
    if obj.get("log") != _MAGIC or obj.get("format") != FORMAT or type(obj.get("version")) is not int:
        raise _corrupt(fd, path, _Bad(0, f"not a format-{FORMAT} catalogue log header"))
    return obj, nl + 1, size


def _read(fd: int, path: Path, offset: int, log_id: str | None = None, expect: int | None = None) -> LogRead:
    header, first, size = _read_header(fd, path)
    if header is None:
        return LogRead([], 0, None, 0, None, pending=size)
    if log_id is not None and header["log_id"] != log_id:  # replaced: `offset` means nothing in this file
        return LogRead([], 0, header["log_id"], header["version"], header.get("artifact"), pending=0)
    start = max(offset, first)
    if start > size:
        raise CatalogueCorrupt(f"{path}: {size} bytes, shorter than the offset {offset} read before: it was truncated")
    if start == first:
        expect = header["version"] + 1
    try:
        records, end = _parse(_pread(fd, size - start, start), start, expect)
    except _Bad as e:
        raise _corrupt(fd, path, e) from None
    return LogRead(records, end, header["log_id"], header["version"], header.get("artifact"), pending=size - end)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes, exclusive: bool) -> bool:
    """Write `data` to a temporary file beside `path`, fsync it, then put it at `path`: by os.replace, or (exclusive)
    by a hard link that fails when `path` exists. False when it existed. Either way `path` is never half written."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)  # the new name must survive a crash too
    return True


def renumbered(records: Sequence[Record], base: int) -> list[Record]:
    """`records` numbered base+1, base+2, ..., each run of one batch still one batch (a filtered batch stays whole)."""
    out, v, i = [], base, 0
    while i < len(records):
        j = i
        while j < len(records) and records[j].batch_end == records[i].batch_end:
            j += 1
        end = v + j - i
        out += [replace(r, version=v + 1 + k, batch_end=end) for k, r in enumerate(records[i:j])]
        v, i = end, j
    return out


# --- the log -----------------------------------------------------------------------------------------------------


class CatalogueLog:
    """The catalogue log at `path`: lock-free reads by any process, appends and rewrites by any thread or process.

    `artifact` (a `uids_digest`) goes into the header when this object creates the file. Appends are serialised by a
    thread lock and an exclusive flock on the file (local filesystems; flock is not reliable over NFS)."""

    def __init__(self, path: str | os.PathLike, artifact: str | None = None):
        self.path = Path(path)
        self.artifact = artifact
        self._lock = threading.Lock()
        self._tail_at: tuple[str, int, int] | None = None  # (log_id, offset, version) of the end this writer knows

    def read_from(self, offset: int = 0, log_id: str | None = None) -> LogRead:
        """The whole batches after byte `offset` (0, or the `offset` of an earlier read, whose `log_id` to pass).

        When the log is no longer `log_id` (rewritten since), nothing is read and the answer carries the new
        `log_id`, `offset` 0: the follower rebuilds its state and reads again from 0. Never acts on a line being
        written: a line without its newline, a torn tail or an unfinished batch at the end stay unread (counted in
        `pending`). A missing file reads as an empty log with `log_id` None. Raises CatalogueCorrupt for damage
        before the end."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return LogRead([], 0, None, 0, None, pending=0)
        try:
            return _read(fd, self.path, offset, log_id)
        finally:
            os.close(fd)

    def append(self, changes: Sequence[Change], validate: Callable[[str, int], None] | None = None) -> int:
        """Append `changes` as one batch, in one write, flushed and fsync'd; returns the new version.

        The file (with its header) is created on first use. Under the lock, a torn tail is truncated away (with a
        CatalogueWarning saying how many bytes), then `validate(log_id, version)` runs, with the log's current
        version, while no one else can write: it raises to refuse the batch, and then nothing is written. Changes
        must be well formed (`check_change`); checking them against the catalogue is `validate`'s job."""
        changes = list(changes)
        if not changes:
            raise CatalogueError("a batch needs at least one change")
        for c in changes:
            check_change(c)
        with self._lock, self._locked() as fd:
            log_id, end, version = self._tail(fd)
            if validate is not None:
                validate(log_id, version)
            now, last = time.time(), version + len(changes)
            data = b"".join(
                _encode(Record(version + 1 + i, c.op, c.uid, c.title, now, last)) for i, c in enumerate(changes)
            )
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, end)  # no half batch left behind when the disk is full or the write is interrupted
                raise
            self._tail_at = (log_id, end + len(data), last)
            return last

    def rewrite(self, records: Sequence[Record], expected_version: int, artifact: str | None) -> int:
        """Replace the log atomically by a new one (new `log_id`, header version `expected_version + 1`, written for
        `artifact`) holding `records` renumbered after it; returns the new version.

        Refused (CatalogueError, nothing written) when the log is no longer at `expected_version`: changes arrived
        since `records` were computed. Followers of the old file see the new `log_id` and must rebuild."""
        with self._lock, self._locked() as fd:
            _, _, version = self._tail(fd)
            if version != expected_version:
                raise CatalogueError(
                    f"{self.path} is at version {version}, not {expected_version}: it changed since "
                    "the records to keep were computed; compute them again"
                )
            log_id, base = uuid.uuid4().hex, version + 1
            head, body = _header(log_id, base, artifact), b"".join(map(_encode, renumbered(records, base)))
            _write_new(self.path, head + body, exclusive=False)
            self.artifact, self._tail_at = artifact, (log_id, len(head) + len(body), base + len(records))
            return base + len(records)

    @contextmanager
    def _locked(self) -> Iterator[int]:
        """An fd of the log (created if missing), opened for append and holding its exclusive flock."""
        while True:
            if not self.path.exists():
                _write_new(self.path, _header(uuid.uuid4().hex, 0, self.artifact), exclusive=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                st, now = os.fstat(fd), os.stat(self.path)
            except BaseException:
                os.close(fd)
                raise
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                break
            os.close(fd)  # rewritten while we waited for the lock: lock the new file
        try:
            yield fd
        finally:
            os.close(fd)  # releases the flock

    def _tail(self, fd: int) -> tuple[str, int, int]:
        """(log_id, end offset, version) of the log under the lock, a torn tail truncated away first."""
        header, _, _ = _read_header(fd, self.path)
        at = self._tail_at
        if header is not None and at is not None and header["log_id"] == at[0]:
            # Only what others appended since our last write.
            read = _read(fd, self.path, at[1], at[0], expect=at[2] + 1)
            version = read.records[-1].version if read.records else at[2]
        else:
            read = _read(fd, self.path, 0)
            version = read.records[-1].version if read.records else read.base_version
        if read.pending:
            warnings.warn(
                f"{self.path}: dropped {read.pending} bytes at the end (offset {read.offset}): a torn or "
                "unfinished record of a write that did not complete",
                CatalogueWarning,
                stacklevel=3,
            )
            os.ftruncate(fd, read.offset)
            os.fsync(fd)
        if read.log_id is None:  # an empty file (not one of ours: we create logs whole): give it a header
            log_id, version = uuid.uuid4().hex, 0
            os.write(fd, _header(log_id, version, self.artifact))
            os.fsync(fd)
            return log_id, os.fstat(fd).st_size, version
        return read.log_id, read.offset, version
