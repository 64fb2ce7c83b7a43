"""The embedded default dataset: DebianDeps-like data rebuilt from this machine's apt package index, no network.

apt keeps the `Packages` index of each configured suite under /var/lib/apt/lists (often lz4-compressed). Each
binary package becomes a data point whose text is "<name> : <short description>" and whose labels are the real
packages it names in Depends, Pre-Depends, Recommends and Suggests (every alternative of `a | b`; version and
architecture qualifiers stripped), as ../shared/data/debian-deps/README.md describes. A package that is also a label
gets a filter pair (it is never its own label). Points are shuffled with the seed and split 80/20.
Without a readable index (no apt, no lz4 decompressor) it falls back to `make_synthetic`, a planted problem.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import lzma
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np

from training.data import XMCDataset, label_csr, make_synthetic

APT_LISTS = "/var/lib/apt/lists"
RELATIONS = ("Depends", "Pre-Depends", "Recommends", "Suggests")
SYNTHETIC = dict(num_labels=2000, num_train=8000, num_test=2000)  # the fallback's size
_QUALIFIER = re.compile(r"\(.*?\)|\[.*?\]|<.*?>")


def _decompress(path: Path) -> bytes | None:
    """The bytes of an index file, or None if it cannot be decompressed here."""
    raw = path.read_bytes()
    if path.suffix == ".lz4":
        try:
            import lz4.frame

            return lz4.frame.decompress(raw)
        except ImportError:
            pass
        if shutil.which("lz4") is None:
            return None
        res = subprocess.run(["lz4", "-dc", str(path)], capture_output=True, check=False)
        return res.stdout if res.returncode == 0 else None
    if path.suffix == ".gz":
        return gzip.decompress(raw)
    if path.suffix == ".xz":
        return lzma.decompress(raw)
    return raw


def find_package_indexes(root: str = APT_LISTS) -> list[Path]:
    """apt's binary Packages index files (any compression), sorted."""
    return sorted(Path(p) for p in glob.glob(f"{root}/*_Packages*") if not p.endswith((".diff_Index", ".lock")))


def parse_packages(text: str) -> dict[str, dict[str, str]]:
    """Stanzas of a Packages index -> {name: {field: value}}; continuation lines are joined; the last stanza wins."""
    out: dict[str, dict[str, str]] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            out[fields["Package"]] = fields
    return out


def _targets(fields: dict[str, str]) -> list[str]:
    names = []
    for rel in RELATIONS:
        for item in fields.get(rel, "").split(","):
            for alt in item.split("|"):
                name = _QUALIFIER.sub("", alt).strip().split(":")[0].strip()
                if name:
                    names.append(name)
    return names


def dataset_from_packages(packages: dict[str, dict[str, str]], *, seed: int = 0, sources: dict | None = None):
    """(train, test) XMCDatasets in the DebianDeps construction (80/20 split, self filters)."""
    names = sorted(packages)
    real = set(names)
    targets = {n: sorted({t for t in _targets(packages[n]) if t in real and t != n}) for n in names}
    label_names = sorted({t for ts in targets.values() for t in ts})
    label_id = {n: i for i, n in enumerate(label_names)}

    def title(n: str) -> str:
        return f"{n} : {packages[n].get('Description', '')}".strip()

    points = [n for n in names if targets[n]]
    order = np.random.default_rng(seed).permutation(len(points))
    points = [points[i] for i in order]
    rows = [i for i, n in enumerate(points) for _ in targets[n]]
    cols = [label_id[t] for n in points for t in targets[n]]
    labels = label_csr(rows, cols, (len(points), len(label_names)), np.float32)
    filters = np.asarray([(i, label_id[n]) for i, n in enumerate(points) if n in label_id], dtype=np.int64)
    full = XMCDataset(
        labels=labels,
        texts=[title(n) for n in points],
        uids=points,
        label_titles=[title(n) for n in label_names],
        label_uids=label_names,
        filters=filters.reshape(-1, 2),
        sources=dict(sources or {}),
        name="apt-deps",
    )
    cut = int(0.8 * len(points))
    train, test = full.subset(np.arange(cut)), full.subset(np.arange(cut, len(points)))
    return replace(train, name="apt-deps/trn"), replace(test, name="apt-deps/tst")


def build_embedded(seed: int = 0, root: str | None = None, max_points: int = 0) -> tuple[XMCDataset, XMCDataset]:
    """DebianDeps-like (train, test) from the local apt index, else a synthetic planted problem."""
    packages: dict[str, dict[str, str]] = {}
    sources = {}
    for path in find_package_indexes(root or APT_LISTS):
        raw = _decompress(path)
        if raw is None:
            continue
        sources[path.name] = hashlib.sha256(raw).hexdigest()
        packages.update(parse_packages(raw.decode("utf-8", errors="replace")))
    if len(packages) >= 100:
        train, test = dataset_from_packages(packages, seed=seed, sources=sources)
        if max_points and train.num_rows > max_points:
            train = train.subset(np.arange(max_points))
            test = test.subset(np.arange(min(test.num_rows, max_points // 4)))
        return train, test
    return make_synthetic(**SYNTHETIC, seed=seed)
