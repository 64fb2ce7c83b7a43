"""Request and response models of the HTTP API, the configurable limits, and the checks that apply them.

Error contract (every error body is `{"error": "<one clear sentence>", "detail": ...}`):
- 400: the body is not JSON (invalid JSON, non-UTF-8 bytes, empty body).
- 404: `/v1/similar` names an item (uid or id) that the model does not have.
- 413: the body is larger than the ingress's `max_body_bytes` (AppArgs).
- 422: the JSON does not fit the request model (missing field, wrong type, unknown field, k < 1, empty list) or
  breaks a limit (too many texts, text too long or empty, k above `max_k` or above the labels left, exclude ids out
  of range or too many; feature pairs too many, out of the model's index range or not finite), or the request's
  kind does not fit the model (texts to a model trained on sparse features, features to a text model).
- 401 / 403: a label change (`POST` / `PUT /v1/labels`, `DELETE /v1/labels/{uid}`) without the admin token, with
  a wrong one, or while no admin token is configured (the endpoints are off: 403).
- 404: a label change or `GET /v1/labels/{uid}` names a uid the catalogue does not hold; 409: an add of a uid that
  exists (or was retired), a change of a retired label.
- 503 (with a Retry-After header): the scorer replica died or cannot be reached, and no other replica answered the
  one retry (see `elmo_serve.app.Ingress`); a label change while the catalogue log cannot be written or was just
  rewritten by a swap.
Nothing a client sends produces a 5xx.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator


class Limits(BaseModel):
    """What one request may ask for; changed at run time through the scorer's `user_config`."""

    model_config = ConfigDict(extra="forbid")

    max_texts: int = Field(256, ge=1, description="texts (or feature lists) per /v1/predict request")
    max_text_chars: int = Field(10_000, ge=1, description="characters per text")
    max_k: int = Field(100, ge=1, description="largest k (also capped by the number of labels)")
    max_exclude: int = Field(1_000, ge=0, description="label ids in `exclude`")
    max_features: int = Field(10_000, ge=1, description="(index, value) pairs per item of `features`")
    max_label_batch: int = Field(1_000, ge=1, description="labels per POST / PUT /v1/labels")
    max_title_chars: int = Field(1_000, ge=1, description="characters per label title")
    max_uid_chars: int = Field(256, ge=1, description="characters per label uid")


class RequestError(Exception):
    """A client error found after parsing: carries the HTTP status and the message for the body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


K = Annotated[StrictInt, Field(ge=1, description="labels to return per text (1 <= k <= min(max_k, labels))")]
# One sparse feature: [index, value], as a line of the BoW training data holds `index:value` (strict: no strings or
# booleans for numbers; NaN and infinities are refused).
FeaturePair = tuple[StrictInt, Annotated[float, Field(strict=True, allow_inf_nan=False)]]


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"texts": ["python3 numpy"], "k": 5}, {"features": [[[3, 1.0], [17, 0.5]]], "k": 5}]
        },
    )

    texts: list[StrictStr] | None = Field(
        None, min_length=1, description="texts to tag (each non-empty, at most max_text_chars); give texts or features"
    )
    features: list[list[FeaturePair]] | None = Field(
        None,
        min_length=1,
        description="for a model trained on sparse BoW features (`elmo train --format bow`): per item, its "
        "[index, value] pairs (indices in [0, num_features) of /v1/model, at most max_features pairs, finite "
        "values); give texts or features",
    )
    k: K = 10
    exclude: list[StrictInt] | None = Field(None, description="label ids never returned, for every text")

    @model_validator(mode="after")
    def _texts_or_features(self) -> PredictRequest:
        if (self.texts is None) == (self.features is None):
            raise ValueError("give exactly one of `texts` or `features` (one is required)")
        return self

    @property
    def items(self) -> int:
        """Texts or feature lists in the request."""
        return len(self.texts if self.texts is not None else self.features)


class SimilarRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"uid": "python3", "k": 5}]})

    uid: StrictStr | None = Field(None, min_length=1, description="the item's uid")
    id: StrictInt | None = Field(None, ge=0, description="the item's label id (give uid or id, not both)")
    k: K = 10
    mode: Literal["text", "embedding"] = Field(
        "text", description="text: the item's title scored by the model; embedding: nearest label vectors (faiss)"
    )

    @model_validator(mode="after")
    def _one_key(self) -> SimilarRequest:
        if (self.uid is None) == (self.id is None):
            raise ValueError("give exactly one of `uid` or `id`")
        return self


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uid: StrictStr = Field(min_length=1, description="the label's uid (new for POST, existing for PUT)")
    title: StrictStr = Field(
        min_length=1, description="its text: a new label's head row is the model's zero-shot vector of this title"
    )


class LabelsRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"labels": [{"uid": "zstd", "title": "zstd : fast lossless compression"}]}]},
    )

    labels: list[LabelIn] = Field(min_length=1, description="at most max_label_batch labels, each uid once")


class LabelOut(BaseModel):
    label_id: int
    uid: str
    title: str | None = Field(description="None: an artifact label served without a title")
    retired: bool = Field(description="a retired label keeps its id and uid and is never returned again")
    source: Literal["artifact", "catalogue"] = Field(description="in the served artifact, or added through the API")


class LabelsResponse(BaseModel):
    catalogue_version: int = Field(description="the catalogue log's version once the change applied")
    model_version: str
    labels: list[LabelOut] = Field(description="the labels changed (or asked for), in request order")


class ScoredLabel(BaseModel):
    label_id: int
    uid: str
    title: str
    score: float


class PredictResponse(BaseModel):
    model_version: str
    results: list[list[ScoredLabel]] = Field(description="per text, the top-k labels, best first")


class SimilarResponse(BaseModel):
    model_version: str
    item: ScoredLabel = Field(description="the query item (score 0)")
    results: list[ScoredLabel] = Field(description="related items, best first, the item itself excluded")


class ModelInfo(BaseModel):
    model_version: str
    artifact: str
    num_labels: int
    dim: int
    head_dtype: str
    encoder: str
    backend: str
    torch_threads: int = Field(description="intra-op threads of the answering replica's torch")
    metrics: dict = Field(default_factory=dict)
    manifest: dict = Field(default_factory=dict)
    limits: Limits
    inputs: Literal["texts", "features"] = Field(
        "texts", description="what /v1/predict takes: texts, or sparse features (a model trained on BoW data)"
    )
    num_features: int | None = Field(None, description="the feature index range [0, num_features) of a BoW model")
    num_live_labels: int = Field(0, description="labels that can be returned: num_labels minus the retired ones")
    replica: str = Field("", description="the scorer replica that answered")
    head_rows: int = Field(0, description="head rows allocated (labels plus spare rows for live labels)")
    head_bytes: int = Field(0, description="bytes of the head's weights on the answering replica")
    catalogue: str | None = Field(None, description="the live label catalogue's log (None: live labels are off)")
    catalogue_version: int | None = Field(None, description="the version of the log this replica has applied")
    last_swap_error: str | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model_version: str


class ErrorBody(BaseModel):
    error: str
    detail: list | dict | str | None = None
    model_version: str | None = Field(None, description="the model that refused the request (None: refused before)")


@dataclass(frozen=True)
class ScorerReply:
    """The scorer deployment's answer to one validated request, as it comes back through the Ray handle: the response
    body, or the status and message of the client error that refused the request; and the scorer batch it was in."""

    body: PredictResponse | SimilarResponse | LabelsResponse | None = None
    status: int = 200  # the 4xx of a refused request
    error: str = ""  # a refused request's message
    batch: int = 0  # requests in the scorer batch that answered it (0: scored without one, /v1/similar embedding)
    texts: int = 0  # texts in that batch
    model_version: str = ""  # the model that answered or refused it
    replica: str = ""  # the scorer replica that answered (the x-replica header)

    @classmethod
    def refused(cls, e: RequestError, model_version: str) -> ScorerReply:
        return cls(status=e.status, error=e.message, model_version=model_version)


def check_predict(
    req: PredictRequest,
    limits: Limits,
    num_labels: int,
    num_features: int | None = None,
    retired: frozenset[int] = frozenset(),
) -> None:
    """Raise RequestError(422) naming the first limit the request breaks. `num_features`: the feature index range of
    a model that takes sparse features (None: the model takes texts). `retired`: label ids retired (never returned:
    they do not count as labels left for k, and excluding one changes nothing)."""
    if req.texts is not None and num_features is not None:
        raise RequestError(
            422,
            f"this model takes features, not text: send `features` ([index, value] pairs per item, "
            f"indices in [0, {num_features}))",
        )
    if req.features is not None and num_features is None:
        raise RequestError(422, "this model takes texts, not features: send `texts`")
    what = "texts" if req.texts is not None else "feature lists"
    if req.items > limits.max_texts:
        raise RequestError(422, f"too many {what}: {req.items} > max_texts={limits.max_texts}")
    for i, t in enumerate(req.texts or ()):
        if not t.strip():
            raise RequestError(422, f"texts[{i}] is empty")
        if len(t) > limits.max_text_chars:
            raise RequestError(422, f"texts[{i}] has {len(t)} characters > max_text_chars={limits.max_text_chars}")
    for i, pairs in enumerate(req.features or ()):
        if not pairs:
            raise RequestError(422, f"features[{i}] is empty: give at least one [index, value] pair")
        if len(pairs) > limits.max_features:
            raise RequestError(422, f"features[{i}] has {len(pairs)} pairs > max_features={limits.max_features}")
        for j, (index, _) in enumerate(pairs):
            if not 0 <= index < num_features:
                raise RequestError(
                    422,
                    f"features[{i}][{j}] index {index} is out of range: this model's features are [0, {num_features})",
                )
    live = num_labels - len(retired)
    check_k(req.k, limits, live)
    excl = set(req.exclude or ()) - retired
    if req.exclude:
        if len(req.exclude) > limits.max_exclude:
            raise RequestError(422, f"exclude has {len(req.exclude)} ids > max_exclude={limits.max_exclude}")
        bad = [e for e in req.exclude if not 0 <= e < num_labels]
        if bad:
            raise RequestError(422, f"exclude ids must be label ids in [0, {num_labels}), got {bad[:5]}")
    if req.k > live - len(excl):
        raise RequestError(422, f"k={req.k} exceeds the {live - len(excl)} labels left after `exclude`")


def check_k(k: int, limits: Limits, num_labels: int, reserved: int = 0) -> None:
    if k > limits.max_k:
        raise RequestError(422, f"k={k} > max_k={limits.max_k}")
    if k > num_labels - reserved:
        raise RequestError(422, f"k={k} exceeds the number of labels available ({num_labels - reserved})")
