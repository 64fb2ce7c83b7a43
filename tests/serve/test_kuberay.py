"""The KubeRay manifests parse and agree with deployments/serve.yaml where they must."""

import copy
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deployments"


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _without_replica_bounds(app: dict) -> dict:
    app = copy.deepcopy(app)
    for dep in app["deployments"]:
        dep.get("autoscaling_config", {}).pop("max_replicas", None)
    return app


def test_rayservice_serves_the_serve_yaml_application():
    service = _load("rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    local = _load("serve.yaml")["applications"]
    # Same application, deployments, resources, limits and user_config; only the replica ceilings may differ.
    assert [_without_replica_bounds(a) for a in embedded] == [_without_replica_bounds(a) for a in local]


def test_rayservice_cluster_autoscales_with_cpu_and_gpu_groups_and_auth():
    cluster = _load("rayservice.yaml")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["rayVersion"].startswith("2.60")
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    # The scorer's resources fit a CPU worker pod.
    scorer = next(
        d
        for d in yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])["applications"][0]["deployments"]
        if d["name"] == "ModelScorer"
    )
    cpu_pod = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
    assert scorer["ray_actor_options"]["num_cpus"] <= float(cpu_pod)


def test_every_ray_container_runs_serve_in_throughput_mode():
    from elmo_serve.commands import THROUGHPUT_ENV

    cluster = _load("rayservice.yaml")["spec"]["rayClusterConfig"]
    for spec in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        env = {e["name"]: e.get("value") for e in spec["template"]["spec"]["containers"][0].get("env", [])}
        assert {k: env.get(k) for k in THROUGHPUT_ENV} == THROUGHPUT_ENV  # as `elmo serve` starts Ray


def test_every_ray_container_reads_the_admin_token_from_a_secret():
    service = _load("rayservice.yaml")
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    cluster = service["spec"]["rayClusterConfig"]
    for spec in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0]["env"]}
        token = env[args["admin_token_env"]]
        assert "value" not in token  # never the token itself in the manifest
        assert token["valueFrom"]["secretKeyRef"]["optional"] is True  # no Secret: the change endpoints are off


def test_artifact_paths_live_on_the_shared_volume():
    service = _load("rayservice.yaml")
    apps = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    mounts = {
        m["mountPath"]
        for spec in [service["spec"]["rayClusterConfig"]["headGroupSpec"]]
        + service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        for m in spec["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert mounts == {"/srv/elmo"}
    scorer = next(d for d in apps[0]["deployments"] if d["name"] == "ModelScorer")
    assert scorer["user_config"]["artifact"].startswith("/srv/elmo/")
    assert apps[0]["args"]["catalogue"].startswith("/srv/elmo/")  # every scorer pod follows the same log
    job = _load("rayjob.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["elmo", "train"]
    export = entry[entry.index("--export") + 1]
    assert export.startswith("/srv/elmo/artifacts/")


def test_rayjob_entrypoint_parses_as_an_elmo_train_command():
    from elmo_serve.cli import build_parser

    job = _load("rayjob.yaml")
    args = build_parser().parse_args(job["spec"]["entrypoint"].split()[1:])
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
    assert args.command == "train" and args.workers == workers["replicas"] * max(1, gpus)
    assert args.use_gpu == (gpus > 0)
    assert args.ray_storage.startswith("/srv/elmo/"), "checkpoints on the volume every pod mounts"
