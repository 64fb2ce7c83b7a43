"""Serving tests: one local Ray + Serve per test session on 127.0.0.1, and tiny models to serve.

Ray is started lazily by the `serve_url` fixture, so the scoring tests alone never start it.
"""

import os
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch

from elmo_serve.model import ServingModel
from elmo_serve.scoring import Scorer
from training.encoders import HashedBagEncoder, HashedNgramFeaturizer, bag_inputs

TITLES = [
    "python3 : interactive high-level object-oriented language",
    "python3-numpy : fast array facility for Python 3",
    "python3-scipy : scientific tools for Python 3",
    "libc6 : GNU C Library: Shared libraries",
    "libstdc++6 : GNU Standard C++ Library v3",
    "gcc : GNU C compiler",
    "g++ : GNU C++ compiler",
    "make : utility for directing compilation",
    "perl : Larry Wall's Practical Extraction and Report Language",
    "libssl3 : Secure Sockets Layer toolkit - shared libraries",
    "openssl : Secure Sockets Layer toolkit - cryptographic utility",
    "curl : command line tool for transferring data with URL syntax",
    "libcurl4 : easy-to-use client-side URL transfer library",
    "git : fast, scalable, distributed revision control system",
    "vim : Vi IMproved - enhanced vi editor",
    "emacs : GNU Emacs editor",
    "qml6-module-qtquick : Qt 6 Qt Quick QML module",
    "libqt6core6 : Qt 6 core module",
    "0ad : Real-time strategy game of ancient warfare",
    "0ad-data : Real-time strategy game of ancient warfare (data files)",
]


def _filter_warnings() -> None:
    # Serve's config module uses pydantic v1-style APIs under pydantic 2.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\..*")
    try:
        from pydantic.warnings import PydanticDeprecatedSince20

        warnings.filterwarnings("ignore", category=PydanticDeprecatedSince20)
    except ImportError:
        pass


_IGNORED = ("ignore::pydantic.warnings.PydanticDeprecatedSince20", "ignore::DeprecationWarning:ray.*")


_THIS = sys.modules[__name__]


def pytest_pycollect_makemodule(module_path, parent):
    # This directory's tests `from conftest import ...` this file, but there is one module named `conftest` at a time:
    # when a run also collects tests/training (`pytest tests/serve tests/training/...`), its conftest took the name.
    sys.modules["conftest"] = _THIS


def pytest_collection_modifyitems(config, items):
    # Marks, unlike ini filters, still apply under `pytest -W error`.
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            for f in _IGNORED:
                item.add_marker(pytest.mark.filterwarnings(f))


def toy_model(version: str = "toy-v1", labels: int = 200, dim: int = 32, seed: int = 0) -> ServingModel:
    """An in-memory model: hashed n-gram bag encoder, fp8 head initialised at the titles' embeddings."""
    torch.manual_seed(seed)
    titles = [TITLES[i % len(TITLES)] + ("" if i < len(TITLES) else f" variant {i}") for i in range(labels)]
    uids = [t.split(" : ")[0] + ("" if i < len(TITLES) else f"-v{i}") for i, t in enumerate(titles)]
    feat = HashedNgramFeaturizer(num_buckets=2**14, min_df=1).fit(titles)
    enc = HashedBagEncoder(num_features=feat.num_features, dim=dim).eval()

    @torch.inference_mode()
    def encode(texts):
        return enc(*bag_inputs(feat.transform(texts))).float()

    pad = -(-labels // 16) * 16
    w = torch.zeros(pad, dim)
    w[:labels] = encode(titles)
    scorer = Scorer(w.to(torch.float8_e4m3fn), labels, "torch")
    return ServingModel(version, encode, scorer, uids, titles, info={"head_dtype": "float8_e4m3fn", "dim": dim})


def make_artifact(path, seed: int = 0, labels: int = 64, dim: int = 32, precision: str = "fp8", hf_bag: str = ""):
    """A tiny synthetic model written with `training.artifact.save_artifact` (untrained: label vectors at the
    encoder's embeddings of the titles, the bias at the label frequencies). hf_bag "concat" or "sum": the bag beside
    a tiny random BERT over the data's words (an "hf" artifact carrying the bag), built here."""
    from training.artifact import save_artifact
    from training.data import make_synthetic
    from training.model import HeadConfig, XMCHead, XMCModel

    torch.manual_seed(seed)
    train, _ = make_synthetic(num_labels=labels, num_train=400, num_test=10, seed=seed)
    feat = HashedNgramFeaturizer(num_buckets=2**14, min_df=1).fit(train.texts + train.label_titles)
    enc = HashedBagEncoder(num_features=feat.num_features, dim=dim).eval()
    if hf_bag:
        from tiny_bert import save_tiny_bert

        from training.encoders import HFTextEncoder, HybridEncoder

        words = {w for t in train.texts + train.label_titles for w in t.lower().split()}
        bert = HFTextEncoder.from_pretrained(save_tiny_bert(words, path.parent / f"{path.name}-bert", layers=1))
        enc = HybridEncoder(bert.eval(), enc, hf_bag)
    head = XMCHead(HeadConfig(num_labels=labels, dim=enc.dim, precision=precision))
    model = XMCModel(enc, head, feat)
    with torch.no_grad():
        vectors = 4.0 * model.embed(*model.encoder_inputs(train.label_titles))
        prior = (train.labels.getnnz(axis=0) + 1.0) / (train.num_rows + 2.0)
        head.init_weights(vectors, prior)
    return save_artifact(path, model, train, metrics={"P@1": 0.0, "seed": seed}, config={"seed": seed})


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Two valid artifacts (v1, v2: different seeds) and a corrupt one (head.safetensors truncated)."""
    import shutil

    pytest.importorskip("training.artifact")
    root = tmp_path_factory.mktemp("artifacts")
    v1, v2 = make_artifact(root / "v1", seed=1), make_artifact(root / "v2", seed=2)
    bad = root / "corrupt"
    shutil.copytree(v1, bad)
    head = bad / "head.safetensors"
    head.write_bytes(head.read_bytes()[:100])
    return {"v1": v1, "v2": v2, "corrupt": bad}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_url():
    """http://127.0.0.1:PORT of a Serve instance started once for the session (token auth off: a test cluster)."""
    _filter_warnings()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from elmo_serve.commands import THROUGHPUT_ENV, use_throughput_mode

    # The app is tested in the Serve mode `elmo serve` runs (HAProxy, direct ingress, gRPC between deployments), set
    # before Ray is imported, as there. HAProxy's stats and metrics ports move to free ones (they are fixed otherwise,
    # and another Serve may run on this machine), and only this cluster gets the mode: the `ray start` cluster of
    # test_retrain keeps the proxy actor.
    cluster_env = {
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
    }
    saved = {k: os.environ.get(k) for k in [*THROUGHPUT_ENV, *cluster_env]}
    use_throughput_mode()
    os.environ.update(cluster_env)
    import ray
    from ray import serve

    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    for k, v in saved.items():
        if v is None:
            del os.environ[k]
        else:
            os.environ[k] = v
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
