"""TrainConfig: its comments are the flags' help, every field is validated, and a resumed run honours or refuses
each changed field."""

import dataclasses

import pytest

from training.config import (
    RESUME_FROM_NEW,
    RESUME_HONOURED,
    TrainConfig,
    check_resume,
    field_choices,
    field_groups,
    field_help,
    load_config,
)


def test_every_field_has_help_from_its_comment_and_a_group():
    helps = field_help(TrainConfig)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert list(helps) == names and all(helps.values()), [n for n in names if not helps.get(n)]
    assert helps["batch_size"] == "training rows per step (the global batch, split over the workers)"
    # the comment lines right above a field come first, joined into one text
    assert helps["frozen_encoder"].startswith("optional frozen pretrained sentence embeddings added")
    assert helps["frozen_encoder"].endswith("(its frozen/ directory: the pretrained model, ~90 MB for MiniLM).")
    groups = field_groups(TrainConfig)
    assert [g for g, _ in groups] == [
        "data",
        "encoder",
        "warm start",
        "head",
        "optimisation",
        "evaluation and checkpoints",
        "distributed",
    ]
    assert [n for _, group in groups for n in group] == names
    assert dict(groups)["distributed"][0] == "workers" and "batch_size" in dict(groups)["optimisation"]


def test_comments_of_any_dataclass(tmp_path, monkeypatch):
    source = (
        "from dataclasses import dataclass\n\n\n@dataclass\nclass Cfg:\n"
        "    a: int = 1  # the a\n"
        "    # two lines\n    # above b\n"
        "    b: str = 'x'  # and after\n"
        "    # --- second: with a description ---\n"
        "    c: float = 0.5\n"
    )
    (tmp_path / "cfgmod.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    import cfgmod

    assert field_help(cfgmod.Cfg) == {"a": "the a", "b": "two lines above b and after", "c": ""}
    assert field_groups(cfgmod.Cfg) == [("", ["a", "b"]), ("second", ["c"])]


def test_enums_come_from_the_annotations():
    choices = field_choices(TrainConfig)
    assert choices["format"] == ("lf", "bow") and choices["device"] == ("auto", "cpu", "cuda")
    assert TrainConfig.precision in choices["precision"] and "fp32" in choices["precision"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 0}, r"batch_size \(--batch-size\) must be >= 1; got 0"),
        ({"epochs": 0}, r"epochs \(--epochs\) must be >= 1; got 0"),
        ({"format": "xml"}, r"format \(--format\) must be one of lf, bow; got 'xml'"),
        ({"encoder": "bert"}, r"encoder \(--encoder\) must be one of hashed, hf; got 'bert'"),
        ({"precision": "fp16"}, r"precision \(--precision\) must be one of fp32, bf16, fp8, fp8\+kahan; got 'fp16'"),
        ({"device": "gpu"}, r"device \(--device\) must be one of auto, cpu, cuda; got 'gpu'"),
        ({"epochs": "3"}, r"epochs \(--epochs\) must be an integer; got '3'"),
        ({"progress": 1}, r"progress \(--progress\) must be true or false; got 1"),
        ({"warmup": 1.5}, r"warmup \(--warmup\) must be a fraction in \[0, 1\]; got 1.5"),
        ({"head_lr": float("nan")}, r"head_lr \(--head-lr\) must be a finite number >= 0; got nan"),
        ({"char_ngrams": "5-3"}, r"char_ngrams \(--char-ngrams\) must be \"MIN-MAX\""),
        ({"checkpoint_every": -2}, r"checkpoint_every \(--checkpoint-every\) must be >= -1"),
        ({"encoder": "hf"}, r"encoder \(--encoder\) hf needs hf_path \(--hf-path\)"),
        ({"out": ""}, r"out \(--out\) must be a directory"),
        ({"fp8_encoder": True}, r"fp8_encoder \(--fp8-encoder\) applies to encoder \(--encoder\) hf, not hashed"),
        ({"use_gpu": True}, r"use_gpu \(--use-gpu\) applies to Ray Train workers \(--workers N\)"),
    ],
)
def test_bad_values_are_named_with_what_is_allowed(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_config_file_values_are_validated(tmp_path):
    (tmp_path / "c.toml").write_text('batch_size = 0\nformat = "lf"\n')
    with pytest.raises(ValueError, match="batch_size"):
        load_config(str(tmp_path / "c.toml"))
    good = load_config(None, {"char_ngrams": "0-0", "min_df": 0, "head_lr": 1, "max_failures": -1})
    assert (good.char_ngrams, good.head_lr) == ("0-0", 1)
    assert load_config() == TrainConfig()


def test_resume_without_a_checkpoint_is_an_error():
    with pytest.raises(ValueError, match="--resume: no checkpoint in runs/x"):
        check_resume(None, TrainConfig(out="runs/x", resume=True))
    fresh = TrainConfig(out="runs/x")
    assert check_resume(None, fresh) is fresh


def test_resume_honours_what_comes_next_and_refuses_what_was_trained():
    saved = TrainConfig(out="r", dim=32, epochs=2, stop_after=5, progress=False, export="", seed=3)
    # the flags not given (left at their defaults) keep the saved run's values
    same = check_resume(saved, TrainConfig(out="r", resume=True))
    assert (same.dim, same.epochs, same.seed, same.export) == (32, 2, 3, "")
    assert (same.resume, same.stop_after, same.progress) == (True, 0, True)  # this process's own
    more = check_resume(saved, TrainConfig(out="r", resume=True, epochs=4, export="art", dim=32))
    assert (more.epochs, more.export, more.dim) == (4, "art", 32)
    with pytest.raises(ValueError, match=r"--resume: dim \(--dim\) is 32 in the run in r, not 64; resume without"):
        check_resume(saved, TrainConfig(out="r", resume=True, dim=64))
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\) is 256 in the run in r, not 8"):
        check_resume(saved, TrainConfig(out="r", resume=True, batch_size=8))
    assert not set(RESUME_FROM_NEW) & set(RESUME_HONOURED)
    assert set(RESUME_FROM_NEW) | set(RESUME_HONOURED) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_hf_bag_needs_the_transformer_on_texts():
    hf = {"encoder": "hf", "hf_path": "some/bert"}
    for overrides, got in (
        ({"hf_bag": "concat"}, "hashed on lf"),
        ({**hf, "hf_bag": "sum", "format": "bow"}, "hf on bow"),
    ):
        with pytest.raises(
            ValueError,
            match=rf"hf_bag \(--hf-bag\) .* needs encoder \(--encoder\) hf and format \(--format\) lf, not {got}",
        ):
            load_config(None, overrides)
    with pytest.raises(ValueError, match=r"hf_bag \(--hf-bag\) must be one of off, concat, sum; got 'mean'"):
        load_config(None, {**hf, "hf_bag": "mean"})
    for bad in (-0.1, float("inf")):
        with pytest.raises(ValueError, match=r"hf_bag_lr \(--hf-bag-lr\) must be a finite number >= 0"):
            load_config(None, {**hf, "hf_bag": "concat", "hf_bag_lr": bad})
    cfg = load_config(None, {**hf, "hf_bag": "sum", "hf_bag_lr": 0.0})
    assert (cfg.hf_bag, cfg.hf_bag_lr, TrainConfig.hf_bag, TrainConfig.hf_bag_lr) == ("sum", 0.0, "off", 0.002)
    assert "the bag's dim is then the transformer's hidden size" in field_help(TrainConfig)["hf_bag"]
