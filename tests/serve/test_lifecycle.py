"""`elmo serve` as a user runs it: its own Ray node on loopback, swaps through `elmo swap` that stick, replica load
errors reported at once, and SIGTERM / SIGINT stopping every process it started.

Each service runs as a subprocess in its own session (start_new_session), so "every process it started" is every
process of that session (Linux /proc); whatever a test leaves there is killed by pid at the end.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from elmo_serve import control
from elmo_serve.commands import failure_line, serve_command, swap_command
from elmo_serve.retrain import swap_artifact

ELMO = str(Path(sys.executable).parent / "elmo")
pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)")


# ---- processes and sockets ------------------------------------------------------------------------------------------


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _address(hexaddr: str) -> tuple[str, int]:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:  # /proc/net/tcp holds the address as one little-endian word
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    return socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *struct.unpack("<4I", raw))), int(port, 16)


def listening(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket (and bound UDP socket) held by `pids`."""
    inodes = {}
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            rows = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == ("0A" if table.startswith("tcp") else "07"):  # LISTEN / an unconnected UDP socket
                inodes[f[9]] = _address(f[1])
    out = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                out.add((pid, *inodes[link[8:-1]]))
    return sorted(out)


def _loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1") or ip.startswith("::ffff:127.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Service:
    """`elmo serve ARGS` in its own session; its output lines (with the time each arrived) are collected."""

    def __init__(self, artifact, port: int, run_dir: Path, *flags: str, env: dict | None = None):
        self.port, self.url, self.run_dir = port, f"http://127.0.0.1:{port}", run_dir
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ELMO_"))}
        environ |= {"ELMO_RUN_DIR": str(run_dir), "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
        cmd = [ELMO, "serve", str(artifact), "--port", str(port), "--backend", "torch", *flags]
        self.proc = subprocess.Popen(
            cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, prefix: str, timeout_s: float = 180) -> float:
        """The time the first line starting with `prefix` arrived (fails if the service exits first)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if line.startswith(prefix):
                    return at
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        pytest.fail(f"no line starting {prefix!r}; output:\n{self.output[-4000:]}")

    def pids(self) -> list[int]:
        return _session_pids(self.proc.pid)

    def replicas(self, deployment: str = "ModelScorer") -> list[int]:
        return [p for p in self.pids() if _cmdline(p).startswith(f"ray::ServeReplica:elmo:{deployment}")]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for whatever of its session is left (also after a failed test)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reader.join(5)


def _versions(url: str, n: int) -> set[str]:
    with httpx.Client(base_url=url, timeout=30) as c:
        return {c.get("/v1/model").json()["model_version"] for _ in range(n)}


def _stop_within(service: Service, sig: int, limit_s: float = 10.0) -> float:
    before = service.pids()
    assert before, "the service has no processes to stop"
    t0 = time.monotonic()
    service.proc.send_signal(sig)
    rc = service.proc.wait(timeout=60)
    while service.pids() and time.monotonic() - t0 < 60:
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    service._reader.join(5)
    left = [(p, _cmdline(p)) for p in service.pids()]
    assert rc == 0, service.output[-3000:]
    assert not left, f"processes left after {signal.Signals(sig).name}: {left}"
    assert elapsed < limit_s, f"{signal.Signals(sig).name} took {elapsed:.1f} s to stop everything"
    assert "service stopped" in service.output
    assert "Traceback" not in service.output, service.output[-3000:]
    assert _port_free(service.port)
    return elapsed


# ---- the control directory and the swap, without Ray ----------------------------------------------------------------


def test_control_directory_is_private_and_requests_round_trip(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    with pytest.raises(control.ControlError, match="open to other users"):
        control.ensure_private_dir(loose)
    directory = control.ensure_private_dir(control.run_dir(8123, tmp_path / "run"))
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
    with pytest.raises(control.ControlError, match="no `elmo serve` on port 8123"):
        control.request_swap(8123, "x", root=tmp_path / "run", timeout_s=1)
    control.write_json(directory / control.SERVICE_FILE, {"pid": os.getpid(), "url": "http://127.0.0.1:8123"})
    assert oct((directory / control.SERVICE_FILE).stat().st_mode & 0o777) == "0o600"

    def answer():  # the service's side: take the request, answer it
        while not (taken := control.take_requests(directory)):
            time.sleep(0.05)
        ((request_id, body),) = taken
        control.write_result(directory, request_id, {"ok": True, "artifact": body["artifact"]})

    server = threading.Thread(target=answer)
    server.start()
    result = control.request_swap(8123, str(tmp_path / "a"), root=tmp_path / "run", timeout_s=30, poll_s=0.05)
    server.join()
    assert result == {"ok": True, "artifact": str((tmp_path / "a").resolve())}
    assert sorted(p.name for p in directory.iterdir()) == [control.SERVICE_FILE]  # request and result consumed


def test_swap_command_without_a_service_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ELMO_RUN_DIR", str(tmp_path))
    assert swap_command(str(tmp_path / "missing"), 8123) == 2
    assert "no artifact directory" in capsys.readouterr().err
    assert swap_command(str(tmp_path), 8123) == 1
    err = capsys.readouterr().err
    assert "no `elmo serve` on port 8123" in err and len(err.strip().splitlines()) == 1


def test_serve_refuses_num_cpus_with_an_address(tmp_path, capsys):
    assert serve_command(str(tmp_path), address="127.0.0.1:6379", num_cpus=2, run_root=str(tmp_path)) == 2
    assert "--num-cpus" in capsys.readouterr().err


def test_replica_grpc_bind_is_redirected_to_the_host(monkeypatch):
    from ray.serve._private import replica

    from elmo_serve.app import REPLICA_GRPC_HOST_ENV, bind_replica_grpc

    bound = []
    monkeypatch.setattr(replica, "add_port_to_grpc_server", lambda server, address: bound.append(address) or 7)
    monkeypatch.delenv(REPLICA_GRPC_HOST_ENV, raising=False)
    assert not bind_replica_grpc()  # unset: Ray's own bind
    monkeypatch.setenv(REPLICA_GRPC_HOST_ENV, "127.0.0.1")
    assert bind_replica_grpc() and bind_replica_grpc()  # twice (two deployments in one process): wrapped once
    assert replica.add_port_to_grpc_server(None, "[::]:0") == 7
    assert replica.add_port_to_grpc_server(None, "10.0.0.1:5000") == 7  # an explicit address is left alone
    assert bound == ["127.0.0.1:0", "10.0.0.1:5000"]


def test_failure_line_names_the_error():
    message = "A replica failed to start. Error:\nTraceback (most recent call last):\n  File x\nValueError: bad head\n"
    assert failure_line(message) == "ValueError: bad head"
    assert failure_line("no traceback here") == "no traceback here"


def _details(artifact: str, status: str = "HEALTHY") -> dict:
    app = {"name": "elmo", "deployments": [{"name": "ModelScorer", "user_config": {"artifact": artifact}}]}
    return {
        "applications": {
            "elmo": {
                "status": "RUNNING",
                "deployed_app_config": app,
                "deployments": {"ModelScorer": {"status": status, "replicas": [{}, {}]}},
            }
        }
    }


def test_swap_refused_by_the_check_declares_nothing():
    declared = []
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={"model_version": "v1", "artifact": "/a/v1"}))

    def check(path):
        raise ValueError("head.safetensors is truncated")

    out = swap_artifact(
        "/a/bad", get_details=lambda: _details("/a/v1"), deploy=declared.append, serve_url="http://x", check=check,
        transport=transport,
    )  # fmt: skip
    assert declared == [] and not out["ok"] and "truncated" in out["error"] and out["model_version"] == "v1"


def test_swap_refused_by_a_replica_declares_the_served_artifact_again():
    state = {"declared": "/a/v1"}
    declared = []

    def deploy(body):
        declared.append(body["applications"][0]["deployments"][0]["user_config"]["artifact"])
        state["declared"] = declared[-1]

    def model(request):  # the replica keeps v1 and reports why
        error = None if state["declared"] == "/a/v1" else "artifact /a/v2 refused: OSError: disk"
        return httpx.Response(200, json={"model_version": "v1", "artifact": "/a/v1", "last_swap_error": error})

    out = swap_artifact(
        "/a/v2", get_details=lambda: _details(state["declared"]), deploy=deploy, serve_url="http://x",
        transport=httpx.MockTransport(model), poll_s=0.01,
    )  # fmt: skip
    assert declared == ["/a/v2", "/a/v1"] and state["declared"] == "/a/v1"
    assert not out["ok"] and "disk" in out["error"] and out["artifact"] == "/a/v1"


# ---- a real `elmo serve` --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(artifacts, tmp_path_factory):
    """`elmo serve v1 --replicas 2`, with RAY_ADDRESS pointing at nothing: it must start its own node regardless."""
    run = tmp_path_factory.mktemp("run")
    s = Service(
        artifacts["v1"], _free_port(), run, "--replicas", "2", "--num-cpus", "4", env={"RAY_ADDRESS": "127.0.0.1:1"}
    )
    try:
        s.wait_for("serving ")
        yield s
    finally:
        s.stop()


def test_it_starts_its_own_node_and_listens_only_on_loopback(service):
    assert "Ray: started a local node on 127.0.0.1" in service.output
    sockets = listening(service.pids())
    assert any(port == service.port and _loopback(ip) for _, ip, port in sockets), sockets  # the listing works
    outside = [(pid, ip, port, _cmdline(pid)[:60]) for pid, ip, port in sockets if not _loopback(ip)]
    # the replicas' inter-deployment gRPC servers too (Ray binds them to [::]: elmo_serve.app.bind_replica_grpc)
    assert outside == [], outside
    replicas = service.replicas("ModelScorer") + service.replicas("Ingress")
    assert len(replicas) == 3 and all(any(p == pid for p, _, _ in sockets) for pid in replicas), (replicas, sockets)


def test_refused_swap_sticks_to_the_served_model_across_replica_restarts(service, artifacts, capsys, monkeypatch):
    monkeypatch.setenv("ELMO_RUN_DIR", str(service.run_dir))
    assert swap_command(str(artifacts["v2"]), service.port) == 0
    out = capsys.readouterr().out
    v2 = next(w for w in out.split() if w.startswith("v2-"))
    assert _versions(service.url, 12) == {v2}
    assert swap_command(str(artifacts["corrupt"]), service.port) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "head.safetensors" in err and f"still serving {v2}" in err
    assert _versions(service.url, 12) == {v2}
    # Replace both replicas: every answer then comes from a replica started after the refusal (before the fix, they
    # loaded the artifact the app was built with, v1).
    old = service.replicas()
    assert len(old) == 2
    for victim in old:
        os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while len([p for p in service.replicas() if p not in old]) < 2:
        assert time.monotonic() < deadline, "no replacement replicas"
        time.sleep(0.2)
    seen, deadline = [], time.monotonic() + 90
    with httpx.Client(base_url=service.url, timeout=10) as c:
        while len(seen) < 20:
            assert time.monotonic() < deadline, f"the replacements did not answer: {seen}"
            try:
                r = c.get("/v1/model")
            except httpx.HTTPError:
                r = None
            if r is not None and r.status_code == 200:
                seen.append(r.json()["model_version"])
            else:
                time.sleep(0.2)
    assert set(seen) == {v2}, seen
    assert json.loads((service.run_dir / str(service.port) / control.SERVICE_FILE).read_text())["pid"]


def test_sigterm_stops_every_process_it_started(service):
    _stop_within(service, signal.SIGTERM)
    assert not (service.run_dir / str(service.port) / control.SERVICE_FILE).exists()


def test_sigint_stops_every_process_it_started(artifacts, tmp_path):
    s = Service(artifacts["v1"], _free_port(), tmp_path)
    try:
        s.wait_for("serving ")
        _stop_within(s, signal.SIGINT)
    finally:
        s.stop()


def test_a_replica_load_error_reaches_the_output_at_once(artifacts, tmp_path):
    s = Service(artifacts["corrupt"], _free_port(), tmp_path)
    try:
        gone = None  # when the first scorer replica (whose constructor fails) exits
        seen = set()
        deadline = time.monotonic() + 120
        while s.proc.poll() is None and time.monotonic() < deadline:
            now = set(s.replicas())
            if gone is None and seen - now:
                gone = time.monotonic()
            seen |= now
            time.sleep(0.05)
        s._reader.join(5)
        errors = [(at, line) for at, line in s.lines if line.startswith("elmo serve: ")]
        assert s.proc.returncode == 1 and errors, s.output[-3000:]
        ((at, line),) = errors
        assert "ModelScorer replica failed to start" in line and "head.safetensors" in line, line
        assert gone is None or at - gone < 5.0, f"the error came {at - gone:.1f} s after the replica died"
        assert at - s.wait_for("Ray: started") < 60
    finally:
        s.stop()
