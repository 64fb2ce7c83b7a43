"""Small planted datasets written in the LF JSON-lines layout, and a tiny BERT over their words, for the trainer
tests."""

import json

from tiny_bert import save_tiny_bert

from training.data import make_synthetic


def write_lf(directory, num_labels=60, num_train=400, num_test=80, seed=0):
    """A synthetic planted problem in the LF JSON-lines layout, with a filter pair per row (a bogus 'own' label)."""
    train, test = make_synthetic(num_labels=num_labels, num_train=num_train, num_test=num_test, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lbl.json", "w") as f:
        for uid, title in zip(train.label_uids, train.label_titles, strict=True):
            f.write(json.dumps({"uid": uid, "title": title}) + "\n")
    for name, ds in (("trn", train), ("tst", test)):
        with open(directory / f"{name}.json", "w") as f, open(directory / f"filter_labels_{name}.txt", "w") as g:
            for i in range(ds.num_rows):
                t = ds.labels.indices[ds.labels.indptr[i] : ds.labels.indptr[i + 1]].tolist()
                f.write(json.dumps({"uid": ds.uids[i], "title": ds.texts[i], "target_ind": t}) + "\n")
                g.write(f"{i} {(i * 7) % num_labels}\n")
    return directory


def write_tiny_bert(data, path, layers=2, hidden=32):
    """A small BERT (no dropout, random weights) with a word-level vocabulary of the LF dataset in `data`, saved as a
    local Hugging Face directory (nothing is downloaded)."""
    words = set()
    for name in ("trn.json", "lbl.json"):
        for line in (data / name).read_text().splitlines():
            words.update(json.loads(line)["title"].lower().split())
    return save_tiny_bert(words, path, layers, hidden)
