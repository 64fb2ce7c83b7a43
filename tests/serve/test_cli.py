"""The `elmo` console script: every command runs."""

import argparse
import dataclasses
import json
import socket

import pytest

from elmo_serve.cli import build_parser, main
from elmo_serve.commands import query_url
from training.config import TrainConfig, field_groups, field_help
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
    # a run's artifact with a live catalogue folded in (the log written over the run's labels)
    from elmo_serve.catalogue import Catalogue
    from elmo_serve.catalogue_log import Change
    from training.artifact import load_artifact

    labels = load_artifact(tmp_path / "art2").labels
    log = tmp_path / "catalogue.log"
    Catalogue(log, [lb["uid"] for lb in labels], [lb["title"] for lb in labels]).change(
        [Change("add", "new-label", "a new label"), Change("retire", labels[0]["uid"])]
    )
    assert main(["export", str(run), str(tmp_path / "art3"), "--catalogue", str(log)]) == 0
    out = capsys.readouterr().out
    assert "1 added, 0 retitled, 1 retired labels" in out and "40 labels, head float8_e4m3fn" in out
    assert [lb["uid"] for lb in load_artifact(tmp_path / "art3").labels][-1] == "new-label"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the temporary export is gone
    assert main(["eval", str(run), "--json", str(tmp_path / "m.json")]) == 0
    from_run = json.loads((tmp_path / "m.json").read_text())
    assert main(["eval", str(tmp_path / "art2"), "--json", str(tmp_path / "a.json")]) == 0
    from_artifact = json.loads((tmp_path / "a.json").read_text())
    assert from_artifact["P@1"] == pytest.approx(from_run["P@1"], abs=2.0)
    assert json.loads((run / "metrics.json").read_text())["metrics"]["P@1"] == pytest.approx(from_run["P@1"])
    capsys.readouterr()

    other = _write_lf(tmp_path / "other", num_labels=30)
    assert main(["eval", str(art), "--data", str(other)]) == 2
    assert "error: the model has 40 labels, the data 30" in capsys.readouterr().err


def test_resume_honours_or_refuses_changed_flags(tmp_path, capsys):
    data = _write_lf(tmp_path / "data", num_labels=24, num_train=96, num_test=24)
    run, art = tmp_path / "run", tmp_path / "art"
    small = ["--data", str(data), "--dim", "16", "--min-df", "1", "--batch-size", "32", "--progress", "false"]
    assert main(["train", *small, "--epochs", "1", "--out", str(run)]) == 0
    assert main(["train", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert f"--resume: no checkpoint in {tmp_path / 'none'}" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(run), "--dim", "32"]) == 2
    assert "--resume: dim (--dim) is 16 in the run" in capsys.readouterr().err
    # a finished run: more epochs and an export are honoured, the other flags come from the run
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--export", str(art)]) == 0
    assert f"artifact: {art}" in capsys.readouterr().out and (art / "manifest.json").is_file()
    done = json.loads((run / "metrics.json").read_text())
    assert (done["config"]["epochs"], done["config"]["dim"]) == (2, 16)
    assert max(h["epoch"] for h in done["history"]) == 2


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


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_flag_of_every_command_has_help_and_shows_its_default():
    commands = _commands()
    assert {"demo", "train", "eval", "export", "serve", "query", "retrain", "head-demo"} <= set(commands)
    for name, command in commands.items():
        for action in command._actions:
            where = f"elmo {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{where} has no help"
            if isinstance(action, argparse._HelpAction) or not action.option_strings or action.required:
                continue
            if action.default is None or action.default is argparse.SUPPRESS:
                # no value to print: the help says what happens when the flag is not given
                assert "(default" in action.help, f"{where}: the help must say what its default is"
            shown = command.formatter_class(prog="elmo")._get_help_string(action)
            if action.default is not False:  # switches (store_true) are off unless given
                assert "(default" in shown, f"{where} does not show its default"


def test_train_help_and_defaults_come_from_the_config_comments(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    helps = field_help(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        shown = str(field.default).lower() if isinstance(field.default, bool) else str(field.default) or '""'
        assert f"{helps[field.name]} (default: {shown})" in out, field.name
    assert "--batch-size N" in out and "training rows per step" in out and "(default: 256)" in out
    headings = [line[:-1] for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    groups = [group for group, _ in field_groups(TrainConfig)]
    assert headings[-len(groups) :] == groups
    assert "--precision {fp32,bf16,fp8,fp8+kahan}" in out


def test_train_help_does_not_override_a_config_file(tmp_path):
    (tmp_path / "c.toml").write_text("epochs = 7\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.toml"), "--dim", "8"])
    assert not hasattr(args, "epochs") and args.dim == 8  # flags not given stay out: the file's epochs stand


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "0"], "elmo train: error: batch_size (--batch-size) must be >= 1; got 0"),
        (["--epochs", "0"], "elmo train: error: epochs (--epochs) must be >= 1; got 0"),
        (["--warmup", "-0.1"], "elmo train: error: warmup (--warmup) must be a fraction in [0, 1]; got -0.1"),
    ],
)
def test_bad_train_values_are_one_line_errors(flags, message, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.strip() == message
    assert not (tmp_path / "run").exists()


def test_bad_enum_flags_name_the_allowed_values(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--precision", "fp16"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "argument --precision: invalid choice: 'fp16'" in err and "fp8+kahan" in err
    (tmp_path / "c.toml").write_text('device = "gpu"\n')
    assert main(["train", "--config", str(tmp_path / "c.toml")]) == 2
    assert "device (--device) must be one of auto, cpu, cuda; got 'gpu'" in capsys.readouterr().err


def test_query_asks_the_port_serve_was_given(monkeypatch, capsys):
    monkeypatch.delenv("ELMO_URL", raising=False)
    monkeypatch.delenv("ELMO_PORT", raising=False)
    assert query_url() == "http://127.0.0.1:8000"
    assert query_url(port=8123) == "http://127.0.0.1:8123"
    assert query_url(url="http://host:9000") == "http://host:9000"
    monkeypatch.setenv("ELMO_PORT", "8124")  # as `elmo serve` reads it
    assert query_url() == "http://127.0.0.1:8124" and query_url(port=8125) == "http://127.0.0.1:8125"
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["query", "some text", "--port", str(port)]) == 1
    assert f"cannot reach http://127.0.0.1:{port}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["query", "x", "--port", "1", "--url", "http://a"])
