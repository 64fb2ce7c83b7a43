"""The default recipe: levers chosen from the training data's shape and title resemblance, the user's fields kept,
`recipe off` a no-op, and a run recording (and a resumed run keeping) the recipe it started with."""

import json
from dataclasses import asdict, replace

import pytest
from lf_data import write_lf

from training.config import TrainConfig, check_resume, load_config
from training.data import make_synthetic
from training.recipe import (
    DENSE_POINTS_PER_LABEL,
    RESEMBLANCE_THRESHOLD,
    UNSEEN_MIN_ROWS,
    DataShape,
    choose,
    measure,
    recipe_for,
    title_resemblance,
    user_set,
)
from training.train import train


def _data(num_labels, num_train, unrelated_titles=False, seed=0):
    train_ds, _ = make_synthetic(num_labels=num_labels, num_train=num_train, num_test=1, seed=seed)
    if unrelated_titles:  # another planted problem's pseudo-words: nothing in common with the item texts
        other, _ = make_synthetic(num_labels=num_labels, num_train=1, num_test=1, seed=seed + 100)
        train_ds = replace(train_ds, label_titles=other.label_titles)
    return train_ds


def _values(recipe) -> dict:
    return {lv.field: lv.value for lv in recipe.levers}


def _reasons(recipe) -> dict:
    return {lv.field: lv.reason for lv in recipe.levers}


def test_resemblance_separates_copied_titles_from_unrelated_ones():
    own, other = title_resemblance(_data(200, 600))
    assert own - other > 3 * RESEMBLANCE_THRESHOLD, (own, other)
    own, other = title_resemblance(_data(200, 600, unrelated_titles=True))
    assert abs(own - other) < RESEMBLANCE_THRESHOLD / 4, (own, other)
    assert title_resemblance(_data(200, 600), seed=3) == title_resemblance(_data(200, 600), seed=3)


def test_label_init_follows_the_resemblance():
    copied = choose(TrainConfig(), measure(_data(200, 600)))
    unrelated = choose(TrainConfig(), measure(_data(200, 600, unrelated_titles=True)))
    assert _values(copied)["label_init"] is True and _values(unrelated)["label_init"] is False
    assert f"(>= threshold {RESEMBLANCE_THRESHOLD})" in _reasons(copied)["label_init"]
    assert f"(< threshold {RESEMBLANCE_THRESHOLD})" in _reasons(unrelated)["label_init"]
    no_titles = choose(TrainConfig(), measure(replace(_data(200, 600), label_titles=None)))
    assert _values(no_titles)["label_init"] is True and "no label titles" in _reasons(no_titles)["label_init"]


def test_a_dense_label_space_gets_the_small_batch_low_head_lr_and_mlp():
    dense = measure(_data(20, 1000))  # ~150 training points per label
    sparse = measure(_data(2000, 1000))  # ~1.5
    assert dense.points_per_label >= DENSE_POINTS_PER_LABEL > sparse.points_per_label
    got = choose(TrainConfig(), dense)
    assert {k: _values(got)[k] for k in ("batch_size", "head_lr", "mlp_hidden", "encoder_lr")} == {
        "batch_size": 64,
        "head_lr": 0.004,
        "mlp_hidden": 2048,
        "encoder_lr": 0.0015,
    }
    assert "dense label space" in _reasons(got)["batch_size"] and "1000 rows" in _reasons(got)["batch_size"]
    plain = choose(TrainConfig(), sparse)
    defaults = TrainConfig()
    assert _values(plain) == {
        "label_init": True,
        "batch_size": defaults.batch_size,
        "head_lr": defaults.head_lr,
        "mlp_hidden": defaults.mlp_hidden,
        "encoder_lr": defaults.encoder_lr,
        "zero_shot_unseen": False,  # 1,000 rows: too few to hold out a slice
    }
    assert all("sparse label space, the default" in _reasons(plain)[k] for k in ("batch_size", "mlp_hidden"))


def _shape(**given) -> DataShape:
    """A DebianDeps-like shape (42K labels, 41K rows, 6K without a point, titles that resemble the items)."""
    base = dict(num_labels=42242, num_rows=40952, unseen_labels=6340, labels_per_point=5.26, points_per_label=5.1)
    return DataShape(**{**base, "title_similarity": 0.18, "random_similarity": 0.01, **given})


def test_labels_without_points_are_re_set_where_there_are_rows_to_choose_their_offset():
    got = choose(TrainConfig(), _shape())
    assert _values(got)["zero_shot_unseen"] is True
    assert "6340 of 42242 labels have no training point" in _reasons(got)["zero_shot_unseen"]
    assert "0.1 of the training rows held out" in _reasons(got)["zero_shot_unseen"]
    assert "offset 0" in _reasons(choose(TrainConfig(zero_shot_holdout=0.0), _shape()))["zero_shot_unseen"]
    for shape, why in (
        (_shape(unseen_labels=0), "every label has a training point"),
        (_shape(num_rows=UNSEEN_MIN_ROWS - 1), "too few to hold out"),
        (_shape(title_similarity=0.02), "no label-feature init"),  # titles unlike the items: no label init
    ):
        lever = next(lv for lv in choose(TrainConfig(), shape).levers if lv.field == "zero_shot_unseen")
        assert lever.value is False and why in lever.reason, (shape, lever)
    hf = choose(TrainConfig(encoder="hf", hf_path="m"), _shape())
    assert _values(hf)["zero_shot_unseen"] is False and "transformer" in _reasons(hf)["zero_shot_unseen"]
    mine = load_config(None, {"zero_shot_unseen": False})  # the user's choice wins, even at the default value
    assert choose(mine, _shape()).apply(mine).zero_shot_unseen is False


def test_the_small_planted_sets_of_the_tests_keep_the_defaults():
    for labels, rows in ((60, 400), (203, 2000), (50, 300)):
        cfg = TrainConfig()
        assert recipe_for(cfg, _data(labels, rows)).apply(cfg) == cfg, (labels, rows)


def test_a_transformer_gets_its_own_encoder_lr_and_warmup_and_no_mlp():
    cfg = TrainConfig(encoder="hf", hf_path="some/model")
    got = _values(choose(cfg, measure(_data(20, 1000))))
    assert (got["encoder_lr"], got["encoder_warmup"], got["mlp_hidden"], got["batch_size"]) == (5e-5, 0.1, 0, 64)
    hashed = _values(choose(TrainConfig(), measure(_data(20, 1000))))
    assert hashed["encoder_lr"] == 0.0015 and "encoder_warmup" not in hashed  # the bag: a dense space's lower lr


def test_user_flags_and_config_files_win(tmp_path):
    shape = measure(_data(20, 1000, unrelated_titles=True))  # the recipe: label_init false, batch 64, MLP
    # flags given at their default values are still the user's
    cfg = load_config(None, {"batch_size": 256, "label_init": True})
    assert user_set(cfg) == {"batch_size", "label_init"}
    recipe = choose(cfg, shape)
    run = recipe.apply(cfg)
    assert (run.batch_size, run.label_init, run.head_lr, run.mlp_hidden) == (256, True, 0.004, 2048)
    assert _reasons(recipe)["batch_size"] == "set by the user"
    (tmp_path / "c.toml").write_text("mlp_hidden = 0\n")
    from_file = load_config(str(tmp_path / "c.toml"), {"head_lr": 0.01})
    assert from_file.recipe_keep == "head_lr,mlp_hidden"
    run = choose(from_file, shape).apply(from_file)
    assert (run.mlp_hidden, run.head_lr, run.batch_size, run.label_init) == (0, 0.01, 64, False)
    # a config built in code: its fields off their defaults are the user's; recipe_keep pins one at its default
    coded = TrainConfig(batch_size=32, recipe_keep="mlp_hidden")
    run = choose(coded, shape).apply(coded)
    assert (run.batch_size, run.mlp_hidden, run.head_lr) == (32, 0, 0.004)


def test_recipe_off_changes_nothing():
    cfg = TrainConfig(recipe="off")
    recipe = recipe_for(cfg, _data(20, 1000, unrelated_titles=True))
    assert recipe.levers == () and recipe.apply(cfg) == cfg
    assert load_config(None, {"recipe": "off"}).recipe == "off"
    with pytest.raises(ValueError, match="recipe_keep"):
        load_config(None, {"recipe_keep": "batch_size,nope"})


def test_what_the_user_set_survives_a_checkpoint_a_worker_and_a_resume():
    cfg = load_config(None, {"batch_size": 256, "out": "r"})
    assert TrainConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg  # checkpoint, artifact, Ray Train workers
    saved = choose(cfg, measure(_data(20, 1000))).apply(cfg)
    resumed = check_resume(saved, load_config(None, {"resume": True, "out": "r", "epochs": 5}))
    assert resumed.recipe_keep == saved.recipe_keep == "batch_size,out"
    assert (resumed.batch_size, resumed.mlp_hidden, resumed.epochs) == (256, 2048, 5)


def test_a_run_records_its_recipe_and_a_resumed_run_keeps_it(tmp_path, capsys):
    data = write_lf(tmp_path / "data", num_labels=12, num_train=240, num_test=24)  # ~60 points per label: dense
    flags = {"data": str(data), "dim": 16, "min_df": 1, "epochs": 2, "progress": False, "threads": 2}
    out = str(tmp_path / "run")
    stopped = train(load_config(None, {**flags, "out": out, "stop_after": 5, "checkpoint_every": 2}))
    assert stopped["stopped"]
    printed = capsys.readouterr().out
    assert "batch_size 64: " in printed and "mlp_hidden 2048: " in printed and "label_init true: " in printed
    result = train(load_config(None, {"data": str(data), "out": out, "resume": True, "progress": False}))
    assert "recipe" not in capsys.readouterr().out  # chosen once, at the start
    assert (result["config"]["batch_size"], result["config"]["mlp_hidden"]) == (64, 2048)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())["recipe"]
    assert {k: v["value"] for k, v in written.items()} == {
        "label_init": True,
        "batch_size": 64,
        "head_lr": 0.004,
        "mlp_hidden": 2048,
        "encoder_lr": 0.0015,
        "zero_shot_unseen": False,
    }
    assert "dense label space" in written["mlp_hidden"]["reason"] and not written["head_lr"]["user_set"]
