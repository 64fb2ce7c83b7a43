"""`elmo predict ARTIFACT INPUT.jsonl|-`: batch prediction, without Ray, through the service's own model path.

Input: JSON lines, each an object with "uid" (string or integer) and "text" or "title" (a non-empty string; "text"
wins when both are there); blank lines are skipped. Output: one JSON line per input line, in input order:
    {"uid": <the input's uid>, "ids": [label ids], "uids": [label uids], "titles": [label titles], "scores": [...]}
best first. The input is streamed in batches of --batch-size lines (memory stays bounded whatever its length); each
batch is one `ServingModel.predict_batch` call, the call a Serve replica makes, so the answers are /v1/predict's.
A bad line stops the run with its line number and the problem; with --out the answers go to a temporary file beside
FILE, renamed to FILE only once every line is answered (a failed run leaves no partial FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # the model (torch, kernels) is imported when a prediction runs, not when `elmo` builds its parser
    from elmo_serve.model import ServingModel

DEVICES = {"auto": "auto", "cpu": "torch", "cuda": "triton"}  # --device -> the scorer backend that runs there


class InputError(ValueError):
    """A line of the input that is not an object with a uid and a non-empty text."""


class Item(NamedTuple):
    uid: str | int
    text: str


def parse_line(line: str, lineno: int, name: str = "input") -> Item | None:
    """One input line -> Item (None for a blank line); InputError names the line and the problem."""
    if not line.strip():
        return None
    where = f"{name} line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    uid = obj.get("uid")
    if uid is None:
        raise InputError(f"{where}: no 'uid'")
    if not isinstance(uid, str | int) or isinstance(uid, bool):
        raise InputError(f"{where}: 'uid' must be a string or an integer, got {type(uid).__name__}")
    key = "text" if "text" in obj else "title" if "title" in obj else None
    if key is None:
        raise InputError(f"{where}: needs 'title' or 'text'")
    text = obj[key]
    if not isinstance(text, str):
        raise InputError(f"{where}: {key!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError(f"{where}: {key!r} is empty")
    return Item(uid, text)


def batches(lines: Iterable[str], batch_size: int, name: str = "input") -> Iterator[list[Item]]:
    """Parsed items of `lines`, batch_size at a time (the last batch may be shorter); reads lines as it goes."""
    batch: list[Item] = []
    for lineno, line in enumerate(lines, start=1):
        item = parse_line(line, lineno, name)
        if item is None:
            continue
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_items(model: ServingModel, items: list[Item], k: int, pad_to: int = 0) -> list[dict]:
    """The output records of a batch: one `predict_batch` call, one query per item (as one /v1/predict text)."""
    from elmo_serve.model import Query

    answers = model.predict_batch([Query([it.text], k) for it in items], pad_to=pad_to)
    out = []
    for it, ((ids, scores),) in zip(items, answers, strict=True):
        out.append(
            {
                "uid": it.uid,
                "ids": ids,
                "uids": [model.uids[i] for i in ids],
                "titles": [model.titles[i] for i in ids],
                "scores": scores,
            }
        )
    return out


def predict_stream(
    model: ServingModel,
    lines: Iterable[str],
    out: IO[str],
    *,
    k: int = 10,
    batch_size: int = 256,
    name: str = "input",
    progress=None,
) -> int:
    """Answer every line of `lines` into `out` (JSON lines); returns the number of answers. `progress`: an object
    with `update(n)` (a tqdm bar), told of each batch."""
    if not 1 <= k <= model.num_labels:
        raise ValueError(f"k must be in [1, {model.num_labels}] (the model's labels), got {k}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    n = 0
    for batch in batches(lines, batch_size, name):
        out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in predict_items(model, batch, k, batch_size)))
        n += len(batch)
        if progress is not None:
            progress.update(len(batch))
    return n


@contextmanager
def _output(path: str | None):
    """stdout, or a temporary file beside `path` that replaces it when the block ends without an error."""
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _progress_bar(total: int | None, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience: run without it
        return None
    return tqdm(total=total, unit="text", file=sys.stderr, disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def predict_command(
    artifact: str,
    input: str,
    k: int = 10,
    out: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    progress: bool = True,
) -> int:
    """Run `elmo predict`; returns the exit code (2 with a message on stderr for a bad artifact, input or line)."""
    if device not in DEVICES:
        print(f"elmo predict: error: --device must be one of {sorted(DEVICES)}, got {device!r}", file=sys.stderr)
        return 2
    stdin = input == "-"
    if not stdin and not Path(input).is_file():
        print(f"elmo predict: error: no input file {input}", file=sys.stderr)
        return 2
    from elmo_serve.model import load_model

    try:
        model = load_model(artifact, DEVICES[device])
        total = None if stdin else _count_lines(Path(input))  # a file: the bar shows a total (read, not kept)
        bar = _progress_bar(total, progress)
        src = sys.stdin if stdin else open(input, encoding="utf-8")
        try:
            with _output(out) as f:
                n = predict_stream(
                    model, src, f, k=k, batch_size=batch_size, name="stdin" if stdin else input, progress=bar
                )
        finally:
            if bar is not None:
                bar.close()
            if not stdin:
                src.close()
    except (ValueError, FileNotFoundError, UnicodeDecodeError) as e:
        print(f"elmo predict: error: {e}", file=sys.stderr)
        return 2
    if out is not None:
        print(f"{n} answers ({model.version}, k={k}) written to {out}", file=sys.stderr)
    return 0


def _predict(args: argparse.Namespace) -> int:
    return predict_command(args.artifact, args.input, args.k, args.out, args.batch_size, args.device, not args.quiet)


def add_predict_command(subparsers) -> None:
    """Register `predict` on the `elmo` parser's subparsers (sets `func`, returning an exit code)."""
    p = subparsers.add_parser(
        "predict",
        help="top-k labels of every line of a JSON-lines file (batch prediction, no Ray)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("artifact", help="artifact directory (from `elmo export`)")
    p.add_argument("input", help="JSON lines with 'uid' and 'title' or 'text'; - reads stdin")
    p.add_argument("-k", "--k", type=int, default=10, help="labels per line (default: 10)")
    p.add_argument("--out", default=None, help="output file (default: stdout)")
    p.add_argument("--batch-size", type=int, default=256, help="lines scored per call (default: 256)")
    p.add_argument(
        "--device", default="auto", choices=sorted(DEVICES), help="auto: cuda when available, else cpu (default)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)
