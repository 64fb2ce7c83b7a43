"""`elmo predict`: batch answers equal the serving model's, input streamed in batches, bad lines named, atomic output.
(That they equal /v1/predict's over HTTP: tests/serve/test_app.py.)"""

import io
import json

import pytest
from conftest import make_artifact, toy_model

from elmo_serve.model import Query, load_model
from elmo_serve.predict import InputError, add_predict_command, predict_command, predict_stream

TEXTS = ["python3 numpy arrays", "GNU C++ compiler", "a strategy game", "qt quick module", "ssl toolkit", "vi editor"]


def _lines(texts=TEXTS, key="title"):
    return [json.dumps({"uid": f"p{i}", key: t}) + "\n" for i, t in enumerate(texts)]


def _run(model, lines, **kw) -> list[dict]:
    out = io.StringIO()
    n = predict_stream(model, lines, out, **kw)
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    assert n == len(rows)
    return rows


@pytest.fixture(scope="module")
def model():
    return toy_model()


def test_answers_equal_predict_batch_at_any_batch_size(model):
    want = [model.predict_batch([Query([t], 7)])[0][0] for t in TEXTS]
    for batch_size in (1, 4, 256):
        rows = _run(model, _lines(), k=7, batch_size=batch_size)
        assert [r["uid"] for r in rows] == [f"p{i}" for i in range(len(TEXTS))]
        for r, (ids, scores) in zip(rows, want, strict=True):
            assert r["ids"] == ids
            assert r["scores"] == pytest.approx(scores, rel=1e-5)  # fp32 sums over another batch shape
            assert r["uids"] == [model.uids[i] for i in ids] and r["titles"] == [model.titles[i] for i in ids]


def test_text_wins_over_title_blank_lines_skipped_uid_kept(model):
    lines = ["\n", json.dumps({"uid": 7, "title": "vim editor", "text": "GNU C compiler"}) + "\n", "   \n"]
    (row,) = _run(model, lines, k=3)
    (alone,) = _run(model, [json.dumps({"uid": "x", "text": "GNU C compiler"})], k=3)
    assert row["uid"] == 7 and row["ids"] == alone["ids"]


def test_input_is_read_batch_by_batch(model):
    out = io.StringIO()

    def lines():
        for i, line in enumerate(_lines() * 3):
            if i == 10:  # the 11th line is read once two batches of 4 are answered, and not before
                assert len(out.getvalue().splitlines()) == 8
            yield line

    assert predict_stream(model, lines(), out, k=2, batch_size=4) == 18


BAD = [
    ("{", "line 2: not valid JSON"),
    ('["a"]', "line 2: expected a JSON object, got list"),
    ('{"title": "gcc"}', "line 2: no 'uid'"),
    ('{"uid": true, "title": "gcc"}', "line 2: 'uid' must be a string or an integer"),
    ('{"uid": [1], "title": "gcc"}', "line 2: 'uid' must be a string or an integer"),
    ('{"uid": "a"}', "line 2: needs 'title' or 'text'"),
    ('{"uid": "a", "title": 5}', "line 2: 'title' must be a string, got int"),
    ('{"uid": "a", "text": "  "}', "line 2: 'text' is empty"),
]


@pytest.mark.parametrize("line, message", BAD)
def test_a_bad_line_is_named(model, line, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[")):
        _run(model, [_lines()[0], line + "\n", _lines()[1]], name="in.jsonl")


def test_k_and_batch_size_are_checked(model):
    with pytest.raises(ValueError, match="k must be"):
        _run(model, _lines(), k=201)
    with pytest.raises(ValueError, match="batch size"):
        _run(model, _lines(), batch_size=0)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("predict") / "art", seed=3)


def test_command_writes_the_file_atomically_and_refuses_bad_input(artifact, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(_lines()))
    out = tmp_path / "sub" / "answers.jsonl"
    assert predict_command(str(artifact), str(src), k=4, out=str(out), batch_size=4, progress=False) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    model = load_model(artifact, "torch")
    want = model.predict_batch([Query([t], 4) for t in TEXTS])
    assert [r["ids"] for r in rows] == [w[0][0] for w in want]
    assert "6 answers" in capsys.readouterr().err

    src.write_text("".join(_lines()) + '{"uid": "z"}\n')
    assert predict_command(str(artifact), str(src), out=str(out), progress=False) == 2
    assert f"{src} line 7: needs 'title' or 'text'" in capsys.readouterr().err
    assert [json.loads(x) for x in out.read_text().splitlines()] == rows  # the old answers stay whole
    assert sorted(p.name for p in out.parent.iterdir()) == ["answers.jsonl"]  # no temporary file left

    assert predict_command(str(artifact), str(tmp_path / "missing.jsonl"), progress=False) == 2
    assert "no input file" in capsys.readouterr().err
    assert predict_command(str(tmp_path), str(src), progress=False) == 2
    assert "invalid artifact" in capsys.readouterr().err


def test_command_reads_stdin_and_writes_stdout(artifact, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(_lines(TEXTS[:2], "text"))))
    assert predict_command(str(artifact), "-", k=3, device="cpu", progress=False) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["uid"] for r in rows] == ["p0", "p1"] and all(len(r["ids"]) == 3 for r in rows)


def test_parser_flags():
    import argparse

    parser = argparse.ArgumentParser(prog="elmo")
    add_predict_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["predict", "art", "-", "--k", "5", "--out", "o.jsonl", "--batch-size", "64"])
    assert (args.artifact, args.input, args.k, args.out, args.batch_size, args.device) == (
        "art",
        "-",
        5,
        "o.jsonl",
        64,
        "auto",
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "art", "-", "--device", "tpu"])


def test_predict_benchmark_runs(artifact, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "predict.py"
    spec = importlib.util.spec_from_file_location("predict_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    src, out = tmp_path / "in.jsonl", tmp_path / "rows.json"
    src.write_text("".join(_lines()))
    argv = ["--artifact", str(artifact), "--input", str(src), "--batch-sizes", "1", "4", "--device", "cpu"]
    assert bench.main(argv + ["--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 4] and all(r["texts"] == 6 and r["texts_per_s"] > 0 for r in rows)
    assert all(0 < r["queries_s"] and 0 < r["topk_s"] and r["queries_s"] + r["topk_s"] < r["seconds"] for r in rows)
