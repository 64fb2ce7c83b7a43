"""XMC data: Extreme Classification Repository readers, label re-indexing, batches, fingerprints, synthetic data.

Two on-disk formats are read, each into an `XMCDataset` whose labels are a scipy CSR matrix (rows x labels):
- sparse BoW text: a header `N F L`, then N lines `l1,l2 f:v f:v ...` (the label list may be empty);
- LF JSON lines: `trn.json` / `tst.json` with {"uid", "title", "target_ind"}, `lbl.json` (line i = label i) and the
  optional filter files `filter_labels_trn.txt` / `filter_labels_tst.txt` holding `row label` pairs.
A malformed line raises ValueError("<file>:<line>: <reason>"). Every file read is hashed (sha256) as it is read,
so `data_fingerprint` can name exactly the data a model was trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch


@dataclass
class XMCDataset:
    """One split: labels (N x L CSR), and texts or sparse features (N x F CSR), plus label-side information."""

    labels: sp.csr_matrix
    texts: list[str] | None = None
    features: sp.csr_matrix | None = None
    uids: list[str] | None = None
    label_titles: list[str] | None = None
    label_uids: list[str] | None = None
    filters: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))  # (M, 2): (row, label)
    sources: dict[str, str] = field(default_factory=dict)  # file name -> sha256 of its bytes
    name: str = ""

    @property
    def num_rows(self) -> int:
        return self.labels.shape[0]

    @property
    def num_labels(self) -> int:
        return self.labels.shape[1]

    def label_counts(self) -> np.ndarray:
        """Number of rows holding each label, (L,) int64."""
        return np.bincount(self.labels.indices, minlength=self.num_labels).astype(np.int64)

    def filter_matrix(self) -> sp.csr_matrix:
        """The filter pairs as a boolean N x L CSR matrix."""
        m = sp.csr_matrix(
            (np.ones(len(self.filters), dtype=bool), (self.filters[:, 0], self.filters[:, 1])),
            shape=self.labels.shape,
        )
        m.sum_duplicates()
        return m

    def subset(self, rows: np.ndarray) -> XMCDataset:
        """The given rows (in that order) as a new dataset; filters are carried over and renumbered."""
        rows = np.asarray(rows, dtype=np.int64)
        new_row = np.full(self.num_rows, -1, dtype=np.int64)
        new_row[rows] = np.arange(len(rows))
        kept = self.filters[new_row[self.filters[:, 0]] >= 0]
        return replace(
            self,
            labels=self.labels[rows],
            texts=None if self.texts is None else [self.texts[i] for i in rows],
            features=None if self.features is None else self.features[rows],
            uids=None if self.uids is None else [self.uids[i] for i in rows],
            filters=np.stack([new_row[kept[:, 0]], kept[:, 1]], axis=1),
        )


def _lines(path: Path, sources: dict[str, str]) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text without newline) and record the file's sha256 in `sources` at the end."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            digest.update(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason})") from None
            yield lineno, text.rstrip("\r\n")
    sources[path.name] = digest.hexdigest()


def label_csr(rows: list[int], cols: list[int], shape: tuple[int, int], dtype: type) -> sp.csr_matrix:
    """The 0/1 label matrix of (row, label) pairs (a pair listed twice is one positive)."""
    m = sp.csr_matrix((np.ones(len(rows), dtype=dtype), (rows, cols)), shape=shape)
    m.sum_duplicates()
    m.data[:] = 1  # a label listed twice is still one positive
    return m


def _int(token: str, what: str, upper: int) -> int:
    try:
        value = int(token)
    except ValueError:
        raise ValueError(f"{what} {token!r} is not an integer") from None
    if not 0 <= value < upper:
        raise ValueError(f"{what} {value} out of range [0, {upper})")
    return value


def _parse_bow_line(text: str, num_features: int, num_labels: int) -> tuple[list[int], list[int], list[float]]:
    parts = text.split(maxsplit=1)
    if not parts or text[0].isspace() or ":" in parts[0]:  # a line starting with a blank or a feature: no labels
        label_part, feature_parts = "", text.split()
    else:
        label_part, feature_parts = parts[0], parts[1].split() if len(parts) > 1 else []
    labels = [_int(t, "label", num_labels) for t in label_part.split(",")] if label_part else []
    idx, val = [], []
    for tok in feature_parts:
        f, sep, v = tok.partition(":")
        if not sep:
            raise ValueError(f"feature {tok!r} is not of the form index:value")
        idx.append(_int(f, "feature index", num_features))
        try:
            val.append(float(v))
        except ValueError:
            raise ValueError(f"feature value {v!r} is not a number") from None
        if not np.isfinite(val[-1]):
            raise ValueError(f"feature value {v!r} is not finite")
    return labels, idx, val


def read_bow(path: str | Path, *, label_dtype: type = np.float32) -> XMCDataset:
    """Read the Repository's sparse BoW text format into features (N x F, float32) and labels (N x L)."""
    path = Path(path)
    sources: dict[str, str] = {}
    lines = _lines(path, sources)
    first = next(lines, None)
    if first is None:
        raise ValueError(f"{path}:1: empty file, expected a header 'N F L'")
    header = first[1].split()
    if len(header) != 3 or not all(h.isdigit() for h in header):
        raise ValueError(f"{path}:1: header {first[1]!r} is not three non-negative integers 'N F L'")
    n, num_features, num_labels = (int(h) for h in header)
    lab_rows, lab_cols, f_rows, f_cols, f_vals = [], [], [], [], []
    row = 0
    for lineno, text in lines:
        if row == n:
            raise ValueError(f"{path}:{lineno}: more data lines than the {n} rows the header announces")
        try:
            labels, idx, val = _parse_bow_line(text, num_features, num_labels)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        lab_rows += [row] * len(labels)
        lab_cols += labels
        f_rows += [row] * len(idx)
        f_cols += idx
        f_vals += val
        row += 1
    if row != n:
        raise ValueError(f"{path}:{row + 2}: file ends after {row} data lines, the header announces {n}")
    features = sp.csr_matrix((np.asarray(f_vals, dtype=np.float32), (f_rows, f_cols)), shape=(n, num_features))
    features.sum_duplicates()
    labels = label_csr(lab_rows, lab_cols, (n, num_labels), label_dtype)
    return XMCDataset(labels=labels, features=features, sources=sources, name=path.stem)


def write_bow(path: str | Path, features: sp.csr_matrix, labels: sp.csr_matrix) -> None:
    """Write features and labels in the sparse BoW text format (the inverse of `read_bow`)."""
    features, labels = sp.csr_matrix(features), sp.csr_matrix(labels)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{features.shape[0]} {features.shape[1]} {labels.shape[1]}\n")
        for i in range(features.shape[0]):
            lab = ",".join(str(c) for c in labels.indices[labels.indptr[i] : labels.indptr[i + 1]])
            s, e = features.indptr[i], features.indptr[i + 1]
            feats = " ".join(f"{c}:{v:.9g}" for c, v in zip(features.indices[s:e], features.data[s:e], strict=True))
            f.write(f"{lab} {feats}".rstrip() + "\n")


def _json_lines(path: Path, sources: dict[str, str]) -> Iterator[tuple[int, dict]]:
    for lineno, text in _lines(path, sources):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _string(obj: dict, key: str, path: Path, lineno: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{path}:{lineno}: {key!r} missing or not a string")
    return value


def read_lf_labels(path: str | Path, sources: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Read `lbl.json`: (uids, titles), line i describing label i."""
    path, sources = Path(path), {} if sources is None else sources
    uids, titles = [], []
    for lineno, obj in _json_lines(path, sources):
        titles.append(_string(obj, "title", path, lineno))
        uids.append(str(obj["uid"]) if "uid" in obj else str(lineno - 1))
    return uids, titles


def read_filters(path: str | Path, num_rows: int, num_labels: int, sources: dict[str, str] | None = None) -> np.ndarray:
    """Read a filter file of `row label` lines into an (M, 2) int64 array; blank lines are skipped."""
    path, sources = Path(path), {} if sources is None else sources
    pairs = []
    for lineno, text in _lines(path, sources):
        parts = text.split()
        if not parts:
            continue
        try:
            if len(parts) != 2:
                raise ValueError(f"expected 'row label', got {len(parts)} fields")
            pairs.append((_int(parts[0], "row", num_rows), _int(parts[1], "label", num_labels)))
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def read_lf(
    directory: str | Path,
    split: str = "trn",
    *,
    text_fields: tuple[str, ...] = ("title",),
    label_dtype: type = np.float32,
) -> XMCDataset:
    """Read one split (`trn` or `tst`) of an LF JSON-lines dataset, with `lbl.json` and its filter file if present."""
    directory = Path(directory)
    sources: dict[str, str] = {}
    label_uids, label_titles = read_lf_labels(directory / "lbl.json", sources)
    num_labels = len(label_titles)
    path = directory / f"{split}.json"
    texts, uids, rows, cols = [], [], [], []
    for lineno, obj in _json_lines(path, sources):
        texts.append(" ".join(_string(obj, k, path, lineno) for k in text_fields))
        uids.append(str(obj["uid"]) if "uid" in obj else str(lineno - 1))
        target = obj.get("target_ind")
        if not isinstance(target, list):
            raise ValueError(f"{path}:{lineno}: 'target_ind' missing or not a list")
        for t in target:
            if isinstance(t, bool) or not isinstance(t, int):
                raise ValueError(f"{path}:{lineno}: label {t!r} is not an integer")
            if not 0 <= t < num_labels:
                raise ValueError(f"{path}:{lineno}: label {t} out of range [0, {num_labels})")
        rows += [len(texts) - 1] * len(target)
        cols += target
    labels = label_csr(rows, cols, (len(texts), num_labels), label_dtype)
    filter_path = directory / f"filter_labels_{split}.txt"
    filters = read_filters(filter_path, len(texts), num_labels, sources) if filter_path.exists() else None
    return XMCDataset(
        labels=labels,
        texts=texts,
        uids=uids,
        label_titles=label_titles,
        label_uids=label_uids,
        filters=np.zeros((0, 2), dtype=np.int64) if filters is None else filters,
        sources=sources,
        name=f"{directory.name}/{split}",
    )


def data_fingerprint(*datasets: XMCDataset) -> str:
    """sha256 over the (file name, file sha256) pairs of every file the datasets were read from, sorted by name."""
    merged: dict[str, str] = {}
    for ds in datasets:
        merged.update(ds.sources)
    digest = hashlib.sha256()
    for name in sorted(merged):
        digest.update(f"{name}\0{merged[name]}\n".encode())
    return digest.hexdigest()


def frequency_order(labels: sp.csr_matrix) -> np.ndarray:
    """order[new_id] = old_id: labels by descending number of rows (ties keep the old order); the most frequent is 0."""
    counts = np.bincount(labels.indices, minlength=labels.shape[1])
    return np.argsort(-counts, kind="stable").astype(np.int64)


def permute_labels(ds: XMCDataset, order: np.ndarray) -> XMCDataset:
    """Renumber labels so that new label j is old label order[j]: label columns, titles, uids and filters move."""
    order = np.asarray(order, dtype=np.int64)
    if order.shape != (ds.num_labels,):  # a model trained on other data
        raise ValueError(f"the model has {order.size:,} labels, the data {ds.num_labels:,}")
    if not np.array_equal(np.sort(order), np.arange(ds.num_labels)):
        raise ValueError(f"order is not a permutation of the {ds.num_labels} labels")
    new_of_old = np.empty_like(order)
    new_of_old[order] = np.arange(len(order))
    labels = ds.labels.copy()
    labels.indices = new_of_old[labels.indices].astype(labels.indices.dtype)
    labels.has_sorted_indices = False
    labels.sort_indices()
    filters = np.stack([ds.filters[:, 0], new_of_old[ds.filters[:, 1]]], axis=1)
    return replace(
        ds,
        labels=labels,
        label_titles=None if ds.label_titles is None else [ds.label_titles[i] for i in order],
        label_uids=None if ds.label_uids is None else [ds.label_uids[i] for i in order],
        filters=filters,
    )


def reindex_by_frequency(train: XMCDataset, *others: XMCDataset) -> tuple[list[XMCDataset], np.ndarray]:
    """Renumber labels by training frequency in `train` and every other split; returns ([train, *others], order)."""
    order = frequency_order(train.labels)
    return [permute_labels(ds, order) for ds in (train, *others)], order


@dataclass
class Batch:
    """rows: (B,) int64 dataset rows; positives / filtered: (P, 2) int64 (row-in-batch, label) pairs: the targets,
    and the split's filter pairs (a row's own label, excluded from training with `exclude_self`).

    (P, 2) int64 is the one form of (row, label) pairs from here to the kernels (`XMCHead.step`, the sharded step);
    only the kernel call splits it into rows and labels."""

    rows: torch.Tensor
    positives: torch.Tensor
    filtered: torch.Tensor


def pairs_in_rows(pairs: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The (P, 2) (row, label) pairs whose row lies in [start, stop), rows counted from start (a slice of a batch)."""
    keep = (pairs[:, 0] >= start) & (pairs[:, 0] < stop)
    return pairs[keep] - pairs.new_tensor([start, 0])


def _pairs(m: sp.csr_matrix) -> torch.Tensor:
    row = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
    return torch.from_numpy(np.stack([row, m.indices.astype(np.int64)], axis=1))


def iter_batches(
    ds: XMCDataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    start_batch: int = 0,
) -> Iterator[Batch]:
    """Batches of one epoch; the order depends only on (seed, epoch), so `start_batch` resumes mid-epoch exactly."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = ds.num_rows
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    filt = ds.filter_matrix() if len(ds.filters) else None
    stop = n - n % batch_size if drop_last else n
    for start in range(start_batch * batch_size, stop, batch_size):
        rows = order[start : start + batch_size]
        yield Batch(
            rows=torch.from_numpy(rows.astype(np.int64)),
            positives=_pairs(ds.labels[rows]),
            filtered=_pairs(filt[rows]) if filt is not None else torch.zeros((0, 2), dtype=torch.int64),
        )


_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "st", "tr", "br"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]


def _pseudo_words(rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct pronounceable words of 2-4 syllables (so character n-grams carry signal)."""
    words: dict[str, None] = {}
    while len(words) < count:
        need = count - len(words)
        syl = rng.integers(2, 5, size=need)
        onsets = rng.integers(0, len(_ONSETS), size=(need, 4))
        vowels = rng.integers(0, len(_VOWELS), size=(need, 4))
        for i in range(need):
            words.setdefault("".join(_ONSETS[onsets[i, j]] + _VOWELS[vowels[i, j]] for j in range(syl[i])))
    return list(words)


def make_synthetic(
    num_labels: int = 1000,
    num_train: int = 5000,
    num_test: int = 1000,
    *,
    seed: int = 0,
    zipf_exponent: float = 1.0,
    avg_labels: float = 3.0,
    tokens_per_label: int = 4,
    tokens_per_mention: int = 2,
    noise_tokens: int = 4,
    noise_vocab: int = 2000,
) -> tuple[XMCDataset, XMCDataset]:
    """A planted XMC problem: (train, test) with Zipf label frequencies and texts built from the labels' own words.

    Label l owns `tokens_per_label` pseudo-words; its title is those words. A point draws 1 + Poisson(avg_labels - 1)
    labels, frequency of the label of rank r proportional to (r + 1)^-zipf_exponent (ranks randomly assigned to ids),
    and its text is `tokens_per_mention` words of each of its labels plus `noise_tokens` shared noise words, shuffled.
    """
    rng = np.random.default_rng(seed)
    words = _pseudo_words(rng, num_labels * tokens_per_label + noise_vocab)
    own = np.asarray(words[: num_labels * tokens_per_label], dtype=object).reshape(num_labels, tokens_per_label)
    noise = words[num_labels * tokens_per_label :]
    rank_to_id = rng.permutation(num_labels)
    cdf = np.cumsum(np.arange(1, num_labels + 1, dtype=np.float64) ** -zipf_exponent)
    n = num_train + num_test
    counts = np.minimum(1 + rng.poisson(max(avg_labels - 1.0, 0.0), size=n), num_labels)
    rows = np.repeat(np.arange(n), counts)
    cols = rank_to_id[np.minimum(np.searchsorted(cdf, rng.random(len(rows)) * cdf[-1]), num_labels - 1)]
    labels = label_csr(rows.tolist(), cols.tolist(), (n, num_labels), np.float32)
    texts = []
    for i in range(n):
        toks = [
            w
            for lab in labels.indices[labels.indptr[i] : labels.indptr[i + 1]]
            for w in rng.choice(own[lab], size=min(tokens_per_mention, tokens_per_label), replace=False)
        ]
        toks += [noise[j] for j in rng.integers(0, len(noise), size=noise_tokens)] if noise else []
        texts.append(" ".join(toks[j] for j in rng.permutation(len(toks))))
    params = dict(
        num_labels=num_labels,
        num_train=num_train,
        num_test=num_test,
        seed=seed,
        zipf=zipf_exponent,
        avg_labels=avg_labels,
        tpl=tokens_per_label,
        tpm=tokens_per_mention,
        noise=noise_tokens,
        noise_vocab=noise_vocab,
    )
    sources = {"synthetic": hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()}
    full = XMCDataset(
        labels=labels,
        texts=texts,
        uids=[f"item-{i}" for i in range(n)],
        label_titles=[" ".join(t) for t in own],
        label_uids=[f"label-{j}" for j in range(num_labels)],
        sources=sources,
        name="synthetic",
    )
    train, test = full.subset(np.arange(num_train)), full.subset(np.arange(num_train, n))
    return replace(train, name="synthetic/trn"), replace(test, name="synthetic/tst")
