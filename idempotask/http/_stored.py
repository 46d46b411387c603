"""Responses as the store keeps them, and the replies the middlewares send.

A kept response is its status, reason phrase, headers (without hop-by-hop ones, and
without ``Set-Cookie`` unless the policy keeps cookies) and body, as bytes:

    b"idempotask-http:1\\n" + JSON {"status", "reason", "headers"} + b"\\n" + body

Header names and values are Latin-1 text, which maps every byte to one character, so a
replay sends the bytes the handler sent. The JSON part is plain data: reading a record
builds no object of any class a record could name. A response too large to keep is
stored as ``{"status", "unkept": bytes seen}`` without a body, so its key stays used.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["HOP_BY_HOP", "Reply", "StoredResponseError", "decode", "encode", "kept_headers"]

_MAGIC = b"idempotask-http:1\n"
_MAX_META = 256 * 1024  # the status line and headers of one response, at most
# What a header name is (RFC 9110 5.1), and what no field value or reason phrase may hold
# (CR and LF would end the line: a record someone else wrote could add headers).
_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
"""Headers about one connection (RFC 9110 7.6.1), never stored: a replay travels on
another connection, and the server frames its body itself."""

Headers = list[tuple[str, str]]


@dataclass
class Reply:
    """A response the middleware sends itself: a replay or a problem.

    ``headers`` are ``(name, value)`` pairs as Latin-1 text; ``reason`` the reason
    phrase (empty: the server's own). ``unkept`` is set on a record of a response that
    was too large to keep: the bytes it had when it went over the limit.
    """

    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    reason: str = ""
    unkept: int = 0


class StoredResponseError(ValueError):
    """Stored bytes are not a response this layer wrote (corrupt or foreign data)."""


def kept_headers(headers: Iterable[tuple[str, str]], *, cookies: bool) -> Headers:
    """``headers`` without the hop-by-hop ones (and those ``Connection`` names), and
    without ``Set-Cookie`` unless ``cookies``."""
    pairs = list(headers)
    dropped = set(HOP_BY_HOP)
    for name, value in pairs:
        if name.lower() == "connection":
            dropped.update(token.strip().lower() for token in value.split(","))
    if not cookies:
        dropped.add("set-cookie")
    return [(n, v) for n, v in pairs if n.lower() not in dropped]


def encode(reply: Reply) -> bytes:
    """The stored form of ``reply`` (its headers already filtered by the caller)."""
    meta: dict[str, object] = {"status": reply.status, "reason": reply.reason}
    if reply.unkept:
        meta["unkept"] = reply.unkept
    else:
        meta["headers"] = [[n, v] for n, v in reply.headers]
    text = json.dumps(meta, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return b"".join((_MAGIC, text, b"\n", b"" if reply.unkept else reply.body))


def decode(payload: bytes) -> Reply:
    """The :class:`Reply` stored in ``payload``; :class:`StoredResponseError` when the
    bytes are not one this layer wrote."""
    if not payload.startswith(_MAGIC):
        raise StoredResponseError("the record is not a stored HTTP response")
    end = payload.find(b"\n", len(_MAGIC), len(_MAGIC) + _MAX_META + 1)
    if end < 0:
        raise StoredResponseError("the stored response has no header part (or a huge one)")
    try:
        meta = json.loads(payload[len(_MAGIC) : end])
    except (ValueError, RecursionError):
        raise StoredResponseError("the stored response's header part is not JSON") from None
    if not isinstance(meta, dict):
        raise StoredResponseError("the stored response's header part is not an object")
    status, reason = meta.get("status"), meta.get("reason", "")
    if type(status) is not int or not 100 <= status <= 999 or not isinstance(reason, str):
        raise StoredResponseError("the stored response has no valid status")
    if _CONTROL.search(reason):
        raise StoredResponseError("the stored response's reason phrase has control characters")
    unkept = meta.get("unkept", 0)
    if type(unkept) is not int or unkept < 0:
        raise StoredResponseError("the stored response has a bad 'unkept' size")
    if unkept:
        return Reply(status, reason=reason, unkept=unkept)
    raw = meta.get("headers")
    if not isinstance(raw, list) or not all(
        isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in raw
    ):
        raise StoredResponseError("the stored response's headers are not name/value pairs")
    try:
        for name, value in raw:
            name.encode("latin-1"), value.encode("latin-1")
    except UnicodeEncodeError:
        raise StoredResponseError("the stored response's headers are not Latin-1") from None
    if not all(_NAME.fullmatch(name) and not _CONTROL.search(value) for name, value in raw):
        raise StoredResponseError("the stored response has a header that HTTP cannot carry")
    return Reply(status, [(n, v) for n, v in raw], payload[end + 1 :], reason)
