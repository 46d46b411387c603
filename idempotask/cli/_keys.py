"""``idempotask keys ...``: inspect the record under an idempotency key, or release it."""

from __future__ import annotations

from typing import Any

from idempotask import config
from idempotask.backends.base import Backend, Record, State
from idempotask.cli._common import CommandError, Context, Decoded, decode
from idempotask.cli._text import fields, iso, span, to_json
from idempotask.errors import CorruptRecordError


class _NotARecord(CommandError):
    """The data under ``key`` is not a record idempotask wrote."""

    def __init__(self, key: str, error: CorruptRecordError) -> None:
        super().__init__(
            f"{error}\n(`idempotask keys forget {key} --force` deletes whatever is there)"
        )
        self.key = key


def _get(backend: Backend, key: str) -> Record | None:
    try:
        return backend.get(key)
    except CorruptRecordError as exc:
        raise _NotARecord(key, exc) from exc


def _find(backend: Backend, key: str) -> tuple[str, Record | None]:
    """The record under ``key``, else under ``<namespace>:key`` (keys are shown with
    their namespace, but people may leave it out). Data that is not a record is refused
    with a hint (exit 1), not reported as an unreachable store."""
    record = _get(backend, key)
    namespace = config.settings().namespace
    if record is None and not key.startswith(namespace + ":"):
        prefixed = f"{namespace}:{key}"
        found = _get(backend, prefixed)
        if found is not None:
            return prefixed, found
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
        "key": key,
        "state": record.state.value,
        "token": record.token,
        "owner": record.owner,
        "fingerprint": record.fingerprint,
        "expires_in": record.expires_in,
        "expires_at": _expiry(record, now)[1],
        "payload_size": len(record.payload),
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
    key, record = _find(config.get_backend(), ctx.args.key)
    if record is None:
        raise CommandError(f"no record under key {ctx.args.key!r}")
    if ctx.json:
        ctx.print(to_json(record_json(key, record, ctx.now)))
        return 0
    label = "lease expires in" if record.state is State.IN_PROGRESS else "expires in"
    payload_label, payload = _payload_text(record)
    ctx.print(
        fields(
            [
                ("key", key),
                ("state", record.state.value),
                ("token", record.token),
                ("owner", record.owner or "-"),
                ("fingerprint", record.fingerprint or "-"),
                (label, _expiry(record, ctx.now)[0]),
                ("payload", f"{len(record.payload)} bytes"),
                (payload_label, payload),
            ]
        )
    )
    return 0


def cmd_forget(ctx: Context) -> int:
    """``keys forget KEY [--force]``: delete the record so the next call runs again."""
    backend = config.get_backend()
    try:
        key, record = _find(backend, ctx.args.key)
    except _NotARecord as exc:
        if not ctx.args.force:
            raise
        # Not a record of ours: --force removes whatever is under the key.
        key = exc.key
        backend.delete(key)
        if ctx.json:
            ctx.print(to_json({"key": key, "forgotten": True, "state": None}))
        else:
            ctx.print(f"forgot {key} (it held data that was not an idempotask record)")
        return 0
    if record is None:
        raise CommandError(f"no record under key {ctx.args.key!r}")
    if record.state is State.IN_PROGRESS and not ctx.args.force:
        lease = "" if record.expires_in is None else f", lease expires in {span(record.expires_in)}"
        owner = f", owner {record.owner!r}" if record.owner else ""
        raise CommandError(
            f"{key} is in progress (token {record.token!r}{owner}{lease}): a call may be "
            "running right now, and forgetting the key lets a duplicate run beside it. Wait "
            "for the lease to run out, or pass --force to release it anyway"
        )
    # Delete only the record we looked at: if another call took the key meanwhile, keep it.
    if not backend.delete(key, token=record.token):
        raise CommandError(f"{key} changed while it was being forgotten; look again")
    if ctx.json:
        ctx.print(to_json({"key": key, "forgotten": True, "state": record.state.value}))
    else:
        ctx.print(f"forgot {key} (it was {record.state.value}); the next call runs again")
    return 0
