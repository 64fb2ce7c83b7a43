"""The `elmo` console script: every command runs."""

import json

import pytest

from elmo_serve.cli import main
from training.data import make_synthetic


def _write_lf(directory, num_labels=40, num_train=300, num_test=60):
    train, test = make_synthetic(num_labels=num_labels, num_train=num_train, num_test=num_test, seed=2)
    directory.mkdir(parents=True)
    with open(directory / "lbl.json", "w") as f:
        for uid, title in zip(train.label_uids, train.label_titles, strict=True):
            f.write(json.dumps({"uid": uid, "title": title}) + "\n")
    for name, ds in (("trn", train), ("tst", test)):
        with open(directory / f"{name}.json", "w") as f:
            for i in range(ds.num_rows):
                t = ds.labels.indices[ds.labels.indptr[i] : ds.labels.indptr[i + 1]].tolist()
                f.write(json.dumps({"uid": ds.uids[i], "title": ds.texts[i], "target_ind": t}) + "\n")
    return directory


def test_head_demo_prints_a_table(capsys):
    assert main(["head-demo", "--labels", "40", "--dim", "32", "--batch", "16", "--steps", "30"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "|" in line]
    assert len(lines) == 5  # header + fp32, bf16 SR, fp8 SR, fp8 nearest
    p_at_1 = [float(line.split("|")[1]) for line in lines[1:]]
    assert all(0.0 <= p <= 100.0 for p in p_at_1)
    assert p_at_1[0] > 100.0 / 40, "the fp32 head must beat chance after 30 steps"


def test_train_eval_export(tmp_path, capsys):
    data = _write_lf(tmp_path / "data")
    (tmp_path / "cfg.toml").write_text("dim = 16\nmin_df = 1\nbatch_size = 32\n")
    run, art = tmp_path / "run", tmp_path / "art"
    argv = [
        "train",
        "--config",
        str(tmp_path / "cfg.toml"),
        "--data",
        str(data),
        "--epochs",
        "2",
        "--out",
        str(run),
        "--precision",
        "fp8+kahan",
        "--progress",
        "false",
        "--export",
        str(art),
    ]
    assert main(argv) == 0
    assert "P@1" in capsys.readouterr().out and (art / "manifest.json").is_file()
    assert main(["export", str(run), str(tmp_path / "art2")]) == 0
    assert "40 labels, head float8_e4m3fn" in capsys.readouterr().out
    assert main(["eval", str(run), "--json", str(tmp_path / "m.json")]) == 0
    from_run = json.loads((tmp_path / "m.json").read_text())
    assert main(["eval", str(tmp_path / "art2"), "--json", str(tmp_path / "a.json")]) == 0
    from_artifact = json.loads((tmp_path / "a.json").read_text())
    assert from_artifact["P@1"] == pytest.approx(from_run["P@1"], abs=2.0)
    assert json.loads((run / "metrics.json").read_text())["metrics"]["P@1"] == pytest.approx(from_run["P@1"])


def test_bad_artifact_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    assert main(["eval", str(tmp_path / "bad")]) == 2
    assert "error" in capsys.readouterr().err


def test_demo_falls_back_to_a_planted_problem(tmp_path, monkeypatch, capsys):
    import training.embedded as embedded

    monkeypatch.setattr(embedded, "APT_LISTS", str(tmp_path / "no-apt"))
    monkeypatch.setattr(embedded, "SYNTHETIC", dict(num_labels=100, num_train=600, num_test=100))
    args = ["demo", "--out", str(tmp_path / "run"), "--export", str(tmp_path / "art"), "--quiet", "--no-serve"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "P@1" in out and (tmp_path / "art" / "labels.jsonl").is_file()
