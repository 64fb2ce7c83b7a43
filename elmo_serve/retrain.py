"""Retraining as a Ray job, rolled into the running Serve application.

    elmo retrain --address http://HEAD:8265 --export /srv/elmo/artifacts/deps-v3 --serve-url http://HEAD:8000 \\
        -- --data /srv/elmo/data/debian-deps --epochs 3 --out /srv/elmo/runs/deps-v3

1. `submit_retrain` runs `elmo train ... --export DIR` as a Ray job (the job API of the dashboard) and waits for it.
2. `roll_artifact` reads the Serve config the cluster runs (`GET /api/serve/applications/`), points
   `user_config.artifact` of the scorer deployment at DIR and `PUT`s the config back. Only `user_config` changes, so
   Serve calls `reconfigure()` on the live replicas (the app's hot swap) instead of restarting them.
3. `wait_for_version` polls the app's `GET /v1/model` until DIR is served, or raises the replicas' swap error.

Ray 2.60 clusters use token authentication: the job API and the Serve REST API want `Authorization: Bearer TOKEN`.
The token is read as Ray's own clients read it (`token=` first, then `RAY_AUTH_TOKEN`, the file named by
`RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`) and sent whenever one is found: Ray's client sends it only when
`RAY_AUTH_MODE=token` is also set in the client's environment, an easy step to miss.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

SERVE_API = "/api/serve/applications/"
_AUTH_HINT = (
    "the cluster uses token authentication: set RAY_AUTH_TOKEN to the cluster's token (or RAY_AUTH_TOKEN_PATH to a "
    "file holding it, or put it in ~/.ray/auth_token); `ray get-auth-token` prints it on the head node, KubeRay "
    "keeps it in the cluster's token Secret"
)


class RetrainError(RuntimeError):
    """The training job failed, was stopped or timed out (the message names the job and ends with its logs)."""


class RollError(RuntimeError):
    """The Serve application or deployment is not there, the cluster refused the new config, or the replicas
    refused the new artifact."""


class AuthError(RuntimeError):
    """The dashboard answered 401/403: no token, or the wrong one."""


def resolve_token(token: str | None = None) -> str | None:
    """The cluster token to send, in Ray's order: `token` (an empty string sends none), `RAY_AUTH_TOKEN`, the file
    named by `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`. None when there is none."""
    if token is not None:
        return token.strip() or None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            text = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise AuthError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {e}") from None
        if not text:
            raise AuthError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
        return text
    default = Path.home() / ".ray" / "auth_token"
    return (default.read_text().strip() or None) if default.is_file() else None


def auth_headers(token: str | None) -> dict[str, str]:
    """The header Ray's dashboard checks (`X-Ray-Authorization` is its fallback for proxies that eat this one)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _auth_message(status: int, url: str, body: str) -> str:
    what = "the token sent is not this cluster's" if status == 403 else "no token was sent"
    return f"{url} answered {status} ({body.strip()[:200]}): {what}; {_AUTH_HINT}"


@dataclass(frozen=True)
class RetrainResult:
    job_id: str
    status: str
    export_dir: str
    logs_tail: str


def train_entrypoint(train_args: list[str], export_dir: str, elmo: str = "elmo") -> str:
    """The job's shell command. `export_dir` must be absolute: the job runs in a temporary working directory, and the
    Serve replicas must find the artifact at the same path."""
    if not os.path.isabs(export_dir):
        raise ValueError(f"export dir {export_dir!r} must be an absolute path the Serve replicas can read")
    if any(a == "--export" or a.startswith("--export=") for a in train_args):
        raise ValueError(
            "give the artifact directory as the export dir (--export of `elmo retrain`), not in the train flags"
        )
    return " ".join([elmo, "train", *map(shlex.quote, train_args), "--export", shlex.quote(export_dir)])


def _logs_tail(client, job_id: str, lines: int = 40) -> str:
    try:
        return "\n".join(client.get_job_logs(job_id).rstrip().splitlines()[-lines:])
    except Exception as e:  # the logs are a courtesy: never hide the job's own error behind this one
        return f"(logs unavailable: {type(e).__name__}: {e})"


def submit_retrain(
    address: str,
    train_args: list[str],
    export_dir: str,
    *,
    working_dir: str | Path | None = None,
    runtime_env: dict | None = None,
    elmo: str = "elmo",
    token: str | None = None,
    timeout_s: float = 3600.0,
    poll_s: float = 2.0,
    log: Callable[[str], None] = print,
) -> RetrainResult:
    """Run `elmo train TRAIN_ARGS --export EXPORT_DIR` as a Ray job on the cluster whose dashboard is `address`
    (http://HEAD:8265), print its status changes and wait for it.

    `working_dir` (e.g. the repository) is uploaded with the job, minus what .gitignore excludes; it only adds code:
    nothing is installed, the job runs in the cluster's environment, where `elmo` (the command, "elmo" on its PATH
    by default, e.g. "/opt/venv/bin/elmo") runs the CLI. Raises RetrainError naming the job and ending with its logs
    if it does not succeed; on timeout the job is stopped first.
    """
    import ray.exceptions
    from ray.job_submission import JobStatus, JobSubmissionClient

    auth_failed = getattr(ray.exceptions, "AuthenticationError", ())  # an older Ray: no token auth

    entrypoint = train_entrypoint(list(train_args), export_dir, elmo)
    env = dict(runtime_env or {})
    if working_dir is not None:
        env["working_dir"] = str(working_dir)
    try:
        client = JobSubmissionClient(address, headers=auth_headers(resolve_token(token)))
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env or None)
    except auth_failed as e:
        raise AuthError(f"{address}: {str(e).splitlines()[0]}; {_AUTH_HINT}") from None
    except (ConnectionError, RuntimeError) as e:  # unreachable, or the job refused (e.g. a bad runtime_env)
        raise RetrainError(f"could not submit the job to {address}: {e}") from e
    log(f"job {job_id} submitted to {address}: {entrypoint}")
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        try:
            status = client.get_job_status(job_id)
        except Exception as e:
            raise RetrainError(f"lost track of job {job_id} ({type(e).__name__}: {e}); see `ray job status`") from e
        if status != last:
            log(f"job {job_id}: {status.value}")
            last = status
        if status.is_terminal():
            break
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            for _ in range(int(30 / max(poll_s, 0.1))):  # give it the time to stop, so the tail is the real end
                if client.get_job_status(job_id).is_terminal():
                    break
                time.sleep(max(poll_s, 0.1))
            tail = _logs_tail(client, job_id)
            raise RetrainError(
                f"job {job_id} did not finish within {timeout_s:g} s and was stopped; its logs end:\n{tail}"
            )
        time.sleep(poll_s)
    tail = _logs_tail(client, job_id)
    if status != JobStatus.SUCCEEDED:
        message = (client.get_job_info(job_id).message or "").strip()
        reason = message.splitlines()[0].split(", last available logs")[0] if message else status.value
        raise RetrainError(f"job {job_id} {status.value} ({reason}); its logs end:\n{tail}")
    return RetrainResult(job_id, status.value, export_dir, tail)


def config_with_artifact(details: dict, artifact: str, *, app: str = "elmo", deployment: str = "ModelScorer") -> dict:
    """The PUT body (a ServeDeploySchema) that changes only `user_config.artifact` of `deployment` in `app`.

    `details` is what `GET /api/serve/applications/` answers (a ServeInstanceDetails): `applications` maps each name
    to its details, whose `deployed_app_config` is the exact config submitted (None when the app came from
    `serve.run`). PUT is declarative: every application deployed from a config and left out would be deleted, and
    a cluster-wide field left out would be reset (e.g. `target_capacity`), so all of them are sent back.
    """
    apps = details.get("applications") or {}
    if app not in apps:
        raise RollError(f"no Serve application {app!r} on the cluster (applications: {sorted(apps) or 'none'})")
    if apps[app].get("deployed_app_config") is None:
        raise RollError(
            f"application {app!r} was not deployed from a config (serve.run or `elmo serve`): redeploy it with "
            "`serve deploy` (or KubeRay) to roll artifacts into it"
        )
    configs = [copy.deepcopy(a["deployed_app_config"]) for a in apps.values() if a.get("deployed_app_config")]
    if "<redacted>" in json.dumps(configs):
        raise RollError("the cluster sent a redacted config (a browser-like request?): putting it back would lose data")
    target = next(c for c in configs if c["name"] == app)
    listed = {d["name"]: d for d in target.setdefault("deployments", [])}
    if deployment in listed:
        entry = listed[deployment]
        user_config = entry.get("user_config")
    else:  # running with the options of the code: take its live user_config as the base
        live = (apps[app].get("deployments") or {}).get(deployment)
        if live is None:
            raise RollError(f"application {app!r} has no deployment {deployment!r} (deployments: {sorted(listed)})")
        entry = {"name": deployment}
        target["deployments"].append(entry)
        user_config = (live.get("deployment_config") or {}).get("user_config")
    if user_config is not None and not isinstance(user_config, dict):
        raise RollError(f"user_config of {app}/{deployment} is not a mapping: {user_config!r}")
    entry["user_config"] = {**(user_config or {}), "artifact": str(artifact)}
    body = {
        k: details[k] for k in ("proxy_location", "http_options", "grpc_options", "target_capacity") if k in details
    }
    return body | {"applications": configs}


def config_with_app(details: dict, app_config: dict) -> dict:
    """The PUT body (a ServeDeploySchema) that deploys `app_config` (replacing the application of its name) and keeps
    every other application deployed from a config, and the cluster-wide fields, as they are (see
    `config_with_artifact`). `details` as `GET /api/serve/applications/` answers it, or `{}` for an empty Serve."""
    apps = details.get("applications") or {}
    imperative = sorted(n for n, a in apps.items() if a.get("deployed_app_config") is None and n != app_config["name"])
    if imperative:
        raise RollError(
            f"applications {imperative} were deployed with serve.run: Serve refuses a config beside them (delete them "
            "or deploy them from a config)"
        )
    configs = [copy.deepcopy(a["deployed_app_config"]) for n, a in apps.items() if a.get("deployed_app_config")]
    configs = [c for c in configs if c["name"] != app_config["name"]] + [copy.deepcopy(app_config)]
    body = {
        k: details[k] for k in ("proxy_location", "http_options", "grpc_options", "target_capacity") if k in details
    }
    return body | {"applications": configs}


def declared_artifact(details: dict, *, app: str = "elmo", deployment: str = "ModelScorer") -> str | None:
    """`user_config.artifact` of `deployment` in the config `app` was deployed from (None if it names none)."""
    config = ((details.get("applications") or {}).get(app) or {}).get("deployed_app_config") or {}
    for entry in config.get("deployments") or []:
        if entry.get("name") == deployment:
            return (entry.get("user_config") or {}).get("artifact")
    return None


def roll_artifact(
    address: str,
    artifact: str,
    *,
    app: str = "elmo",
    deployment: str = "ModelScorer",
    token: str | None = None,
    timeout_s: float = 30.0,
    transport: httpx.BaseTransport | None = None,
) -> dict:
    """Point `user_config.artifact` of `deployment` in `app` at `artifact` through the Serve REST API of the dashboard
    at `address`; returns the config sent. Serve then reconfigures the running replicas: they load the new artifact
    beside the old one and switch, or keep the old one and report why (see `wait_for_version`)."""
    url = address.rstrip("/") + SERVE_API
    headers = auth_headers(resolve_token(token))
    try:
        with httpx.Client(headers=headers, timeout=timeout_s, transport=transport) as http:
            r = http.get(url)
            if r.status_code in (401, 403):
                raise AuthError(_auth_message(r.status_code, url, r.text))
            if r.status_code != 200:
                raise RollError(f"GET {url} answered {r.status_code}: {r.text.strip()[:500]}")
            body = config_with_artifact(r.json(), artifact, app=app, deployment=deployment)
            r = http.put(url, json=body)
            if r.status_code in (401, 403):
                raise AuthError(_auth_message(r.status_code, url, r.text))
            if r.status_code != 200:
                raise RollError(f"the cluster refused the new Serve config ({r.status_code}): {r.text.strip()[:2000]}")
    except httpx.HTTPError as e:
        raise RollError(f"cannot reach the Ray dashboard at {address}: {type(e).__name__}: {e}") from e
    return body


def wait_for_version(
    serve_url: str,
    artifact: str,
    *,
    version: str | None = None,
    timeout_s: float = 300.0,
    poll_s: float = 0.5,
    transport: httpx.BaseTransport | None = None,
) -> dict:
    """Poll the app's `GET /v1/model` until it serves `artifact` (the path the replica reports, or `version`); returns
    that answer. Raises RollError with the replica's `last_swap_error` if it refused the artifact, TimeoutError if
    nothing changes in time. With several replicas this sees one of them per request."""
    wanted = os.path.normpath(artifact)
    deadline, info = time.monotonic() + timeout_s, {}
    with httpx.Client(base_url=serve_url.rstrip("/"), timeout=30, transport=transport) as http:
        while True:
            try:
                r = http.get("/v1/model")
                info = r.json() if r.status_code == 200 else info
            except (httpx.HTTPError, ValueError):
                pass  # a proxy or replica that is restarting: ask again
            if info.get("artifact") == wanted or (version is not None and info.get("model_version") == version):
                return info
            error = info.get("last_swap_error") or ""
            if wanted in error:
                raise RollError(
                    f"the replicas refused the new artifact and keep serving {info.get('model_version')}: {error}"
                )
            if time.monotonic() > deadline:
                served = f"{info.get('model_version')} ({info.get('artifact')})"
                raise TimeoutError(f"{serve_url} still serves {served} after {timeout_s:g} s")
            time.sleep(poll_s)


def _settled(details: dict, app: str, deployment: str) -> bool:
    entry = (details.get("applications") or {}).get(app) or {}
    status = ((entry.get("deployments") or {}).get(deployment) or {}).get("status")
    return entry.get("status") == "RUNNING" and status == "HEALTHY"


def swap_artifact(
    artifact: str,
    *,
    get_details: Callable[[], dict],
    deploy: Callable[[dict], None],
    serve_url: str,
    check: Callable[[str], object] | None = None,
    app: str = "elmo",
    deployment: str = "ModelScorer",
    timeout_s: float = 300.0,
    poll_s: float = 0.2,
    transport: httpx.BaseTransport | None = None,
) -> dict:
    """Swap the artifact of an application whose declared config this process reads (`get_details`, a
    ServeInstanceDetails) and writes (`deploy`, a ServeDeploySchema body): the local `elmo serve`.

    The declared state stays equal to what is served, so a replica that restarts, or a new autoscaled one, loads the
    artifact the others serve: `check` (e.g. loading the artifact here) refuses a bad one before anything is
    declared; if a replica still refuses it, the previous config is declared again. Returns `{"ok", "model_version",
    "artifact", "error", "seconds"}`; `artifact` and `model_version` are what is served afterwards."""
    t0, path = time.monotonic(), os.path.normpath(os.path.abspath(artifact))
    before = get_details()
    old_artifact = declared_artifact(before, app=app, deployment=deployment)

    def served(ok: bool, error: str | None = None) -> dict:
        with httpx.Client(base_url=serve_url.rstrip("/"), timeout=30, transport=transport) as http:
            info = http.get("/v1/model").json()
        return {
            "ok": ok,
            "model_version": info.get("model_version"),
            "artifact": info.get("artifact"),
            "error": error,
            "seconds": round(time.monotonic() - t0, 3),
        }

    if check is not None:
        try:
            check(path)
        except Exception as e:  # refused before anything is declared: nothing changes anywhere
            return served(False, f"artifact {path} refused: {type(e).__name__}: {e}")
    body = config_with_artifact(before, path, app=app, deployment=deployment)
    deploy(body)
    error = None
    try:
        wait_for_version(serve_url, path, timeout_s=timeout_s, poll_s=poll_s, transport=transport)
        deadline = time.monotonic() + timeout_s
        while not _settled(get_details(), app, deployment):  # every replica has been reconfigured
            if time.monotonic() > deadline:
                raise TimeoutError(f"{app}/{deployment} did not settle within {timeout_s:g} s")
            time.sleep(poll_s)
        with httpx.Client(base_url=serve_url.rstrip("/"), timeout=30, transport=transport) as http:
            replicas = len(((get_details()["applications"][app]["deployments"][deployment]).get("replicas")) or [1])
            for _ in range(4 * replicas):  # ask around: one replica that kept the old model refused the swap
                info = http.get("/v1/model").json()
                if info.get("artifact") != path:
                    raise RollError(info.get("last_swap_error") or f"a replica still serves {info.get('artifact')}")
    except (RollError, TimeoutError) as e:
        error = str(e)
    if error is None:
        return served(True)
    if old_artifact is not None:  # declare what is served again
        deploy(config_with_artifact(get_details(), old_artifact, app=app, deployment=deployment))
        wait_for_version(serve_url, old_artifact, timeout_s=timeout_s, poll_s=poll_s, transport=transport)
    return served(False, error)


def _retrain(args: argparse.Namespace) -> int:
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if not args.address:
        print(
            "elmo retrain: give the dashboard's URL: --address http://HEAD:8265 (or RAY_DASHBOARD_ADDRESS)",
            file=sys.stderr,
        )
        return 2
    if args.working_dir and not Path(args.working_dir).is_dir():
        print(f"elmo retrain: --working-dir {args.working_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        train_entrypoint(train_args, args.export, args.elmo_cmd)
    except ValueError as e:
        print(f"elmo retrain: {e}", file=sys.stderr)
        return 2
    try:
        result = submit_retrain(
            args.address,
            train_args,
            args.export,
            working_dir=args.working_dir,
            elmo=args.elmo_cmd,
            timeout_s=args.timeout_s,
            log=lambda m: print(m, flush=True),
        )
        print(result.logs_tail)
        if args.no_roll:
            print(f"artifact {args.export} written by job {result.job_id}; not rolled (--no-roll)")
            return 0
        roll_artifact(args.address, args.export, app=args.app)
        print(f"application {args.app!r}: ModelScorer's user_config.artifact -> {args.export}", flush=True)
        if args.serve_url:
            info = wait_for_version(args.serve_url, args.export)
            print(f"{args.serve_url} serves {info['model_version']} ({info['num_labels']} labels)")
    except (RetrainError, RollError, AuthError, TimeoutError) as e:
        print(f"elmo retrain: {e}", file=sys.stderr)
        return 1
    return 0


def add_retrain_command(subparsers) -> None:
    """Register `elmo retrain` on the `elmo` parser's subparsers (its `func` returns the exit code: 0 done, 1 the job
    failed or the roll was refused, 2 bad usage)."""
    p = subparsers.add_parser(
        "retrain",
        help="retrain as a Ray job on a cluster, then roll the new artifact into its Serve application",
        description="Run `elmo train FLAGS --export DIR` as a Ray job, then point the running Serve application's "
        "ModelScorer at DIR (hot swap, no restart). The cluster's token is read from RAY_AUTH_TOKEN, "
        "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.",
        epilog="example: elmo retrain --address http://HEAD:8265 --export /srv/elmo/artifacts/v3 -- --epochs 3",
    )
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_DASHBOARD_ADDRESS"),
        help="dashboard URL, port 8265 (default: $RAY_DASHBOARD_ADDRESS)",
    )
    p.add_argument("--export", required=True, help="absolute artifact directory, readable by the Serve replicas")
    p.add_argument("--app", default="elmo", help="Serve application to roll the artifact into")
    p.add_argument(
        "--serve-url",
        default=None,
        help="the app's HTTP URL: wait until it serves the new artifact (default: do not wait)",
    )
    p.add_argument("--no-roll", action="store_true", help="train and export only")
    p.add_argument(
        "--working-dir", default=None, help="code uploaded with the job, e.g. this repository (default: none)"
    )
    p.add_argument("--elmo-cmd", default="elmo", help="how the cluster runs the elmo CLI (default: elmo on its PATH)")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="stop the job after this long")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the flags of `elmo train`")
    p.set_defaults(func=_retrain)
