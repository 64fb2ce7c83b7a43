"""Label-sharded training under Ray Train: a worker killed mid-run is restarted from the last checkpoint and the run
ends with the metrics of an uninterrupted one (the same per-worker function under plain torch.distributed)."""

import functools

import pytest
import torch
from lf_data import write_lf
from sharded_runs import run_sharded, sharded_head_weights

pytest.importorskip("ray.train")


def test_worker_killed_mid_run_resumes_from_checkpoint(tmp_path):
    import faults
    import ray
    from ray import cloudpickle

    from training.artifact import load_artifact
    from training.config import TrainConfig
    from training.ray_train import fit

    data = write_lf(tmp_path / "lf", num_labels=203, num_train=1500, num_test=300, seed=3)
    kw = dict(
        data=str(data),
        dim=32,
        epochs=2,
        batch_size=16,
        min_df=1,
        precision="fp8",
        loss_every=10,
        checkpoint_every=40,
        progress=False,
        threads=1,
    )
    reference = run_sharded(2, **kw, out=str(tmp_path / "reference"))[0]
    cloudpickle.register_pickle_by_value(faults)
    marker = tmp_path / "killed"
    started = not ray.is_initialized()
    cfg = TrainConfig(
        **kw,
        out=str(tmp_path / "ray-run"),
        export=str(tmp_path / "artifact"),
        workers=2,
        cpus_per_worker=0.5,
        max_failures=1,
    )
    try:
        metrics = fit(cfg, on_step=functools.partial(faults.kill_once, marker=str(marker), at=100))
    finally:
        if started:
            ray.shutdown()
    assert marker.read_text() == "killed rank 1 at step 100\n", "the failure was injected"
    for k in ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5"):
        assert metrics[k] == pytest.approx(reference["metrics"][k], abs=1e-6), k
    assert metrics["workers"] == 2 and metrics["step_ms"] > 0
    # Ray Train kept the workers' shards together in its checkpoints; the last one holds the reference's head
    stored = sorted(p for p in (tmp_path / "ray-run" / "ray" / "ray-run").glob("checkpoint_*") if p.is_dir())
    assert {p.name for p in stored[-1].iterdir()} == {
        "common.pt",
        "shard-0.pt",
        "shard-1.pt",
        "sha256-0.json",
        "sha256-1.json",
    }
    torch.testing.assert_close(sharded_head_weights(stored[-1]), sharded_head_weights(tmp_path / "reference"))
    art = load_artifact(tmp_path / "artifact")
    assert art.num_labels == 203 and art.manifest["metrics"]["P@1"] == pytest.approx(metrics["P@1"])
    # the run directory reads like any other (`elmo eval RUN`): its latest checkpoint is in Ray's storage under it
    from training.checkpoint import model_from_checkpoint
    from training.evaluation import evaluate_on

    model, saved, _ = model_from_checkpoint(tmp_path / "ray-run")
    assert evaluate_on(model, saved)["P@1"] == pytest.approx(metrics["P@1"], abs=1e-6)
