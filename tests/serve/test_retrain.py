"""`elmo retrain`: a Ray job trains and exports, the Serve REST API points the running scorer at the new artifact,
and the replica hot-swaps it. Unit tests of the token and the config edit need no cluster; the end-to-end tests run
a real `ray start` cluster of their own (a separate process tree, so the in-process Ray of the other serve tests is
untouched)."""

import argparse
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from conftest import make_artifact  # at import time: tests/training has a conftest module too

from elmo_serve.retrain import (
    AuthError,
    RetrainError,
    RollError,
    add_retrain_command,
    config_with_artifact,
    resolve_token,
    roll_artifact,
    submit_retrain,
    wait_for_version,
)

REPO = Path(__file__).resolve().parents[2]
QUICK_TRAIN = ["--train-rows", "2000", "--test-rows", "500", "--epochs", "1", "--dim", "32"]
QUICK_TRAIN += ["--checkpoint-every", "-1", "--progress", "false"]  # ~10 s on 2 cores, embedded default data


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="elmo")
    add_retrain_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# ---- token ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_token_env(monkeypatch, tmp_path):
    """No token anywhere: a fresh HOME (no ~/.ray/auth_token), no RAY_AUTH_TOKEN*."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    return tmp_path / "home"


def test_token_precedence_follows_ray(no_token_env, monkeypatch, tmp_path):
    assert resolve_token() is None
    (no_token_env / ".ray").mkdir(parents=True)
    (no_token_env / ".ray" / "auth_token").write_text("from-home\n")
    assert resolve_token() == "from-home"
    (tmp_path / "tok").write_text("  from-path \n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert resolve_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert resolve_token() == "from-env"
    assert resolve_token("explicit") == "explicit"
    assert resolve_token("") is None  # explicit: send none
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(AuthError, match="RAY_AUTH_TOKEN_PATH=.*missing"):
        resolve_token()


# ---- the config edit ------------------------------------------------------------------------------------------------

SCORER_USER_CONFIG = {"artifact": "/srv/a/v1", "backend": "torch", "max_batch_size": 32, "limits": {"max_k": 100}}
DETAILS = {  # GET /api/serve/applications/ of Ray 2.60 (ServeInstanceDetails), trimmed of per-replica detail
    "controller_info": {"node_id": "n1", "actor_name": "SERVE_CONTROLLER_ACTOR"},
    "proxy_location": "EveryNode",
    "http_options": {"host": "0.0.0.0", "port": 8000, "root_path": "", "keep_alive_timeout_s": 90},
    "grpc_options": {"port": 9000, "grpc_servicer_functions": [], "enable_reflection": True},
    "proxies": {"n1": {"node_id": "n1", "status": "HEALTHY"}},
    "target_capacity": 50.0,
    "target_groups": [],
    "restores_unset_config_options": True,
    "applications": {
        "elmo": {
            "name": "elmo",
            "route_prefix": "/",
            "status": "RUNNING",
            "source": "declarative",
            "deployed_app_config": {
                "name": "elmo",
                "route_prefix": "/",
                "import_path": "elmo_serve.app:app_builder",
                "args": {"artifact": "/srv/a/v1", "backend": "torch"},
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}},
                "deployments": [
                    {
                        "name": "ModelScorer",
                        "max_ongoing_requests": 64,
                        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
                        "ray_actor_options": {"num_cpus": 1},
                        "user_config": SCORER_USER_CONFIG,
                    },
                    {"name": "Ingress", "max_ongoing_requests": 128},
                ],
            },
            "deployments": {
                "ModelScorer": {"name": "ModelScorer", "deployment_config": {"user_config": SCORER_USER_CONFIG}},
                "Ingress": {"name": "Ingress", "deployment_config": {"user_config": None}},
            },
        },
        "other": {
            "name": "other",
            "route_prefix": "/other",
            "status": "RUNNING",
            "source": "declarative",
            "deployed_app_config": {"name": "other", "route_prefix": "/other", "import_path": "m:app"},
            "deployments": {"Echo": {"name": "Echo", "deployment_config": {"user_config": {"greeting": "hi"}}}},
        },
        "adhoc": {  # from serve.run: no config to send back, and PUT leaves such apps alone
            "name": "adhoc",
            "route_prefix": "/adhoc",
            "status": "RUNNING",
            "source": "imperative",
            "deployed_app_config": None,
            "deployments": {},
        },
    },
}


def test_config_edit_changes_only_the_artifact():
    from ray.serve.schema import ServeDeploySchema

    before = copy.deepcopy(DETAILS)
    body = config_with_artifact(DETAILS, "/srv/a/v2")
    assert DETAILS == before  # the GET answer is not modified
    ServeDeploySchema.model_validate(body)  # what PUT validates
    expected = [copy.deepcopy(DETAILS["applications"][a]["deployed_app_config"]) for a in ("elmo", "other")]
    expected[0]["deployments"][0]["user_config"]["artifact"] = "/srv/a/v2"
    assert body["applications"] == expected
    for key in ("proxy_location", "http_options", "grpc_options", "target_capacity"):
        assert body[key] == DETAILS[key]
    assert set(body) == {"proxy_location", "http_options", "grpc_options", "target_capacity", "applications"}


def test_config_edit_adds_an_unlisted_deployment_from_its_live_user_config():
    body = config_with_artifact(DETAILS, "/srv/o/v2", app="other", deployment="Echo")
    other = next(a for a in body["applications"] if a["name"] == "other")
    assert other["deployments"] == [{"name": "Echo", "user_config": {"greeting": "hi", "artifact": "/srv/o/v2"}}]


@pytest.mark.parametrize(
    "app, deployment, message",
    [
        ("nope", "ModelScorer", r"no Serve application 'nope' on the cluster \(applications: \['adhoc', 'elmo'"),
        ("elmo", "Scorer", r"application 'elmo' has no deployment 'Scorer' \(deployments: \['Ingress', 'ModelScorer"),
        ("adhoc", "X", r"'adhoc' was not deployed from a config"),
    ],
)
def test_config_edit_names_what_is_missing(app, deployment, message):
    with pytest.raises(RollError, match=message):
        config_with_artifact(DETAILS, "/srv/a/v2", app=app, deployment=deployment)


def _dashboard(get_status=200, put_status=200, put_text=""):
    """A MockTransport standing for the dashboard's Serve REST API; records the requests."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        assert request.url.path == "/api/serve/applications/"
        if request.method == "GET":
            return httpx.Response(get_status, json=DETAILS) if get_status == 200 else httpx.Response(get_status)
        return httpx.Response(put_status, text=put_text)

    return httpx.MockTransport(handler), seen


def test_roll_sends_the_token_and_puts_the_edited_config(no_token_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    transport, seen = _dashboard()
    sent = roll_artifact("http://head:8265/", "/srv/a/v2", transport=transport)
    assert [r.method for r in seen] == ["GET", "PUT"]
    assert all(r.headers["authorization"] == "Bearer env-token" for r in seen)
    assert json.loads(seen[1].content) == sent == config_with_artifact(DETAILS, "/srv/a/v2")

    transport, seen = _dashboard()
    roll_artifact("http://head:8265", "/srv/a/v2", token="explicit", transport=transport)  # overrides the env
    assert all(r.headers["authorization"] == "Bearer explicit" for r in seen)


def test_roll_without_a_token_sends_no_header(no_token_env):
    transport, seen = _dashboard()
    roll_artifact("http://head:8265", "/srv/a/v2", transport=transport)
    assert all("authorization" not in r.headers for r in seen)


@pytest.mark.parametrize(
    "get_status, put_status, error, message",
    [
        (401, 200, AuthError, "answered 401.*no token was sent.*set RAY_AUTH_TOKEN"),
        (403, 200, AuthError, "answered 403.*not this cluster's.*set RAY_AUTH_TOKEN"),
        (200, 401, AuthError, "answered 401"),
        (200, 400, RollError, "the cluster refused the new Serve config \\(400\\): ValidationError"),
        (500, 200, RollError, "GET .* answered 500"),
    ],
)
def test_roll_errors_are_clear(no_token_env, get_status, put_status, error, message):
    transport, _ = _dashboard(get_status, put_status, "ValidationError(...)")
    with pytest.raises(error, match=message):
        roll_artifact("http://head:8265", "/srv/a/v2", transport=transport)


def test_roll_to_an_unreachable_dashboard_is_a_roll_error(no_token_env):
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(RollError, match="cannot reach the Ray dashboard at http://head:8265"):
        roll_artifact("http://head:8265", "/srv/a/v2", transport=httpx.MockTransport(refuse))


def test_wait_for_version_returns_when_served_and_raises_the_swap_error():
    old, new = {"model_version": "v1", "artifact": "/a/v1"}, {"model_version": "v2-x", "artifact": "/a/v2"}
    answers = iter([old, old, new])
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json=next(answers)))
    assert wait_for_version("http://s", "/a/v2", poll_s=0, transport=transport)["model_version"] == "v2-x"

    refused = {"model_version": "v1", "artifact": "/a/v1", "last_swap_error": "artifact /a/v2 refused: OSError: x"}
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json=refused))
    with pytest.raises(RollError, match="refused the new artifact and keep serving v1: artifact /a/v2 refused"):
        wait_for_version("http://s", "/a/v2", poll_s=0, transport=transport)


def test_submit_to_an_unreachable_dashboard_is_a_retrain_error():
    with pytest.raises(RetrainError, match="could not submit the job to http://127.0.0.1:1"):
        submit_retrain("http://127.0.0.1:1", ["--epochs", "1"], "/tmp/elmo-never", token="", log=lambda m: None)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--export", "relative/dir", "--", "--epochs", "1"], "must be an absolute path"),
        (["--export", "/abs/dir", "--", "--export", "/x"], "not in the train flags"),
        (["--export", "/abs/dir", "--working-dir", "/no/such/dir"], "is not a directory"),
    ],
)
def test_cli_usage_errors(argv, message, capsys):
    assert _cli(["retrain", "--address", "http://127.0.0.1:1", *argv]) == 2
    assert message in capsys.readouterr().err


# ---- a real cluster -------------------------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    with ExitStack() as stack:  # held open together: n distinct ports
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (Linux: /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _stop_session(proc: subprocess.Popen) -> None:
    """Stop the cluster started by `proc` and only it: `ray stop` would kill every Ray process on the machine,
    including the in-process Ray of the other serve tests. SIGTERM makes `ray start --block` take down its own
    processes; anything of its session left after that is killed by pid."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    deadline = time.monotonic() + 10
    while (left := _session_pids(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A `ray start --head` cluster in its own session, with its own temp dir (so `ray.init()` elsewhere never finds
    it through /tmp/ray/ray_current_cluster) and its own ports, and the app deployed on artifact v1 through the
    Serve REST API, as `serve deploy` does."""
    gcs, dashboard, http, grpc, *agent = _free_ports(11)
    temp_dir = tempfile.mkdtemp(prefix="elmo-ray-", dir="/tmp")  # short: Ray's unix socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_TOKEN"))}
    env |= {
        "RAY_AUTH_MODE": "disabled",  # a throwaway test cluster on 127.0.0.1 only; real clusters keep token auth
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM tears down at once (else a 30 s drain with Serve)
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # jobs find `elmo`
    }
    names = ["dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export", "runtime-env-agent"]
    names += ["ray-client-server", "node-manager", "object-manager"]  # none of Ray's defaults, which another may hold
    ports = dict(zip(names, agent, strict=True))
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    cmd += ["--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard)]
    cmd += ["--num-cpus", "2", "--temp-dir", temp_dir, "--min-worker-port", "0", "--max-worker-port", "0"]
    cmd += [f"--{name}-port={port}" for name, port in ports.items()]
    log = open(Path(temp_dir) / "ray-start.log", "w")  # closed in the finally
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address, serve_url = f"http://127.0.0.1:{dashboard}", f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(address + "/api/version", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed:\n{(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(0.5)

        v1 = str(make_artifact(tmp_path_factory.mktemp("retrain") / "v1", seed=1))
        scorer = {"artifact": v1, "backend": "torch", "max_batch_size": 8}
        app = {
            "name": "elmo",
            "route_prefix": "/",
            "import_path": "elmo_serve.app:app_builder",
            "args": {"artifact": v1, "backend": "torch"},
            "deployments": [
                {
                    "name": "ModelScorer",
                    "num_replicas": 1,
                    "ray_actor_options": {"num_cpus": 0.5},
                    "user_config": scorer,
                },
                {"name": "Ingress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
            ],
        }
        config = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": http},
            "grpc_options": {"port": grpc},
            "applications": [app],
        }
        r = httpx.put(address + "/api/serve/applications/", json=config, timeout=60)
        assert r.status_code == 200, r.text
        info = wait_for_version(serve_url, v1, timeout_s=120)
        yield {"address": address, "serve_url": serve_url, "v1": v1, "v1_version": info["model_version"]}
    finally:
        _stop_session(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _scorer_pid(address: str) -> int:
    details = httpx.get(address + "/api/serve/applications/", timeout=10).json()
    (replica,) = details["applications"]["elmo"]["deployments"]["ModelScorer"]["replicas"]
    return replica["pid"]


def test_failed_job_raises_and_does_not_roll(cluster, tmp_path, capsys):
    export = str(tmp_path / "never")
    with pytest.raises(
        RetrainError, match=r"(?s)job raysubmit_\w+ FAILED .*exit code 2.*unrecognized arguments: --no-such"
    ):
        submit_retrain(cluster["address"], ["--no-such-flag", "1"], export, working_dir=REPO, token="", poll_s=0.3)

    argv = ["retrain", "--address", cluster["address"], "--export", export, "--serve-url", cluster["serve_url"]]
    assert _cli([*argv, "--working-dir", str(REPO), "--", "--no-such-flag", "1"]) == 1
    err = capsys.readouterr().err
    assert "elmo retrain: job raysubmit_" in err and "unrecognized arguments: --no-such-flag" in err
    info = httpx.get(cluster["serve_url"] + "/v1/model", timeout=10).json()
    assert info["model_version"] == cluster["v1_version"] and info["last_swap_error"] is None
    assert not Path(export).exists()


def test_retrain_job_rolls_the_new_artifact_into_the_running_app(cluster, tmp_path):
    from elmo_serve.app import load_model

    export = str(tmp_path / "v2")
    args = [*QUICK_TRAIN, "--out", str(tmp_path / "run")]
    lines = []
    result = submit_retrain(
        cluster["address"], args, export, working_dir=REPO, token="", poll_s=0.5, timeout_s=300, log=lines.append
    )
    assert result.status == "SUCCEEDED" and result.export_dir == export and "test metrics" in result.logs_tail
    assert lines[-1] == f"job {result.job_id}: SUCCEEDED"
    model = load_model(export, "torch")  # the serving code loads it (and scores a probe text)
    assert (Path(export) / "manifest.json").is_file() and model.version != cluster["v1_version"]

    pid = _scorer_pid(cluster["address"])
    sent = roll_artifact(cluster["address"], export, token="")
    assert sent["applications"][0]["args"]["artifact"] == cluster["v1"]  # only user_config changed
    info = wait_for_version(cluster["serve_url"], export, timeout_s=120)
    assert info["model_version"] == model.version and info["num_labels"] == model.num_labels
    assert info["last_swap_error"] is None
    assert _scorer_pid(cluster["address"]) == pid  # reconfigured in place, not restarted

    r = httpx.post(cluster["serve_url"] + "/v1/predict", json={"texts": ["python xml parser"], "k": 5}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == model.version and len(r.json()["results"][0]) == 5
