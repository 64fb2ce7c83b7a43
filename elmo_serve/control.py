"""The local service's control directory: how `elmo swap` reaches the `elmo serve` that owns a port.

A local `elmo serve` binds nothing beyond loopback and runs no dashboard, so neither the Serve REST API nor
`serve deploy` can reach it. Instead each service owns a directory, `$ELMO_RUN_DIR/PORT` (default
`~/.elmo/serve/PORT`), created with mode 0700: only its owner can read or write there, which is the whole of the
authentication, and no socket is opened for it. The service writes `service.json` (pid, url, artifact) when it
serves and removes it when it stops. `elmo swap` drops a request file there (written to a temporary name, then
renamed, so the service never reads half of one); the service, which polls the directory while it serves, performs
the swap and answers with a result file beside it, which `elmo swap` reads and removes.
"""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path

SERVICE_FILE = "service.json"
_REQUEST, _RESULT = ".swap-request.json", ".swap-result.json"


class ControlError(RuntimeError):
    """No service on that port, an unsafe control directory, or no answer in time."""


def run_dir(port: int, root: str | os.PathLike | None = None) -> Path:
    """The control directory of the service on `port`: ROOT/PORT, ROOT from `root`, $ELMO_RUN_DIR or ~/.elmo/serve."""
    base = Path(root or os.environ.get("ELMO_RUN_DIR") or Path.home() / ".elmo" / "serve").expanduser()
    return base / str(port)


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) or check that an existing one is ours and closed to others."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise ControlError(f"{path} belongs to another user (uid {st.st_uid}): choose another ELMO_RUN_DIR")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ControlError(f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}): chmod 700 it")
    return path


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` atomically (a temporary file in the same directory, mode 0600, then a rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not ours to talk to
        return False
    return True


def read_service(directory: Path) -> dict | None:
    """The `service.json` of a live service in `directory`, or None (none there, or its process is gone)."""
    try:
        info = json.loads((directory / SERVICE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and _alive(int(info.get("pid", -1))) else None


def take_requests(directory: Path) -> list[tuple[str, dict]]:
    """Swap requests waiting in `directory` (oldest first), removed as they are taken: (request id, body)."""
    out, entries = [], []
    for path in directory.glob(f"*{_REQUEST}"):
        try:
            entries.append((path.stat().st_mtime, path))
        except OSError:  # withdrawn meanwhile (its client gave up)
            pass
    for _, path in sorted(entries):
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            body = {"invalid": f"{type(e).__name__}: {e}"}
        path.unlink(missing_ok=True)
        out.append((path.name[: -len(_REQUEST)], body if isinstance(body, dict) else {"invalid": "not an object"}))
    return out


def write_result(directory: Path, request_id: str, result: dict) -> None:
    write_json(directory / f"{request_id}{_RESULT}", result)


def request_swap(
    port: int,
    artifact: str,
    *,
    root: str | os.PathLike | None = None,
    timeout_s: float = 600.0,
    poll_s: float = 0.2,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Ask the `elmo serve` on `port` to swap to `artifact`; wait for and return its result
    (`{"ok", "model_version", "artifact", "error", "seconds"}`). Raises ControlError if no service answers."""
    directory = run_dir(port, root)
    if not (directory / SERVICE_FILE).is_file():
        raise ControlError(f"no `elmo serve` on port {port} ({directory / SERVICE_FILE} does not exist)")
    ensure_private_dir(directory)
    info = read_service(directory)
    if info is None:
        raise ControlError(f"the `elmo serve` that wrote {directory / SERVICE_FILE} is not running")
    request_id = uuid.uuid4().hex
    write_json(directory / f"{request_id}{_REQUEST}", {"artifact": str(Path(artifact).resolve()), "at": time.time()})
    if log:
        log(f"asked the service at {info.get('url')} (pid {info['pid']}) to serve {Path(artifact).resolve()}")
    result_path = directory / f"{request_id}{_RESULT}"
    deadline = time.monotonic() + timeout_s
    while not result_path.exists():
        if time.monotonic() > deadline or read_service(directory) is None:
            (directory / f"{request_id}{_REQUEST}").unlink(missing_ok=True)
            why = "stopped" if read_service(directory) is None else f"gave no answer within {timeout_s:g} s"
            raise ControlError(f"the service on port {port} {why}")
        time.sleep(poll_s)
    result = json.loads(result_path.read_text())
    result_path.unlink(missing_ok=True)
    return result
