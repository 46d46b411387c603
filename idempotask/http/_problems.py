"""The error responses of the HTTP layer, as RFC 9457 ``application/problem+json``.

Titles and details follow the IETF HTTPAPI draft "The Idempotency-Key HTTP Header
Field". Each problem has a stable ``code`` (an extension member) a client can switch on.
With the policy's ``docs_url`` the ``type`` is that URL with the code as fragment and a
``Link: <docs_url>; rel="describedby"`` header points to it; without one the ``type`` is
``about:blank`` and the ``title`` the status phrase, as RFC 9457 asks. No problem body
ever quotes the key.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from idempotask.http._policy import Policy
from idempotask.http._stored import Reply

__all__ = ["problem"]

_TITLES = {
    "idempotency-key-missing": "Idempotency-Key is missing",
    "idempotency-key-invalid": "Idempotency-Key is not valid",
    "idempotency-key-reused": "Idempotency-Key is already used",
    "idempotency-key-in-use": "A request is outstanding for this Idempotency-Key",
    "response-not-kept": "Idempotency-Key is already used",
    "request-too-large": "Request body too large for an idempotent request",
    "store-unavailable": "Idempotency store unavailable",
    "stored-response-unreadable": "Stored response cannot be read",
}


def problem(
    policy: Policy, status: int, code: str, detail: str, *, retry_after: int | None = None
) -> Reply:
    """A problem+json :class:`Reply` with ``status``, the ``code``'s title and ``detail``."""
    headers = [("content-type", "application/problem+json"), ("content-language", "en")]
    if policy.docs_url is None:
        kind, title = "about:blank", HTTPStatus(status).phrase
    else:
        kind, title = f"{policy.docs_url}#{code}", _TITLES[code]
        headers.append(("link", f'<{policy.docs_url}>; rel="describedby"; type="text/html"'))
    body = {"type": kind, "title": title, "status": status, "detail": detail, "code": code}
    if retry_after is not None:
        headers.append(("retry-after", str(retry_after)))
    data = json.dumps(body, ensure_ascii=True).encode("ascii")
    headers.append(("content-length", str(len(data))))
    return Reply(status, headers, data)
