"""The admin token of the label endpoints: read from an environment variable of the ingress replicas, compared in
constant time.

The Serve config names the variable (`AppArgs.admin_token_env`, default ELMO_ADMIN_TOKEN), never the token itself:
set it in the environment `elmo serve` or `ray start` runs in, in the deployment's `runtime_env.env_vars`, or from a
Kubernetes Secret (`env: valueFrom: secretKeyRef`) on KubeRay. Unset or empty: the label change endpoints are off.
"""

from __future__ import annotations

import hmac
import os

DEFAULT_ENV = "ELMO_ADMIN_TOKEN"


def admin_token(env: str | None) -> str | None:
    """The token held by the environment variable `env` (None: unset, empty, or no variable named)."""
    return (os.environ.get(env) or None) if env else None


def refusal(token: str | None, authorization: str | None, env: str | None) -> tuple[int, str] | None:
    """None when `authorization` ("Bearer TOKEN") carries `token`; else the status and message of the refusal: 403
    while no token is configured (the endpoints are off), 401 without the header, 403 with a wrong token."""
    if token is None:
        where = f"${env}" if env else "an environment variable named by the app's admin_token_env"
        return 403, f"the label change endpoints are off: no admin token is configured (set {where} on the service)"
    if not authorization:
        return 401, "a label change needs the admin token: send the header 'Authorization: Bearer TOKEN'"
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return 401, "the Authorization header must be 'Bearer TOKEN' (the admin token)"
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return 403, "wrong admin token"
    return None
