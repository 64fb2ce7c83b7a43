import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from training.data import (
    XMCDataset,
    data_fingerprint,
    frequency_order,
    iter_batches,
    make_synthetic,
    permute_labels,
    read_bow,
    read_lf,
    reindex_by_frequency,
    write_bow,
)


def _random_csr(rows, cols, density, values=True):
    m = sp.random(rows, cols, density=density, format="csr", dtype=np.float32, random_state=np.random.default_rng(1))
    if not values:
        m.data[:] = 1
    return m


def test_bow_round_trip(tmp_path):
    features = _random_csr(30, 50, 0.1)
    labels = _random_csr(30, 12, 0.15, values=False)
    labels = sp.csr_matrix(sp.diags((np.arange(30) != 3).astype(np.float32)) @ labels)  # row 3: no labels
    features = sp.csr_matrix(sp.diags((np.arange(30) != 4).astype(np.float32)) @ features)  # row 4: no features
    labels.eliminate_zeros()
    features.eliminate_zeros()
    assert labels[3].nnz == 0 and features[4].nnz == 0 and features.nnz > 100
    write_bow(tmp_path / "trn.txt", features, labels)
    ds = read_bow(tmp_path / "trn.txt")
    assert ds.features.shape == (30, 50) and ds.labels.shape == (30, 12)
    np.testing.assert_allclose(ds.features.toarray(), features.toarray(), rtol=1e-7)
    np.testing.assert_array_equal(ds.labels.toarray(), labels.toarray())
    assert ds.labels.dtype == np.float32 and ds.num_rows == 30 and ds.num_labels == 12
    assert set(ds.sources) == {"trn.txt"}


def test_bow_parses_empty_label_lists_and_blank_lines(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("4 5 3\n0,2 1:0.5 4:2\n 3:1.5\n1\n\n")
    ds = read_bow(path, label_dtype=bool)
    assert ds.labels.dtype == bool
    np.testing.assert_array_equal(ds.labels.toarray(), [[1, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(
        ds.features.toarray(), [[0, 0.5, 0, 0, 2], [0, 0, 0, 1.5, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    )


@pytest.mark.parametrize(
    "content, line, reason",
    [
        ("3 4\n", 1, "header"),
        ("2 x 3\n0 1:1\n1 1:1\n", 1, "header"),
        ("2 4 3\n0 1:1\nx 1:1\n", 3, "label 'x' is not an integer"),
        ("2 4 3\n0 1:1\n0,3 1:1\n", 3, "label 3 out of range [0, 3)"),
        ("2 4 3\n0 1:1\n0 1:abc\n", 3, "feature value 'abc' is not a number"),
        ("2 4 3\n0 1-2\n0 1:1\n", 2, "not of the form index:value"),
        ("2 4 3\n0 9:1\n0 1:1\n", 2, "feature index 9 out of range [0, 4)"),
        ("2 4 3\n0 1:nan\n0 1:1\n", 2, "not finite"),
        ("3 4 3\n0 1:1\n1 2:1\n", 4, "file ends after 2 data lines, the header announces 3"),
        ("1 4 3\n0 1:1\n1 2:1\n", 3, "more data lines than the 1 rows"),
    ],
)
def test_bow_malformed_names_file_line_and_reason(tmp_path, content, line, reason):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        read_bow(path)
    assert f"{path}:{line}: " in str(err.value)
    assert reason in str(err.value)


def _write_lf(directory, rows, label_titles, filters=None, split="trn"):
    directory.mkdir(exist_ok=True)
    with open(directory / f"{split}.json", "w") as f:
        for uid, title, target in rows:
            f.write(json.dumps({"uid": uid, "title": title, "target_ind": target}) + "\n")
    with open(directory / "lbl.json", "w") as f:
        for i, title in enumerate(label_titles):
            f.write(json.dumps({"uid": f"l{i}", "title": title}) + "\n")
    if filters is not None:
        (directory / f"filter_labels_{split}.txt").write_text("".join(f"{r} {c}\n" for r, c in filters))


def test_lf_round_trip(tmp_path):
    rows = [("a", "a : first", [0, 2]), ("b", "b : second", []), ("c", "c : third", [1])]
    _write_lf(tmp_path, rows, ["zero", "one", "two"], filters=[(0, 1), (2, 2)])
    ds = read_lf(tmp_path, "trn")
    assert ds.texts == ["a : first", "b : second", "c : third"]
    assert ds.uids == ["a", "b", "c"]
    assert ds.label_titles == ["zero", "one", "two"] and ds.label_uids == ["l0", "l1", "l2"]
    np.testing.assert_array_equal(ds.labels.toarray(), [[1, 0, 1], [0, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(ds.filters, [[0, 1], [2, 2]])
    assert ds.filter_matrix().toarray().sum() == 2
    assert set(ds.sources) == {"trn.json", "lbl.json", "filter_labels_trn.txt"}

    before = data_fingerprint(ds)
    assert before == data_fingerprint(read_lf(tmp_path, "trn"))
    (tmp_path / "filter_labels_trn.txt").write_text("0 1\n")
    assert data_fingerprint(read_lf(tmp_path, "trn")) != before


def test_lf_without_filter_file(tmp_path):
    _write_lf(tmp_path, [("a", "t", [0])], ["x"], split="tst")
    ds = read_lf(tmp_path, "tst")
    assert ds.filters.shape == (0, 2) and "filter_labels_tst.txt" not in ds.sources


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"uid": "b", "title": "t", "target_ind": [0, 5]}', "label 5 out of range [0, 3)"),
        ('{"uid": "b", "title": "t", "target_ind": 1}', "'target_ind' missing or not a list"),
        ('{"uid": "b", "title": "t", "target_ind": ["1"]}', "label '1' is not an integer"),
        ('{"uid": "b", "target_ind": [1]}', "'title' missing or not a string"),
        ('{"uid": "b", "title": "t", "target_ind": [1]', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_lf_malformed_names_file_line_and_reason(tmp_path, line, reason):
    _write_lf(tmp_path, [("a", "t", [0])], ["x", "y", "z"])
    with open(tmp_path / "trn.json", "a") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError) as err:
        read_lf(tmp_path, "trn")
    assert f"{tmp_path / 'trn.json'}:2: " in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize("content, reason", [("0 1\n1\n", "expected 'row label'"), ("0 1\n0 7\n", "label 7 out of")])
def test_filter_file_malformed(tmp_path, content, reason):
    _write_lf(tmp_path, [("a", "t", [0])], ["x", "y"])
    (tmp_path / "filter_labels_trn.txt").write_text(content)
    with pytest.raises(ValueError, match=rf"filter_labels_trn.txt:2: .*{reason}"):
        read_lf(tmp_path, "trn")


def _title_pairs(ds: XMCDataset, m: sp.csr_matrix) -> set[tuple[int, str]]:
    coo = m.tocoo()
    return {(int(r), ds.label_titles[c]) for r, c in zip(coo.row, coo.col, strict=True)}


def test_reindex_by_frequency_is_consistent():
    train, test = make_synthetic(num_labels=60, num_train=400, num_test=100, seed=3)
    train.filters = np.array([[0, 5], [7, 11]])
    test.filters = np.array([[1, 42]])
    (new_train, new_test), order = reindex_by_frequency(train, test)
    counts = new_train.label_counts()
    assert np.all(np.diff(counts) <= 0) and counts[0] == train.label_counts().max()
    np.testing.assert_array_equal(counts, train.label_counts()[order])
    for old, new in ((train, new_train), (test, new_test)):
        assert _title_pairs(old, old.labels) == _title_pairs(new, new.labels)
        assert _title_pairs(old, old.filter_matrix()) == _title_pairs(new, new.filter_matrix())
        assert new.label_uids == [old.label_uids[i] for i in order]
        assert new.labels.has_sorted_indices
    np.testing.assert_array_equal(frequency_order(new_train.labels), np.arange(60))  # already in order: identity
    with pytest.raises(ValueError, match="not a permutation"):
        permute_labels(train, np.zeros(60, dtype=np.int64))


def test_batches_cover_every_row_and_positive_once():
    train, _ = make_synthetic(num_labels=50, num_train=103, num_test=1, seed=0)
    train.filters = np.array([[5, 1], [5, 2], [80, 7]])
    seen = []
    rebuilt = np.zeros(train.labels.shape)
    filtered = set()
    for b in iter_batches(train, 16, seed=7):
        assert b.rows.dtype == torch.int64 and b.positives.dtype == torch.int64 and b.positives.shape[1] == 2
        rows = b.rows.numpy()
        seen += rows.tolist()
        rebuilt[rows[b.positives[:, 0]], b.positives[:, 1]] += 1
        filtered |= {(int(rows[r]), int(c)) for r, c in b.filtered}
    assert sorted(seen) == list(range(103)) and seen != list(range(103))
    np.testing.assert_array_equal(rebuilt, train.labels.toarray())
    assert filtered == {(5, 1), (5, 2), (80, 7)}


def test_batches_seeded_and_resumable():
    train, _ = make_synthetic(num_labels=20, num_train=50, num_test=1, seed=0)
    rows = lambda **kw: [b.rows.tolist() for b in iter_batches(train, 8, **kw)]
    assert rows(seed=1, epoch=0) == rows(seed=1, epoch=0)
    assert rows(seed=1, epoch=0) != rows(seed=1, epoch=1)
    assert rows(seed=1, epoch=2, start_batch=3) == rows(seed=1, epoch=2)[3:]
    assert rows(shuffle=False)[0] == list(range(8))
    assert [len(r) for r in rows(drop_last=True)] == [8] * 6
    assert [len(r) for r in rows()][-1] == 2


def test_subset_renumbers_filters():
    train, _ = make_synthetic(num_labels=20, num_train=30, num_test=1, seed=0)
    train.filters = np.array([[2, 3], [10, 4]])
    sub = train.subset(np.array([10, 11, 2]))
    np.testing.assert_array_equal(sub.filters, [[2, 3], [0, 4]])
    assert sub.texts == [train.texts[i] for i in (10, 11, 2)]
    np.testing.assert_array_equal(sub.labels.toarray(), train.labels[[10, 11, 2]].toarray())


def test_synthetic_is_seeded_zipfian_and_planted():
    a_train, a_test = make_synthetic(num_labels=200, num_train=3000, num_test=500, seed=5)
    b_train, _ = make_synthetic(num_labels=200, num_train=3000, num_test=500, seed=5)
    c_train, _ = make_synthetic(num_labels=200, num_train=3000, num_test=500, seed=6)
    assert a_train.texts == b_train.texts and (a_train.labels != b_train.labels).nnz == 0
    assert a_train.texts != c_train.texts
    assert data_fingerprint(a_train) == data_fingerprint(b_train) != data_fingerprint(c_train)
    assert a_train.num_rows == 3000 and a_test.num_rows == 500 and a_test.num_labels == 200
    counts = np.sort(a_train.label_counts())[::-1]
    assert counts[0] > 20 * max(counts[100], 1)  # head labels far more frequent than the middle
    assert frequency_order(a_train.labels)[0] != 0  # ranks are not the ids
    for i in range(20):  # every label of a point plants at least one of its title words in the text
        words = set(a_train.texts[i].split())
        for lab in a_train.labels[i].indices:
            assert words & set(a_train.label_titles[lab].split())


def test_smoke_read_debian_tags(debian_tags):
    train = read_lf(debian_tags, "trn")
    test = read_lf(debian_tags, "tst")
    assert (train.num_rows, train.num_labels, train.labels.nnz) == (21816, 598, 81286)  # README statistics
    assert (test.num_rows, test.labels.nnz) == (5454, 19464)
    assert len(train.filters) == 0 and train.texts[0].startswith(train.uids[0] + " : ")
    (new_train, _), _ = reindex_by_frequency(train, test)
    assert new_train.label_uids[:2] == ["devel::library", "role::shared-lib"]
    assert len(data_fingerprint(train, test)) == 64


def test_smoke_read_debian_deps_filters(debian_deps):
    train = read_lf(debian_deps, "trn")
    assert (train.num_rows, train.num_labels, train.labels.nnz, len(train.filters)) == (40952, 42242, 215468, 27846)
    # a package is never its own label: the filter pairs are not positives
    assert train.labels.multiply(train.filter_matrix()).nnz == 0
