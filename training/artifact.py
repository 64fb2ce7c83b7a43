"""The model artifact: the one definition of its on-disk format, written by export and read by serving.

A directory:
    manifest.json       format, format_version, created_at, num_labels, dim, head {dtype, rows, in_dim, bias,
                        bias_input, scale, chunk_rows, label_align}, encoder {kind, config, featurizer, table_dtype},
                        metrics, data_fingerprint, training (the TrainConfig)
    head.safetensors    "weight": (rows, in_dim) float8_e4m3fn or bfloat16, rows = num_labels padded to 16, row i is
                        label id i; "scale": () float32, the fixed power-of-two weight scale s
    encoder/            kind "hashed": encoder.safetensors (the HashedBagEncoder state; its embedding table in
                        encoder.table_dtype, bfloat16 rounded to nearest, half the size of fp32; an artifact without
                        table_dtype holds it in float32 and loads as it did), featurizer.json and
                        featurizer.safetensors (kept buckets, idf) when it reads raw text;
                        kind "hf": a Hugging Face model directory (config.json, weights, tokenizer); with
                        encoder.config.bag {mode, HashedBagConfig} (a transformer combined with the hashed bag,
                        TrainConfig.hf_bag) also bag.safetensors (the HybridEncoder's "bag.*" and "norm.*", the
                        table in table_dtype) and the featurizer's two files
    frozen/             only with encoder.frozen {dim, max_length} (a hashed encoder fused with frozen pretrained
                        sentence embeddings, TrainConfig.frozen_encoder): that pretrained model's Hugging Face
                        directory; encoder.safetensors then holds "bag.*" (the bag) and "proj.*" (the projection)
    labels.jsonl        line i: {"id": i, "uid": ..., "title": ...}
manifest.json "zero_shot" (optional, written by save_artifact): {gain, bias, method, details}, the calibration of the
head rows `Artifact.zero_shot_rows` gives a new label's title (`training.zero_shot`); an artifact without it uses the
training config's label_init_gain and the prior bias of a label with 0 training points.
manifest.json "zero_shot_map" (optional, written by save_artifact when the training split has texts and enough
labels with points): {"file": "zero_shot_map.safetensors", "details": {...how it was fitted}}; that file holds the
title map (`training.zero_shot.TitleMap`, `fit_title_map`): "weight" (dim, dim), "bias_weight" (dim,) and
"intercept" () float32. A new label's row is then [u @ weight, (u @ bias_weight + intercept) / bias_input] with
u = e / |e|^2, e the encoder's embedding of its title (true units, then scaled and rounded as the head stores rows);
an artifact without it gives title rows (the calibration above).
manifest.json "files" maps every other file's relative path to its sha256: `load_artifact` checks each (a file changed
in place, torn or bit-rotted is refused, naming it) and that the loaded weights are finite; an artifact without
"files" (written before checksums) loads unverified, with a warning. `Artifact.version` derives from the content.
manifest.json "relabelled" (optional, written by `save_relabelled`): the artifact is another one's with its label set
changed without training (a live catalogue folded in); metrics and training then describe the source's run.

Scores of texts: x = encoder(texts) (B, dim); scores = [x, bias_input] / s @ weight^T (see training.model.XMCHead),
rows >= num_labels are padding. `save_artifact` writes into a temporary directory and renames it into place;
`load_artifact` checks everything and raises ValueError naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training.encoders import (
    HYBRID_MODES,
    FrozenTextEmbedder,
    FusedEncoder,
    HashedBagConfig,
    HashedBagEncoder,
    HashedNgramFeaturizer,
    HFTextEncoder,
    HybridEncoder,
)
from training.model import LABEL_ALIGN, HeadConfig, XMCHead, XMCModel, padded
from training.zero_shot import (
    MAP_FILE,
    MAP_KEY,
    ZERO_SHOT_KEY,
    Calibration,
    TitleMap,
    calibrate,
    config_calibration,
    fit_title_map,
    stored_rows,
)

FORMAT = "elmo-artifact"
FORMAT_VERSION = 1
HEAD_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "bfloat16": torch.bfloat16}
TABLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # a hashed encoder's embedding table(s)
TABLE_DTYPE = "bfloat16"  # written by save_artifact; the table is upcast to fp32 when loaded
ENCODER_KINDS = ("hashed", "hf")
BAG_FILE = "bag.safetensors"  # kind "hf" with a bag: the HybridEncoder's state but the transformer's
HYBRID_HF = "hf."  # the state keys of a HybridEncoder's transformer (the Hugging Face directory holds them)
MANIFEST = "manifest.json"
HASH_CHUNK = 1 << 22  # bytes read at a time when hashing a file (a head can be GBs: never read whole)
log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digests(root: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every file under `root` but manifest.json, sorted by path."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in files}


# A float's bits & mask == mask: NaN or inf (e4m3fn has no inf: S.1111.111 is NaN). Tested on the raw bits with one
# and + max per chunk, no upcast copy: ~10 GB/s on 2 CPU cores, a 2.8M x 768 fp8 head in a fraction of a second.
_NONFINITE_BITS = {
    torch.float8_e4m3fn: (torch.uint8, 0x7F),
    torch.float8_e5m2: (torch.uint8, 0x7C),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}


def nonfinite_rows(t: torch.Tensor, limit: int = 5, chunk_elems: int = 1 << 24) -> tuple[list[int], int]:
    """(the first `limit` rows of `t` holding a NaN/inf, how many rows do), a chunk of rows at a time."""
    if not t.is_floating_point() or t.numel() == 0:
        return [], 0
    t2 = t.detach().reshape(1, -1) if t.dim() == 0 else t.detach().reshape(t.shape[0], -1)
    bits = _NONFINITE_BITS.get(t2.dtype)
    step = max(1, chunk_elems // max(1, t2.shape[1]))
    first: list[int] = []
    count = 0
    for i in range(0, t2.shape[0], step):
        c = t2[i : i + step]
        if bits is None:
            bad_rows = ~torch.isfinite(c).all(dim=1)
        else:
            masked = c.view(bits[0]) & bits[1]
            if int(masked.max()) != bits[1]:
                continue  # the usual case: no NaN/inf in this chunk
            bad_rows = (masked == bits[1]).any(dim=1)
        bad = bad_rows.nonzero().flatten()
        count += len(bad)
        first.extend(int(i + j) for j in bad[: limit - len(first)])
    return first, count


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """ValueError naming the first tensor of `tensors` with a NaN/inf and its first bad rows."""
    for name, t in tensors.items():
        rows, count = nonfinite_rows(t)
        if count:
            more = f" and {count - len(rows)} more" if count > len(rows) else ""
            raise ValueError(f"{where}: tensor {name!r} is not finite (NaN/inf) in rows {rows}{more}")


@dataclass
class Artifact:
    path: Path
    manifest: dict
    model: XMCModel  # label_order is the identity: head row i is label id i
    labels: list[dict]  # {"id", "uid", "title"}
    files: dict[str, str] = field(default_factory=dict)  # {relative path: sha256} of the files read
    verified: bool = False  # the manifest listed checksums and every file matched them
    title_map: TitleMap | None = None  # the learned title -> row map (MAP_FILE), None: title rows

    @property
    def num_labels(self) -> int:
        return self.manifest["num_labels"]

    @property
    def version(self) -> str:
        """A short hash of the content: manifest.json and every file's checksum (any byte changed: a new one)."""
        h = hashlib.sha256((self.path / MANIFEST).read_bytes())
        h.update(json.dumps(self.files, sort_keys=True).encode())
        return h.hexdigest()[:12]

    @torch.inference_mode()
    def queries(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> (B, in_dim) fp32 head queries, on the head's device: the encoder's output with the head's input
        scaling and bias column (`XMCHead.head_input`), so that scores = queries @ weight^T."""
        m = self.model
        return m.head.head_input(m.embed(*m.encoder_inputs(list(texts)))).float()

    @property
    def zero_shot(self) -> Calibration:
        """The calibration of zero-shot rows: the manifest's ZERO_SHOT_KEY, else the training config's label_init_gain
        and the prior bias of a label with 0 training points (`fallback_calibration`)."""
        if ZERO_SHOT_KEY in self.manifest:
            return Calibration.from_dict(self.manifest[ZERO_SHOT_KEY])
        return fallback_calibration(self.manifest)

    def zero_shot_rows(self, titles: Sequence[str]) -> torch.Tensor:
        """(n, in_dim) head rows for new labels' titles, in the stored dtype (float8_e4m3fn / bfloat16, times the
        scale s, on the head's device), so that queries(texts) @ rows^T are their scores: the title map's rows when
        the artifact has one, else the trained encoder's zero-shot vector of each title and the unseen-label bias
        (`training.zero_shot.stored_rows`)."""
        return stored_rows(self.model, titles, self.zero_shot, self.title_map)


def fallback_calibration(manifest: dict) -> Calibration:
    """The zero-shot calibration of an artifact written without ZERO_SHOT_KEY: the training config's label_init_gain
    (the TrainConfig default without one) and the prior bias of a label with 0 points among the training rows; such an
    artifact does not record its training rows, so the config's train_rows, else num_labels, stands in (logged)."""
    from training.config import TrainConfig

    training = manifest.get("training") or {}
    gain = training.get("label_init_gain", TrainConfig.label_init_gain)
    rows = training.get("train_rows") or 0
    if not rows:
        rows = manifest["num_labels"]
        log.warning("artifact without %r nor training rows: the unseen bias assumes %d rows", ZERO_SHOT_KEY, rows)
    return config_calibration(float(gain), int(rows))


def _table_keys(encoder: torch.nn.Module) -> set[str]:
    """State keys of the encoder's embedding tables (the EmbeddingBag weights: nearly all of a hashed encoder)."""
    return {f"{n}.weight" for n, m in encoder.named_modules() if isinstance(m, torch.nn.EmbeddingBag)}


def _save_tables(encoder: torch.nn.Module, file: Path, skip: str = "") -> None:
    """The encoder's state (but keys starting with `skip`, if given) as safetensors, its tables in TABLE_DTYPE."""
    tables = _table_keys(encoder)
    state = {
        k: (v.to(TABLE_DTYPES[TABLE_DTYPE]) if k in tables else v).detach().cpu().contiguous()
        for k, v in encoder.state_dict().items()
        if not (skip and k.startswith(skip))
    }
    save_file(state, file)


def _export_weight(head: XMCHead, order: np.ndarray) -> tuple[torch.Tensor, str]:
    """Head rows back in label-id order, padded; fp32 heads are exported as bf16 (round to nearest)."""
    w = head.weight[: head.num_labels].cpu()
    out = torch.zeros((padded(head.num_labels), head.in_dim), dtype=w.dtype)
    out[torch.from_numpy(order)] = w
    if out.dtype == torch.float32:
        out = out.to(torch.bfloat16)
    name = str(out.dtype).removeprefix("torch.")
    return out, name


def save_artifact(
    path: str | Path,
    model: XMCModel,
    train_ds,
    *,
    metrics: dict | None = None,
    config: dict | None = None,
    zero_shot: Calibration | None = None,
    title_map: bool = True,
) -> Path:
    """Write the artifact of `model` (trained on `train_ds`, labels possibly re-indexed) to `path`, atomically.

    zero_shot: the calibration recorded for new labels' rows; None measures it (`export_calibration`).
    title_map: fit the title map on `train_ds` and store it (`export_title_map`; none without texts or with too few
    labels with points); False: new labels get title rows."""
    from training.data import data_fingerprint

    path = Path(path)
    tmp = _staging(path)
    (tmp / "encoder").mkdir(parents=True)
    head = model.head
    order = model.label_order.cpu().numpy()
    weight, dtype_name = _export_weight(head, order)
    save_file(
        {"weight": weight.contiguous(), "scale": head.scale.detach().cpu().float().reshape(())},
        tmp / "head.safetensors",
    )
    encoder = model.encoder
    hybrid = isinstance(encoder, HybridEncoder)
    if isinstance(encoder, HFTextEncoder) or hybrid:
        hf = encoder.hf if hybrid else encoder
        kind, enc_config = "hf", {"max_length": hf.max_length, "hidden_size": hf.dim}
        hf.save_pretrained(tmp / "encoder")
        if hybrid:  # the bag and the layer norm beside the Hugging Face directory
            enc_config["bag"] = {"mode": encoder.mode, **vars(encoder.bag.config)}
            _save_tables(encoder, tmp / "encoder" / BAG_FILE, skip=HYBRID_HF)
    else:
        bag = encoder.bag if isinstance(encoder, FusedEncoder) else encoder
        kind, enc_config = "hashed", dict(vars(bag.config))
        _save_tables(encoder, tmp / "encoder" / "encoder.safetensors")
    if model.featurizer is not None:
        fs = model.featurizer.state_dict()
        (tmp / "encoder" / "featurizer.json").write_text(json.dumps(fs["config"], indent=2))
        save_file(
            {"kept": torch.from_numpy(fs["kept"]), "idf": torch.from_numpy(fs["idf"])},
            tmp / "encoder" / "featurizer.safetensors",
        )
    frozen = None
    if isinstance(encoder, FusedEncoder):
        if model.frozen is None:
            raise ValueError("a fused encoder needs its frozen embedder (XMCModel.frozen) to be exported")
        model.frozen.encoder.save_pretrained(tmp / "frozen")
        frozen = {"dim": model.frozen.dim, "max_length": model.frozen.max_length}
    titles = [""] * head.num_labels
    uids = [str(i) for i in range(head.num_labels)]
    for j, old in enumerate(order):
        if train_ds.label_titles is not None:
            titles[old] = train_ds.label_titles[j]
        if train_ds.label_uids is not None:
            uids[old] = train_ds.label_uids[j]
    with open(tmp / "labels.jsonl", "w", encoding="utf-8") as f:
        for i in range(head.num_labels):
            f.write(json.dumps({"id": i, "uid": uids[i], "title": titles[i]}, ensure_ascii=False) + "\n")
    cal = zero_shot or export_calibration(model, train_ds, config or {})
    fitted = export_title_map(model, train_ds, cal) if title_map else None
    if fitted is not None:
        save_file(fitted.tensors(), tmp / MAP_FILE)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_labels": head.num_labels,
        "dim": head.config.dim,
        "head": {
            "dtype": dtype_name,
            "rows": weight.shape[0],
            "in_dim": head.in_dim,
            "bias": head.config.bias,
            "bias_input": head.config.bias_input,
            "scale": float(head.scale),
            "chunk_rows": head.rows_per_chunk,
            "label_align": LABEL_ALIGN,
        },
        "encoder": {
            "kind": kind,
            "config": enc_config,
            "featurizer": model.featurizer is not None,
            **({"table_dtype": TABLE_DTYPE} if kind == "hashed" or hybrid else {}),
            **({"frozen": frozen} if frozen else {}),
        },
        "metrics": metrics or {},
        ZERO_SHOT_KEY: cal.as_dict(),
        **({MAP_KEY: {"file": MAP_FILE, "details": fitted.details}} if fitted is not None else {}),
        "data_fingerprint": data_fingerprint(train_ds),
        "training": config or {},
        "files": file_digests(tmp),  # written last: every other file is in place
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return _publish(tmp, path)


def _staging(path: Path) -> Path:
    """A fresh temporary directory beside `path`, where an artifact is written before `_publish` moves it there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _publish(tmp: Path, path: Path) -> Path:
    """Put the complete artifact written in `tmp` at `path` (a previous one is replaced, never half overwritten)."""
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def save_relabelled(
    src: Artifact, path: str | Path, labels: Sequence[tuple[str, str]], rows: torch.Tensor, provenance: dict
) -> Path:
    """Write a copy of artifact `src` at `path` (atomically) with another label set: labels[i] = (uid, title) is label
    id i and rows[i] its head row, in the stored dtype (`src`'s head rows or `Artifact.zero_shot_rows`). The encoder,
    calibration and training record are src's; the manifest records `provenance` under "relabelled" (what was done,
    from which version). Used to fold a live label catalogue into an artifact (`elmo export --catalogue`)."""
    path = Path(path)
    if path.resolve() == src.path.resolve():
        raise ValueError(f"{path}: write the relabelled artifact to another directory than its source")
    n, h = len(labels), src.manifest["head"]
    weight = src.model.head.weight
    if n == 0:
        raise ValueError("an artifact needs at least one label")
    if rows.shape != (n, h["in_dim"]) or rows.dtype != weight.dtype:
        raise ValueError(f"rows must be ({n}, {h['in_dim']}) {weight.dtype}, got {tuple(rows.shape)} {rows.dtype}")
    uids = [u for u, _ in labels]
    if len(set(uids)) != n or not all(isinstance(u, str) and u for u in uids):
        raise ValueError("label uids must be distinct non-empty strings")
    check_finite({"rows": rows}, "relabelled artifact")
    tmp = _staging(path)
    shutil.copytree(src.path, tmp, ignore=shutil.ignore_patterns("head.safetensors", "labels.jsonl", MANIFEST))
    out = torch.zeros((padded(n), h["in_dim"]), dtype=weight.dtype)
    out[:n] = rows.cpu()
    save_file({"weight": out, "scale": torch.tensor(float(h["scale"]))}, tmp / "head.safetensors")
    with open(tmp / "labels.jsonl", "w", encoding="utf-8") as f:
        for i, (uid, title) in enumerate(labels):
            f.write(json.dumps({"id": i, "uid": uid, "title": title}, ensure_ascii=False) + "\n")
    manifest = dict(src.manifest)
    manifest.pop("files", None)
    manifest.update(
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        num_labels=n,
        head={**h, "rows": out.shape[0]},
        relabelled={**provenance, "from_version": src.version},
    )
    manifest["files"] = file_digests(tmp)  # last: every other file is in place
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return _publish(tmp, path)


def export_calibration(model: XMCModel, train_ds, config: dict) -> Calibration:
    """The zero-shot calibration measured on the trained model (`training.zero_shot.calibrate`, its default
    method), over `train_ds` in the model's head order; without label titles, the config's."""
    from training.config import TrainConfig

    gain = float(config.get("label_init_gain", TrainConfig.label_init_gain))
    if train_ds.label_titles is None:
        return config_calibration(gain, train_ds.num_rows)
    was_training = model.training
    model.eval()
    try:
        return calibrate(model, train_ds.label_titles, train_ds.label_counts(), gain=gain, num_rows=train_ds.num_rows)
    finally:
        model.train(was_training)


def export_title_map(model: XMCModel, train_ds, cal: Calibration) -> TitleMap | None:
    """The title map fitted on the trained model over `train_ds` in the model's head order, its filter pairs left out
    (`training.zero_shot.fit_title_map`); None without texts or label titles."""
    if train_ds.texts is None or train_ds.label_titles is None:
        return None
    was_training = model.training
    model.eval()
    try:
        return fit_title_map(
            model, train_ds.label_titles, train_ds.labels, train_ds.texts, cal, exclude=train_ds.filters
        )
    finally:
        model.train(was_training)


def _read_title_map(path: Path, manifest: dict) -> TitleMap | None:
    """The artifact's title map (manifest.json MAP_KEY, its file), or None for an artifact without one."""
    spec = manifest.get(MAP_KEY)
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("file"), str) or "/" in spec["file"]:
        raise _fail(path, f"manifest.json {MAP_KEY!r} must be {{'file': <name in the artifact>, 'details': {{}}}}")
    mpath = path / spec["file"]
    if not mpath.is_file():
        raise _fail(path, f"missing file {spec['file']}")
    try:
        return TitleMap.from_tensors(load_file(mpath), manifest["dim"], spec.get("details") or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise _fail(path, f"{spec['file']}: {e}") from None


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"invalid artifact {path}: {problem}")


def _require(manifest: dict, key: str, kind: type | tuple, path: Path, where: str = "manifest.json"):
    if key not in manifest:
        raise _fail(path, f"{where} has no {key!r}")
    value = manifest[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise _fail(path, f"{where} {key!r} has the wrong type ({type(value).__name__})")
    return value


def read_manifest(path: Path) -> dict:
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise _fail(path, "missing file manifest.json")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise _fail(path, f"manifest.json is not valid JSON ({e.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(path, f"manifest.json format is not {FORMAT!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise _fail(path, f"unsupported format_version {version!r} (this code reads version {FORMAT_VERSION})")
    for key in ("num_labels", "dim"):
        if _require(manifest, key, int, path) <= 0:
            raise _fail(path, f"manifest.json {key!r} must be positive")
    head = _require(manifest, "head", dict, path)
    for key, kind in (("dtype", str), ("rows", int), ("in_dim", int), ("bias", bool), ("scale", (int, float))):
        _require(head, key, kind, path, "manifest.json head")
    if head["dtype"] not in HEAD_DTYPES:
        raise _fail(path, f"head dtype {head['dtype']!r} is not one of {sorted(HEAD_DTYPES)}")
    scale = float(head["scale"])
    if not (scale > 0 and math.isfinite(scale) and math.log2(scale).is_integer()):
        raise _fail(path, f"head scale {scale} is not a power of two")
    if ZERO_SHOT_KEY in manifest:
        try:
            Calibration.from_dict(manifest[ZERO_SHOT_KEY], f"manifest.json {ZERO_SHOT_KEY!r}")
        except ValueError as e:
            raise _fail(path, str(e)) from None
    encoder = _require(manifest, "encoder", dict, path)
    if encoder.get("kind") not in ENCODER_KINDS:
        raise _fail(path, f"encoder kind {encoder.get('kind')!r} is not one of {ENCODER_KINDS}")
    _require(encoder, "config", dict, path, "manifest.json encoder")
    return manifest


def _read_head(path: Path, manifest: dict) -> tuple[torch.Tensor, float]:
    hpath = path / "head.safetensors"
    if not hpath.is_file():
        raise _fail(path, "missing file head.safetensors")
    try:
        tensors = load_file(hpath)
    except (SafetensorError, OSError) as e:
        raise _fail(path, f"head.safetensors is unreadable ({e})") from None
    if "weight" not in tensors:
        raise _fail(path, "head.safetensors has no 'weight' tensor")
    w, h, n = tensors["weight"], manifest["head"], manifest["num_labels"]
    if w.dtype != HEAD_DTYPES[h["dtype"]]:
        raise _fail(path, f"head weight dtype {w.dtype} does not match the manifest's {h['dtype']}")
    expect_in = manifest["dim"] + (1 if h["bias"] else 0)
    if h["rows"] != padded(n) or h["in_dim"] != expect_in:
        raise _fail(path, f"manifest head shape ({h['rows']}, {h['in_dim']}) should be ({padded(n)}, {expect_in})")
    if tuple(w.shape) != (h["rows"], h["in_dim"]):
        raise _fail(
            path, f"head weight shape {tuple(w.shape)} does not match the manifest's ({h['rows']}, {h['in_dim']})"
        )
    if "scale" in tensors and float(tensors["scale"]) != float(h["scale"]):
        raise _fail(path, f"head scale {float(tensors['scale'])} does not match the manifest's {h['scale']}")
    return w, float(h["scale"])


def _read_labels(path: Path, num_labels: int) -> list[dict]:
    lpath = path / "labels.jsonl"
    if not lpath.is_file():
        raise _fail(path, "missing file labels.jsonl")
    labels = []
    with open(lpath, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise _fail(path, f"labels.jsonl line {lineno} is not valid JSON") from None
            if not isinstance(obj, dict) or obj.get("id") != lineno - 1 or not isinstance(obj.get("title"), str):
                raise _fail(path, f"labels.jsonl line {lineno} must be {{'id': {lineno - 1}, 'uid', 'title'}}")
            labels.append(obj)
    if len(labels) != num_labels:
        raise _fail(path, f"label count mismatch: labels.jsonl has {len(labels)} labels, the manifest {num_labels}")
    return labels


def _read_encoder(path: Path, manifest: dict):
    edir = path / "encoder"
    if not edir.is_dir():
        raise _fail(path, "missing directory encoder/")
    enc = manifest["encoder"]
    if enc["kind"] == "hf":
        return (*_read_hf(path, manifest), None)
    config = _bag_config(path, enc["config"])
    if config.dim != manifest["dim"]:
        raise _fail(path, f"encoder dim {config.dim} does not match the manifest dim {manifest['dim']}")
    frozen = _read_frozen(path, enc)
    encoder = HashedBagEncoder(config) if frozen is None else FusedEncoder(HashedBagEncoder(config), frozen.dim)
    _load_tables(path, encoder, "encoder.safetensors", enc)
    return encoder, _read_featurizer(path, enc, config), frozen


def _read_hf(path: Path, manifest: dict) -> tuple[torch.nn.Module, HashedNgramFeaturizer | None]:
    """(encoder, featurizer) of kind "hf": the Hugging Face directory, with the bag beside it when the config has
    one (a HybridEncoder: encoder/BAG_FILE and the featurizer)."""
    edir, enc = path / "encoder", manifest["encoder"]
    if not (edir / "config.json").is_file():
        raise _fail(path, "missing file encoder/config.json (a Hugging Face model directory)")
    encoder = HFTextEncoder.from_pretrained(edir, max_length=enc["config"].get("max_length", 128))
    spec, featurizer = enc["config"].get("bag"), None
    if spec is not None:
        if not isinstance(spec, dict) or spec.get("mode") not in HYBRID_MODES:
            raise _fail(path, f"manifest.json encoder config 'bag' must be a dict with a mode in {HYBRID_MODES}")
        config = _bag_config(path, {k: v for k, v in spec.items() if k != "mode"})
        if spec["mode"] == "sum" and config.dim != encoder.dim:
            raise _fail(path, f"encoder bag dim {config.dim} (mode sum) does not match the hidden size {encoder.dim}")
        encoder = HybridEncoder(encoder, HashedBagEncoder(config), spec["mode"])
        _load_tables(path, encoder, BAG_FILE, enc, skip=HYBRID_HF)
        featurizer = _read_featurizer(path, enc, config)
        if featurizer is None:
            raise _fail(path, "an hf encoder with a bag needs its featurizer (manifest.json encoder 'featurizer')")
    if encoder.dim != manifest["dim"]:
        what = "dim" if spec is not None else "hidden size"
        raise _fail(path, f"encoder {what} {encoder.dim} does not match the manifest dim {manifest['dim']}")
    return encoder, featurizer


def _bag_config(path: Path, values: dict) -> HashedBagConfig:
    try:
        return HashedBagConfig(**values)
    except TypeError as e:
        raise _fail(path, f"encoder config does not fit HashedBagConfig ({e})") from None


def _load_tables(path: Path, encoder: torch.nn.Module, name: str, enc: dict, skip: str = "") -> None:
    """encoder/`name` (`_save_tables`) into `encoder`, its keys, shapes and table dtype checked first."""
    spath = path / "encoder" / name
    if not spath.is_file():
        raise _fail(path, f"missing file encoder/{name}")
    state = load_file(spath)
    own = {k: v for k, v in encoder.state_dict().items() if not (skip and k.startswith(skip))}
    expected = {k: tuple(v.shape) for k, v in own.items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        bad = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        raise _fail(
            path,
            f"encoder state shape mismatch in {bad}: expected {[expected.get(k) for k in bad]}, "
            f"found {[got.get(k) for k in bad]}",
        )
    table_dtype = enc.get("table_dtype", "float32")
    if table_dtype not in TABLE_DTYPES:
        raise _fail(path, f"encoder table_dtype {table_dtype!r} is not one of {sorted(TABLE_DTYPES)}")
    for k in sorted(_table_keys(encoder) & set(own)):
        if state[k].dtype != TABLE_DTYPES[table_dtype]:
            raise _fail(path, f"encoder table {k} is {state[k].dtype}, the manifest says {table_dtype}")
    # copies into the fp32 parameters: a bf16 table is upcast exactly; the keys were checked to be exactly `own`
    encoder.load_state_dict(state, strict=not skip)


def _read_featurizer(path: Path, enc: dict, config: HashedBagConfig) -> HashedNgramFeaturizer | None:
    """The featurizer of a bag on raw text (manifest.json encoder 'featurizer'), or None."""
    if not enc.get("featurizer", False):
        return None
    edir = path / "encoder"
    fjson, fst = edir / "featurizer.json", edir / "featurizer.safetensors"
    for f in (fjson, fst):
        if not f.is_file():
            raise _fail(path, f"missing file encoder/{f.name}")
    ft = load_file(fst)
    featurizer = HashedNgramFeaturizer.from_state_dict(
        {"config": json.loads(fjson.read_text()), "kept": ft["kept"].numpy(), "idf": ft["idf"].numpy()}
    )
    if featurizer.num_features != config.num_features:
        raise _fail(
            path, f"featurizer has {featurizer.num_features} features, the encoder table {config.num_features} rows"
        )
    return featurizer


def _read_frozen(path: Path, enc: dict) -> FrozenTextEmbedder | None:
    """The frozen pretrained embedder of a fused encoder (encoder.frozen in the manifest), or None."""
    spec = enc.get("frozen")
    if spec is None:
        return None
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), int) for k in ("dim", "max_length")):
        raise _fail(path, "manifest.json encoder 'frozen' must be {'dim': int, 'max_length': int}")
    if not (path / "frozen" / "config.json").is_file():
        raise _fail(path, "missing file frozen/config.json (the frozen encoder's Hugging Face directory)")
    frozen = FrozenTextEmbedder(path / "frozen", max_length=spec["max_length"])
    if frozen.dim != spec["dim"]:
        raise _fail(path, f"frozen encoder hidden size {frozen.dim} does not match the manifest's {spec['dim']}")
    return frozen


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> Artifact:
    """Read and validate an artifact; ValueError names the first problem found."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"invalid artifact {path}: not a directory")
    manifest = read_manifest(path)
    weight, scale = _read_head(path, manifest)
    labels = _read_labels(path, manifest["num_labels"])
    encoder, featurizer, frozen = _read_encoder(path, manifest)
    title_map = _read_title_map(path, manifest)
    # The checksums after the parsers (their message is the more specific one for a malformed file), before the
    # weights are used; a file the manifest lists must be there and match.
    files = file_digests(path)
    listed = manifest.get("files")
    if listed is None:
        log.warning("artifact %s has no checksums (written before they were): its files are not verified", path)
    elif not isinstance(listed, dict):
        raise _fail(path, "manifest.json 'files' must map file paths to sha256")
    else:
        for name, digest in sorted(listed.items()):
            if name not in files:
                raise _fail(path, f"missing file {name}")
            if files[name] != digest:
                raise _fail(path, f"{name} does not match its checksum (changed or corrupt)")
    check_finite({"head.weight": weight}, f"invalid artifact {path}: head.safetensors")
    check_finite(dict(encoder.state_dict()), f"invalid artifact {path}: the encoder")
    if frozen is not None:
        check_finite(dict(frozen.encoder.state_dict()), f"invalid artifact {path}: the frozen encoder")
    h = manifest["head"]
    precision = "fp8" if weight.dtype == torch.float8_e4m3fn else "bf16"
    head = XMCHead(
        HeadConfig(
            num_labels=manifest["num_labels"],
            dim=manifest["dim"],
            precision=precision,
            bias=h["bias"],
            bias_input=float(h.get("bias_input", 1.0)),
            scale=scale,
        )
    )
    head.weight.copy_(weight)
    model = XMCModel(encoder, head, featurizer, frozen=frozen).to(device).eval()
    return Artifact(
        path=path,
        manifest=manifest,
        model=model,
        labels=labels,
        files=files,
        verified=listed is not None,
        title_map=title_map,
    )
