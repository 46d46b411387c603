"""``idempotask keys ...``: list a function's keys, compute one, inspect the record under
a key, or release it.

Keys are shown as the library builds them (``namespace:name:v1:digest``, what
``fn.key_for()`` returns and every command takes); on Redis the record lives under
``namespace:{name:v1:digest}`` (``idempotask.backends.redis.record_key``), shown beside it.
Everything read from the store is printed with its control characters escaped, so a
stored value cannot drive the operator's terminal.
"""

from __future__ import annotations

import json
from typing import Any

from idempotask import config
from idempotask._printable import printable
from idempotask.backends.base import Backend, Record, State, SupportsPurgeExpired, SupportsScan
from idempotask.cli._common import (
    CommandError,
    Context,
    Decoded,
    backend_url,
    decode,
    describe_backend,
)
from idempotask.cli._text import fields, iso, plural, span, table, to_json
from idempotask.errors import ConfigurationError, CorruptRecordError
from idempotask.keys import check_name, explicit_key, make_key
from idempotask.serializers import get_serializer

_REDIS_SCHEMES = ("redis", "rediss", "unix", "fallback+redis", "fallback+rediss", "fallback+unix")


def redis_key(key: str) -> str | None:
    """Where a Redis store keeps the record of ``key``, when the configured store is
    Redis (None otherwise, or when the driver is not installed)."""
    url = backend_url()
    if url is None or url.split("://", 1)[0].lower() not in _REDIS_SCHEMES:
        return None
    try:
        from idempotask.backends.redis import record_key
    except ImportError:
        return None
    return record_key(key)


class _NotARecord(CommandError):
    """The data under ``key`` is not a record idempotask wrote."""

    def __init__(self, key: str, error: CorruptRecordError, prog: str) -> None:
        super().__init__(f"{error}\n(`{prog} keys forget {key} --force` deletes whatever is there)")
        self.key = key


def _get(backend: Backend, key: str, prog: str) -> Record | None:
    try:
        return backend.get(key)
    except CorruptRecordError as exc:
        raise _NotARecord(key, exc, prog) from exc


def _find(backend: Backend, key: str, prog: str = "idempotask") -> tuple[str, Record]:
    """The record under ``key``, else under ``<namespace>:key`` (keys are shown with
    their namespace, but people may leave it out); none is refused (exit 1), and so is
    data that is not a record, with a hint, not reported as an unreachable store."""
    record = _get(backend, key, prog)
    namespace = config.settings().namespace
    if record is None and not key.startswith(namespace + ":"):
        prefixed = f"{namespace}:{key}"
        found = _get(backend, prefixed, prog)
        if found is not None:
            return prefixed, found
    if record is None:
        raise CommandError(f"no record under key {key!r}")
    return key, record


def _error(decoded: Decoded) -> dict[str, str] | None:
    """A cached error's type and message, from the typed JSON of ``dump_exception``."""
    doc = decoded.document
    if not isinstance(doc, dict) or not {"module", "qualname", "message"} <= doc.keys():
        return None
    module, qualname = str(doc["module"]), str(doc["qualname"])
    name = qualname if module == "builtins" else f"{module}.{qualname}"
    return {"type": name, "message": str(doc["message"])}


def _expiry(record: Record, now: float) -> tuple[str, str | None]:
    if record.expires_in is None:
        return "unknown (the store cannot tell cheaply)", None
    at = iso(now + record.expires_in)
    return f"{span(record.expires_in)} ({at})", at


def record_json(key: str, record: Record, now: float) -> dict[str, Any]:
    """A record as JSON. ``result`` is the stored typed JSON document (lossless),
    ``result_repr`` the decoded value's repr, ``error`` a cached error's type and message,
    ``decode_error`` why the payload could not be read (another serializer, say)."""
    decoded = decode(record.payload) if record.payload else Decoded()
    error = _error(decoded) if record.state is State.FAILED else None
    return {
        **_listed_json(record, now),
        "key": key,
        "token": record.token,
        "result": decoded.document if record.state is State.COMPLETED else None,
        "result_repr": decoded.text if record.state is State.COMPLETED else None,
        "error": error,
        "decode_error": decoded.error,
    }


def _payload_text(record: Record) -> tuple[str, str]:
    if not record.payload:
        return "result", "-"
    decoded = decode(record.payload)
    if record.state is State.FAILED:
        error = _error(decoded)
        if error is not None:
            return "error", f"{error['type']}: {error['message']}"
        return "error", f"cannot be read: {decoded.error or 'not a stored exception'}"
    if decoded.text is not None:
        return "result", decoded.text
    return "result", f"cannot be decoded here: {decoded.error}"


def cmd_show(ctx: Context) -> int:
    """``keys show KEY``: the record under an idempotency key."""
    key, record = _find(config.get_backend(), ctx.args.key, ctx.prog)
    label = "lease expires in" if record.state is State.IN_PROGRESS else "expires in"
    payload_label, payload = _payload_text(record)
    stored_as = redis_key(key)
    ctx.show(
        record_json(key, record, ctx.now),
        fields(
            [
                ("key", printable(key)),
                *([("redis key", printable(stored_as))] if stored_as else []),
                ("state", record.state.value),
                ("token", printable(record.token)),
                ("owner", printable(record.owner) or "-"),
                ("fingerprint", printable(record.fingerprint) or "-"),
                (label, _expiry(record, ctx.now)[0]),
                ("payload", f"{len(record.payload)} bytes"),
                (payload_label, printable(payload)),
            ]
        ),
    )
    return 0


def cmd_forget(ctx: Context) -> int:
    """``keys forget KEY [--force]``: delete the record so the next call runs again."""
    backend = config.get_backend()
    try:
        key, record = _find(backend, ctx.args.key, ctx.prog)
    except _NotARecord as exc:
        if not ctx.args.force:
            raise
        # Not a record of ours: --force removes whatever is under the key.
        key = exc.key
        backend.delete(key)
        said = f"forgot {printable(key)} (it held data that was not an idempotask record)"
        ctx.show({"key": key, "forgotten": True, "state": None}, said)
        return 0
    if record.state is State.IN_PROGRESS and not ctx.args.force:
        lease = "" if record.expires_in is None else f", lease expires in {span(record.expires_in)}"
        owner = f", owner {record.owner!r}" if record.owner else ""
        raise CommandError(
            f"{printable(key)} is in progress (token {record.token!r}{owner}{lease}): a call "
            "may be running right now, and forgetting the key lets a duplicate run beside it. "
            "Wait for the lease to run out, or pass --force to release it anyway"
        )
    # Delete only the record we looked at: if another call took the key meanwhile, keep it.
    if not backend.delete(key, token=record.token):
        raise CommandError(f"{printable(key)} changed while it was being forgotten; look again")
    said = f"forgot {printable(key)} (it was {record.state.value}); the next call runs again"
    ctx.show({"key": key, "forgotten": True, "state": record.state.value}, said)
    return 0


def cmd_purge(ctx: Context) -> int:
    """``keys purge [--batch N]``: delete expired records from a store that keeps them
    (SQL); stores that expire records by themselves (Redis, memory) need nothing."""
    backend = config.get_backend()
    if not isinstance(backend, SupportsPurgeExpired):
        ctx.show(
            {"deleted": 0, "purges": False},
            f"nothing to purge: {describe_backend()} expires its records by itself "
            f"({type(backend).__name__} keeps no expired rows)",
        )
        return 0
    deleted = backend.purge_expired(batch=ctx.args.batch)
    said = f"deleted {plural(deleted, 'expired record')} from {describe_backend()}"
    ctx.show({"deleted": deleted, "purges": True}, said)
    return 0


def _name(ctx: Context) -> str:
    try:
        return check_name(ctx.args.name)
    except ConfigurationError as exc:
        raise CommandError(f"NAME: {exc}", 2) from exc


def cmd_list(ctx: Context) -> int:
    """``keys list NAME [--limit N]``: the live records of one function, bounded."""
    name = _name(ctx)
    backend = config.get_backend()
    if not isinstance(backend, SupportsScan):
        raise CommandError(
            f"{describe_backend()} cannot list its keys: its store ({type(backend).__name__}) "
            "does not offer scan(prefix, limit=) (idempotask.backends.base.SupportsScan). Compute "
            f"a key with `{ctx.prog} keys compute` and look at it with `{ctx.prog} keys show`"
        )
    limit: int = ctx.args.limit
    prefix = f"{config.settings().namespace}:{name}:"
    # One more than asked tells whether there are more; the store bounds its own work.
    records = backend.scan(prefix, limit=limit + 1)
    more = len(records) > limit
    records = sorted(records[:limit], key=lambda r: r.key)
    if ctx.json:
        rows = [_listed_json(r, ctx.now) for r in records]
        ctx.print(to_json({"prefix": prefix, "records": rows, "more": more}))
        return 0
    if not records:
        ctx.print(f"no live records under {printable(prefix)}*")
        return 0
    ctx.print(
        table(
            ["KEY", "STATE", "EXPIRES IN", "OWNER", "PAYLOAD"],
            [
                [
                    printable(r.key),
                    r.state.value,
                    "-" if r.expires_in is None else span(r.expires_in),
                    printable(r.owner) or "-",
                    f"{len(r.payload)} B",
                ]
                for r in records
            ],
            right="4",
        )
    )
    shown = plural(len(records), "record")
    if more:
        ctx.print(f"{shown} shown; there are more (raise --limit, at most 10000)")
    else:
        ctx.print(f"{shown} (the store may report fewer than it holds: scans are bounded)")
    return 0


def _listed_json(record: Record, now: float) -> dict[str, Any]:
    return {
        "key": record.key,
        "state": record.state.value,
        "owner": record.owner,
        "fingerprint": record.fingerprint,
        "expires_in": record.expires_in,
        "expires_at": _expiry(record, now)[1],
        "payload_size": len(record.payload),
    }


def _arguments(text: str | None) -> dict[str, Any]:
    """The JSON object given on the command line: plain JSON, or idempotask's typed JSON
    for values JSON lacks (``{"$t": "date", "v": "2026-01-02"}``, as ``dlq show --json``
    prints stored arguments)."""
    if text is None:
        return {}
    try:
        json.loads(text)
        value = get_serializer("json").loads(text.encode("utf-8", "surrogatepass"))
    except Exception as exc:
        raise CommandError(f"ARGUMENTS: not valid JSON ({exc})", 2) from exc
    if not isinstance(value, dict):
        raise CommandError(
            'ARGUMENTS: expected a JSON object of parameter names to values, e.g. {"order_id": 7}',
            2,
        )
    return value


def cmd_compute(ctx: Context) -> int:
    """``keys compute NAME [ARGUMENTS] [--explicit KEY]``: the key a call is stored under."""
    name = _name(ctx)
    a = ctx.args
    if a.explicit is not None:
        if a.arguments is not None:
            raise CommandError("give ARGUMENTS or --explicit, not both", 2)
        try:
            key = explicit_key(name, a.explicit)
        except ConfigurationError as exc:
            raise CommandError(f"--explicit: {exc}", 2) from exc
    else:
        try:
            key = make_key(name, _arguments(a.arguments))
        except ConfigurationError as exc:
            hint = "" if a.imports else " (pass --import MODULE, the module that defines it)"
            raise CommandError(f"{exc}{hint}", 1) from exc
        except TypeError as exc:  # Python's own: a missing or misplaced argument
            raise CommandError(f"ARGUMENTS do not make a call to {name}: {exc}", 1) from exc
    stored_as = redis_key(key)
    said = fields([("key", key), *([("redis key", stored_as)] if stored_as else [])])
    ctx.show({"key": key, "redis_key": stored_as}, said)
    return 0
