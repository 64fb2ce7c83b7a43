"""The catalogue log: framing, replay, torn tails, corruption, followers, concurrent writers, validation, reconcile."""

import json
import os
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import pytest

from elmo_serve import catalogue as cat
from elmo_serve import catalogue_log as cat_log
from elmo_serve.catalogue import Catalogue, CatalogueStale, CatalogueState, reconcile, reconcile_log
from elmo_serve.catalogue_log import CatalogueCorrupt, CatalogueError, CatalogueLog, CatalogueWarning, Change, Limits

UIDS = ["python3", "gcc", "make", "vim"]
TITLES = ["Python 3", "GNU C compiler", "make utility", "Vi IMproved"]
REPO = Path(__file__).resolve().parents[2]


def add(uid, title=None):
    return Change("add", uid, title or f"title of {uid}")


def update(uid, title):
    return Change("update", uid, title)


def retire(uid):
    return Change("retire", uid)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "catalogue.log"


def fresh(path, uids=UIDS, titles=TITLES, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CatalogueWarning)  # a clean log replays without a warning
        return Catalogue(path, uids, titles, **kw)


def snapshot(c):
    return c.version, c.state.labels()


def lines(path):
    return path.read_bytes().splitlines(keepends=True)


def test_append_and_replay_give_the_same_state(path):
    c = fresh(path)
    assert c.version == 0 and not path.exists()
    assert c.change([add("git", "Git"), update("gcc", "GNU C")]) == 2
    assert c.change([retire("vim"), add("curl")]) == 4
    assert c.change([update("git", "Git, the VCS")]) == 5
    got = {x.uid: x for x in c.state.labels()}
    assert [x.id for x in c.state.labels()] == list(range(6))
    assert got["git"] == cat.Label(4, "git", "Git, the VCS", False)
    assert got["curl"].id == 5 and got["vim"].retired and got["gcc"].title == "GNU C"
    assert got["python3"] == cat.Label(0, "python3", "Python 3", False)
    assert snapshot(fresh(path)) == snapshot(c)
    # Without titles, untouched artifact labels have none; the log's titles still replay.
    bare = Catalogue(path, UIDS)
    assert bare.state.get("python3").title is None and bare.state.get("git").title == "Git, the VCS"


def test_record_format(path):
    c = fresh(path)
    c.change([add("git", "Git \u00e9\nnewline"), retire("vim")])
    raw = lines(path)
    assert len(raw) == 3 and all(x.endswith(b"\n") and x.count(b"\n") == 1 for x in raw)
    objs = []
    for line in raw:
        crc, body = line[:-1].split(b" ", 1)
        assert len(crc) == 8 and int(crc, 16) == zlib.crc32(body)
        objs.append(json.loads(body))
    head, a, r = objs
    assert head["log"] == "elmo-catalogue" and head["format"] == 1 and head["version"] == 0
    assert head["artifact"] == c.state.artifact_digest
    assert a["version"] == 1 and a["op"] == "add" and a["uid"] == "git" and a["title"] == "Git \u00e9\nnewline"
    assert r["version"] == 2 and r["op"] == "retire" and "title" not in r
    assert a["batch_end"] == r["batch_end"] == 2 and a["time"] == r["time"] > 0


def _cut_mid_line(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


def _garble_last_checksum(path):
    raw = lines(path)
    raw[-1] = (b"0" if raw[-1][:1] != b"0" else b"1") + raw[-1][1:]
    path.write_bytes(b"".join(raw))


def _cut_last_line_of_batch(path):  # a batch of two whose second line never reached the disk
    raw = lines(path)
    path.write_bytes(b"".join(raw[:-1]))


def _zeros_at_end(path):  # a crash can leave a zero-filled block past the last write
    with open(path, "ab") as f:
        f.write(b"\0" * 100)


@pytest.mark.parametrize("damage", [_cut_mid_line, _garble_last_checksum, _cut_last_line_of_batch, _zeros_at_end])
def test_torn_last_record_is_dropped_then_truncated_by_the_next_append(path, damage):
    c = fresh(path)
    c.change([add("git")])
    c.change([retire("vim")])
    intact = path.read_bytes()
    c.change([add("curl"), update("gcc", "GNU C")])
    damage(path)
    torn = path.stat().st_size
    with pytest.warns(CatalogueWarning, match="ignored"):
        again = Catalogue(path, UIDS, TITLES)
    expect, dropped = (4, 100) if damage is _zeros_at_end else (2, torn - len(intact))  # a torn batch goes whole
    assert again.version == expect
    assert (again.state.get("curl") is None) == (expect == 2) and again.state.get("vim").retired
    with pytest.warns(CatalogueWarning, match=rf"dropped {dropped} bytes"):
        assert again.change([add("emacs")]) == expect + 1
    assert again.state.get("emacs").id == (5 if expect == 2 else 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert snapshot(Catalogue(path, UIDS, TITLES)) == snapshot(again)
        assert path.read_bytes().startswith(intact)


def test_corruption_in_the_middle_raises_naming_file_and_line(path):
    c = fresh(path)
    for u in ("git", "curl", "emacs"):
        c.change([add(u)])
    raw = lines(path)
    garbled = list(raw)
    garbled[2] = garbled[2].replace(b"curl", b"cURL")  # checksum no longer matches; valid records follow
    path.write_bytes(b"".join(garbled))
    with pytest.raises(CatalogueCorrupt, match=rf"{path}: line 3 .*checksum mismatch, and valid records follow"):
        Catalogue(path, UIDS, TITLES)
    with pytest.raises(CatalogueCorrupt, match="line 3"):
        CatalogueLog(path).append([add("x")])
    assert b"".join(garbled) == path.read_bytes()  # the writer did not "repair" it

    path.write_bytes(b"".join(raw[:2] + raw[3:]))  # a record missing: version 3 where 2 was due
    with pytest.raises(CatalogueCorrupt, match="line 3 .*version 3 where 2 was due"):
        CatalogueLog(path).read_from(0)
    path.write_bytes(b"not a header\n" + b"".join(raw[1:]))
    with pytest.raises(CatalogueCorrupt, match="line 1"):
        CatalogueLog(path).read_from(0)


def _follow(log, until, out, stop):
    offset, log_id = 0, None
    while True:
        done = stop.is_set()
        read = log.read_from(offset, log_id)
        assert log_id is None or read.log_id == log_id
        log_id = read.log_id or log_id
        out.extend(read.records)
        offset = read.offset
        if done or (out and out[-1].version >= until):
            return


def _check_followed(records, batches):
    assert [r.version for r in records] == list(range(1, len(records) + 1))  # in order, none twice, none missed
    ends = sorted({r.batch_end for r in records})
    assert len(ends) == batches
    for end in ends:  # whole batches only: each a run of versions closed by its batch_end
        versions = [r.version for r in records if r.batch_end == end]
        assert versions == list(range(versions[0], end + 1))


def test_a_follower_thread_sees_whole_batches_in_order(path):
    log, sizes = CatalogueLog(path), [1 + i % 5 for i in range(150)]
    out, stop = [], threading.Event()
    follower = threading.Thread(target=_follow, args=(log, sum(sizes), out, stop))
    follower.start()
    n = 0
    for s in sizes:  # long titles: a batch spans several pages of the file
        n = log.append([add(f"u{n + k}", "x" * 900) for k in range(s)])
    stop.set()
    follower.join(10)
    assert not follower.is_alive()
    _check_followed(out, len(sizes))
    assert len(out) == sum(sizes)


_WRITER = """
import sys
from elmo_serve.catalogue_log import CatalogueLog, Change
log = CatalogueLog(sys.argv[1])
for i in range(int(sys.argv[2])):
    log.append([Change("add", f"{sys.argv[3]}{i}-{k}", "y" * 700) for k in range(1 + i % 4)])
"""


def _writer(path, batches, prefix):
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(batches), prefix], cwd=REPO)


def test_a_follower_process_and_writer_processes(path):
    # A Catalogue (a replica) follows two writer processes appending at once: flock keeps their batches whole.
    c = Catalogue(path, UIDS, TITLES)
    procs = [_writer(path, 60, "a"), _writer(path, 60, "b")]
    total, deadline = 2 * sum(1 + i % 4 for i in range(60)), time.monotonic() + 20
    try:
        while c.version < total and time.monotonic() < deadline:
            c.refresh()
            assert all(p.poll() in (None, 0) for p in procs)
        assert [p.wait(10) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
    _check_followed(c.state.records, 120)
    for r in c.state.records:  # a batch holds one writer's changes, in its order
        same = [x for x in c.state.records if x.batch_end == r.batch_end]
        assert {x.uid[0] for x in same} == {r.uid[0]}
    assert snapshot(Catalogue(path, UIDS, TITLES)) == snapshot(c)


_READER = """
import json, sys, time
from elmo_serve.catalogue_log import CatalogueLog
log, out, offset, log_id, deadline = CatalogueLog(sys.argv[1]), [], 0, None, time.monotonic() + 20
while (not out or out[-1] < int(sys.argv[2])) and time.monotonic() < deadline:
    read = log.read_from(offset, log_id)
    offset, log_id = read.offset, read.log_id
    out += [r.version for r in read.records]
print(json.dumps(out))
"""


def test_a_reader_process_follows_this_writer(path):
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(path), "300"], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        log, n = CatalogueLog(path), 0
        while n < 300:
            n = log.append([add(f"u{n + k}", "z" * 500) for k in range(3)])
        out, _ = reader.communicate(timeout=20)
    finally:
        reader.kill()
    assert json.loads(out) == list(range(1, 301))


@pytest.mark.parametrize("shared", [True, False], ids=["one-catalogue", "a-catalogue-per-thread"])
def test_concurrent_appends_from_threads_do_not_interleave(path, shared):
    # One Catalogue shared (its lock and the log's), or one per thread (separate fds: the flock, and the catch-up
    # under it, keep them apart).
    one = Catalogue(path, UIDS, TITLES)

    def work(t):
        c = one if shared else Catalogue(path, UIDS, TITLES)
        for i in range(25):
            c.change([add(f"t{t}-{i}-{k}", "w" * 300) for k in range(4)])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    one.refresh()
    replayed = Catalogue(path, UIDS, TITLES)
    assert replayed.version == one.version == 400
    _check_followed(replayed.state.records, 100)
    for r in replayed.state.records:
        batch = [x.uid for x in replayed.state.records if x.batch_end == r.batch_end]
        assert len(batch) == 4 and len({u.rsplit("-", 1)[0] for u in batch}) == 1
    assert snapshot(replayed) == snapshot(one)


@pytest.mark.parametrize(
    "changes, match",
    [
        ([add("gcc")], "change 0: add 'gcc': the uid exists"),
        ([add("git"), add("git")], "change 1: uid 'git' is changed twice in one batch"),
        ([add("git"), update("git", "Git")], "changed twice in one batch"),
        ([add("git"), update("nope", "T")], "change 1: update 'nope': unknown uid"),
        ([retire("nope")], "unknown uid"),
        ([add("git", "   ")], "title '   ' is empty"),
        ([update("gcc", "")], "is empty"),
        ([Change("add", "git", None)], "is empty or not a string"),
        ([Change("add", "", "T")], "uid '' is not a non-empty string"),
        ([Change("retire", "gcc", "T")], "takes no title"),
        ([Change("rename", "gcc", "T")], "unknown op 'rename'"),
        ([add("git", "t" * 101)], "title of 101 characters, at most 100"),
        ([add("u" * 41)], "uid of 41 characters, at most 40"),
        ([add(f"n{i}") for i in range(11)], "11 changes in one batch: at most 10"),
        ([], "at least one change"),
    ],
)
def test_validation_errors_write_nothing(path, changes, match):
    c = fresh(path, limits=Limits(max_batch=10, max_title_chars=100, max_uid_chars=40))
    with pytest.raises(CatalogueError, match=match):
        c.change(changes)
    assert not path.exists() and c.version == 0
    c.change([add("first")])
    before = path.read_bytes()
    with pytest.raises(CatalogueError, match=match):
        c.change(changes)
    assert path.read_bytes() == before and c.version == 1


def test_a_retired_uid_is_a_tombstone(path):
    c = fresh(path)
    c.change([add("git"), retire("vim")])
    c.change([retire("git")])
    before = path.read_bytes()
    for bad, match in [
        (add("vim"), "the uid was retired .*never reused"),
        (add("git"), "the uid was retired"),
        (update("vim", "Vim"), "the label is retired"),
        (retire("git"), "the label is retired"),
    ]:
        with pytest.raises(CatalogueError, match=match):
            c.change([bad])
    assert path.read_bytes() == before
    assert c.state.get("git") == cat.Label(4, "git", "title of git", True)


def test_duplicate_or_empty_artifact_uids_are_refused():
    with pytest.raises(CatalogueError, match="artifact uid 'gcc' appears twice .*1 and 3"):
        CatalogueState(["python3", "gcc", "make", "gcc"])
    with pytest.raises(CatalogueError, match="label 1: uid ''"):
        CatalogueState(["python3", ""])
    with pytest.raises(CatalogueError, match="2 artifact titles for 3 uids"):
        CatalogueState(["a", "b", "c"], ["A", "B"])


def test_a_stale_replica_cannot_add_what_another_replica_added(path):
    a, b = fresh(path), fresh(path)
    a.change([add("git", "Git")])
    before = path.read_bytes()
    with pytest.raises(CatalogueError, match="add 'git': the uid exists"):
        b.change([add("git", "Git too")])  # b had not seen it: the check under the file lock catches up first
    assert path.read_bytes() == before
    assert b.change([update("git", "Git!")]) == 2 and a.refresh() == 1
    assert snapshot(a) == snapshot(b)


def test_reconcile_keeps_what_still_matters(path):
    c = fresh(path)
    c.change([add("git", "Git"), add("curl", "cURL"), update("gcc", "GNU C")])
    c.change([update("git", "Git VCS"), retire("vim"), retire("curl")])
    c.change([add("emacs", "Emacs"), retire("make")])
    # The retrain picked up git, dropped make, kept vim (retired) and gcc; curl and emacs are not in it.
    new_uids = ["python3", "gcc", "vim", "git", "zsh"]
    kept = reconcile(c.state.records, new_uids)
    assert kept == c.state.reconcile(new_uids)
    assert [(r.op, r.uid) for r in kept] == [
        ("add", "curl"),
        ("update", "gcc"),
        ("update", "git"),
        ("retire", "vim"),
        ("retire", "curl"),
        ("add", "emacs"),
    ]


def test_the_rewritten_log_replays_to_the_same_state_minus_what_was_reconciled(path):
    c = fresh(path)
    c.change([add("git", "Git"), add("curl", "cURL"), update("gcc", "GNU C")])
    c.change([update("git", "Git VCS"), retire("vim"), retire("curl")])
    c.change([add("emacs", "Emacs"), retire("make")])
    old_id = json.loads(lines(path)[0][9:])["log_id"]
    new_uids, new_titles = ["python3", "gcc", "vim", "git", "zsh"], ["Py", "gcc", "vim", "git (trained)", "Z shell"]
    assert reconcile_log(path, new_uids, new_titles) == c.version + 1 + 6
    tmp_left = [p.name for p in path.parent.iterdir() if p.name != path.name]
    assert tmp_left == []
    head = json.loads(lines(path)[0][9:])
    assert (
        head["version"] == c.version + 1
        and head["log_id"] != old_id
        and head["artifact"] == cat_log.uids_digest(new_uids)
    )

    n = fresh(path, new_uids, new_titles)
    assert n.version == c.version + 7
    got = {x.uid: (x.id, x.title, x.retired) for x in n.state.labels()}
    assert got == {
        "python3": (0, "Py", False),
        "gcc": (1, "GNU C", False),  # the log's update stays
        "vim": (2, "vim", True),  # still retired
        "git": (3, "Git VCS", False),  # now an artifact label; its update stays
        "zsh": (4, "Z shell", False),
        "curl": (5, "cURL", True),  # added by the log, not in the artifact: it and its tombstone stay
        "emacs": (6, "Emacs", False),
    }
    # The same catalogue minus what the retrain changed (make dropped, zsh new, the artifact's own titles).
    live = {x.uid for x in c.state.labels() if not x.retired} - {"make"}
    assert {x.uid for x in n.state.labels() if not x.retired} == live | {"zsh"}
    assert {x.uid for x in n.state.labels() if x.retired} == {x.uid for x in c.state.labels() if x.retired} - {"make"}
    with pytest.raises(CatalogueStale, match="rewritten"):
        c.refresh()
    with pytest.raises(CatalogueStale):
        c.change([add("late")])
    assert n.change([add("fish")]) == n.version == c.version + 8
    with pytest.raises(CatalogueError, match="written for another artifact"):
        Catalogue(path, UIDS, TITLES)  # the old artifact cannot read the reconciled log


def test_a_follower_of_a_replaced_log_is_told_so_whatever_its_offset(path):
    c = fresh(path)
    c.change([add("git", "Git")])
    c.change([add("curl", "cURL")])
    seen = CatalogueLog(path).read_from(0)
    offset, log_id = seen.offset, seen.log_id
    # A longer file under a new log_id: the old offset falls mid-line in it; it must read as "replaced", not corrupt.
    longer = [cat_log.Record(1 + i, "add", u, "long " * 40, 0.0, 1 + i) for i, u in enumerate(["n0", "m0", "m1", "m2"])]
    longer += [cat_log.Record(5, "add", "m3", "long", 0.0, 6), cat_log.Record(6, "add", "m4", "long", 0.0, 6)]
    assert CatalogueLog(path).rewrite(longer, expected_version=2, artifact=c.state.artifact_digest) == 9
    assert path.stat().st_size > offset
    read = CatalogueLog(path).read_from(offset, log_id)
    assert read.log_id != log_id and read.records == [] and read.offset == 0
    with pytest.raises(CatalogueStale, match="rewritten"):
        c.refresh()
    assert [r.uid for r in fresh(path).state.records] == ["n0"] + [f"m{i}" for i in range(5)]


def test_a_rewrite_is_refused_when_the_log_moved_on(path):
    c = fresh(path)
    c.change([add("git")])
    log = CatalogueLog(path)
    kept = reconcile(c.state.records, UIDS)
    c.change([add("curl")])
    before = path.read_bytes()
    with pytest.raises(CatalogueError, match="is at version 2, not 1"):
        log.rewrite(kept, expected_version=1, artifact=None)
    assert path.read_bytes() == before
    with pytest.raises(CatalogueError, match="appears twice"):
        reconcile_log(path, ["git", "git"])  # checked before anything is written
    assert path.read_bytes() == before


def test_the_version_is_monotonic_across_reopen_and_rewrite(path):
    versions = []
    for i in range(3):
        c = fresh(path)
        versions += [c.version, c.change([add(f"r{i}")])]
    reconcile_log(path, UIDS + ["r0"])
    c = fresh(path, UIDS + ["r0"], None)
    versions += [c.version, c.change([add("r3")])]
    reconcile_log(path, UIDS + ["r0", "r1", "r2", "r3"])  # every added label folded in: the log keeps no change
    versions.append(fresh(path, UIDS + ["r0", "r1", "r2", "r3"], None).version)
    # Each reopen starts where the log ended; a rewrite counts one version, then its kept records (r1, r2), then on.
    assert versions == [0, 1, 1, 2, 2, 3, 6, 7, 8]
    assert len(lines(path)) == 1  # only the header: every added label now lives in the artifact


def test_a_failed_write_leaves_no_half_batch(path, monkeypatch):
    c = fresh(path)
    c.change([add("git")])
    before = path.read_bytes()
    real = os.write

    def half_then_fail(fd, data):
        real(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cat_log.os, "write", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        c.change([add("curl"), add("emacs")])
    monkeypatch.undo()
    assert path.read_bytes() == before and c.version == 1
    assert c.change([add("curl")]) == 2
    assert snapshot(fresh(path)) == snapshot(c)
