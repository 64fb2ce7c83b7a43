"""A small HTTP client of the serving API (used by `elmo query`), and the table it prints."""

from __future__ import annotations

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ServeError(RuntimeError):
    """A non-2xx answer: the HTTP status and the server's message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class ElmoClient:
    def __init__(self, url: str = DEFAULT_URL, timeout: float = 30.0):
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def __enter__(self) -> ElmoClient:
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    def _json(self, r: httpx.Response) -> dict:
        if r.status_code >= 400:
            try:
                message = r.json().get("error") or r.text
            except ValueError:
                message = r.text
            raise ServeError(r.status_code, message)
        return r.json()

    def predict(self, texts: list[str], k: int = 10, exclude: list[int] | None = None) -> dict:
        body = {"texts": list(texts), "k": k} | ({"exclude": exclude} if exclude else {})
        return self._json(self.http.post("/v1/predict", json=body))

    def similar(self, uid: str | None = None, id: int | None = None, k: int = 10, mode: str = "text") -> dict:
        body = {"k": k, "mode": mode} | ({"uid": uid} if uid is not None else {"id": id})
        return self._json(self.http.post("/v1/similar", json=body))

    def model(self) -> dict:
        return self._json(self.http.get("/v1/model"))

    def health(self) -> dict:
        return self._json(self.http.get("/healthz"))


def format_table(labels: list[dict], title_width: int = 60) -> str:
    """Rank, score, label id, uid and title of scored labels, one per line."""
    uid_w = max([3] + [len(x["uid"]) for x in labels])
    lines = [f"{'#':>3}  {'score':>9}  {'id':>8}  {'uid':<{uid_w}}  title"]
    for r, x in enumerate(labels, 1):
        title = x["title"] if len(x["title"]) <= title_width else x["title"][: title_width - 3] + "..."
        lines.append(f"{r:>3}  {x['score']:>9.4f}  {x['label_id']:>8}  {x['uid']:<{uid_w}}  {title}")
    return "\n".join(lines)
