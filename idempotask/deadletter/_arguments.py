"""A failed call's arguments as its dead letter keeps them, and what a replay can rebuild
from them.

A letter stores the call's arguments by name (defaults applied) as typed JSON, after the
``redact=`` hook. A replay must run the *original* call, so every argument that is not
the call's own value is marked in the stored mapping by a placeholder that no replay can
mistake for a value (:class:`Redacted`, :class:`Unserializable`: their docstrings say
when, and what a replay does then). Names starting with ``@`` are never arguments
(parameter names are identifiers): ``@fingerprint`` keeps the digest of the arguments of
a call made under an explicit key, so a replay can check it rebuilt them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from idempotask.backends.base import DeadLetter
from idempotask.serializers import get_serializer

__all__ = [
    "FINGERPRINT",
    "KeepsAllArgumentsWarning",
    "LetterArguments",
    "Redacted",
    "Unserializable",
    "bound_arguments",
    "call_arguments",
    "encode_arguments",
    "keep_all",
    "keep_arguments",
    "letter_arguments",
    "qualified",
]

log = logging.getLogger("idempotask")

JSON = get_serializer("json")
FINGERPRINT = "@fingerprint"


@dataclass(frozen=True, slots=True)
class Unserializable:
    """Stands in, in a stored letter, for an argument the JSON serializer cannot hold.

    A letter holding one is kept for people to read but cannot be replayed from storage;
    use ``redact=`` to store something replayable instead (an id rather than an object),
    or ``replay_with=`` to rebuild the call.
    """

    type_name: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Redacted:
    """Stands in, in a stored letter, for an argument ``redact=`` did not keep as it was.

    ``how`` is ``"changed"`` (``shown`` is what ``redact=`` returned for it, e.g.
    ``"<redacted>"``), ``"removed"`` (``shown`` is None) or ``"added"`` (a name that is not
    an argument of the call, with the value ``redact=`` gave it). A replay never passes it
    to the function: the letter's ``replay_with=`` hook rebuilds the call, or the letter
    waits for a person.
    """

    shown: Any = None
    how: str = "changed"


# Stored letters name the classes by module and qualified name: the public module keeps
# them readable if this package's internals move.
Unserializable.__module__ = "idempotask.deadletter"
Redacted.__module__ = "idempotask.deadletter"


class KeepsAllArgumentsWarning(UserWarning):
    """A ``@dead_letter`` function stores every argument of its failed calls as it is
    (no ``redact=`` was given). Warned once per function, at its first failure."""

    __module__ = "idempotask.deadletter"


def keep_all(arguments: dict[str, Any]) -> dict[str, Any]:
    """``redact=keep_all`` keeps every argument as it is, on purpose: it says that none
    of them is a secret, and silences :class:`KeepsAllArgumentsWarning`.

    >>> keep_all({"order_id": 7})
    {'order_id': 7}
    """
    return arguments


def bound_arguments(
    target: Callable[..., Any] | inspect.Signature | None,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> dict[str, Any] | None:
    """A call's arguments by name, defaults applied, as a letter stores them.

    ``target`` is the function called (or its signature). None when there is no
    target, its signature cannot be read, or the arguments do not bind to it (the call
    itself was wrong: its TypeError is the letter).
    """
    if target is None:
        return None
    try:
        signature = target if isinstance(target, inspect.Signature) else inspect.signature(target)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _same(kept: object, original: object) -> bool:
    """Whether ``redact=`` left a value as it was (the same object, or an equal one of the
    same type); a comparison that raises counts as changed."""
    if kept is original:
        return True
    try:
        return type(kept) is type(original) and bool(kept == original)
    except Exception:
        return False


def _encoded(value: object) -> bytes | None:
    """``value`` as a letter would store it, or None when it cannot be stored."""
    try:
        return JSON.dumps(value)
    except Exception:
        return None


def keep_arguments(
    redact: Callable[[dict[str, Any]], object] | None,
    arguments: Mapping[str, Any] | None,
    *,
    option: str,
    name: str,
) -> dict[str, Any] | None:
    """What a letter keeps of ``arguments`` (``redact`` is option ``option`` of function
    ``name``): each argument ``redact`` left as it was, and a :class:`Redacted`
    placeholder for each one it changed (in place too) or removed and each name it added.

    None keeps no arguments: there were none, or the hook raised or did not return a
    mapping -- keeping the unredacted arguments could store a secret.
    """
    if arguments is None or redact is None or redact is keep_all:
        return None if arguments is None else dict(arguments)
    # The hook receives the call's own objects: one that redacts in place (a field of a
    # dict argument) leaves the same object behind, no longer holding the call's value.
    before = {arg: _encoded(value) for arg, value in arguments.items()}
    try:
        kept = redact(dict(arguments))
    except Exception:
        log.exception("idempotask: the %s hook of %s raised; no arguments kept", option, name)
        return None
    if not isinstance(kept, Mapping):
        log.error(
            "idempotask: the %s hook of %s returned %s, not a mapping; no arguments kept",
            option,
            name,
            type(kept).__name__,
        )
        return None
    kept = dict(kept)
    marked: dict[str, Any] = {}
    for arg, original in arguments.items():
        if arg not in kept:
            marked[arg] = Redacted(None, "removed")
        elif _same(kept[arg], original) and _encoded(original) == before[arg]:
            marked[arg] = original
        else:
            marked[arg] = Redacted(kept[arg], "changed")
    for arg in kept.keys() - arguments.keys():
        marked[arg] = Redacted(kept[arg], "added")
    return marked


def qualified(cls: type) -> str:
    """``module.qualname`` of a class."""
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls.__name__)}"


def _storable(value: object) -> object:
    """``value`` if the JSON serializer holds it, else a placeholder saying why not."""
    try:
        JSON.dumps(value)
        return value
    except Exception as exc:
        reason = str(exc)
        reason = reason if len(reason) <= 300 else reason[:300] + "..."
        if isinstance(value, Redacted):
            return Redacted(Unserializable(qualified(type(value.shown)), reason), value.how)
        return Unserializable(qualified(type(value)), reason)


def encode_arguments(arguments: Mapping[str, Any] | None, *, fingerprint: str = "") -> bytes:
    """Typed JSON of the arguments a letter keeps; values the serializer cannot hold
    become :class:`Unserializable`. ``fingerprint`` (a call under an explicit key) is kept
    as ``@fingerprint``. ``b""`` means no arguments were kept at all. Never raises."""
    if arguments is None:
        return b""
    document = dict(arguments)
    if fingerprint:
        document[FINGERPRINT] = fingerprint
    try:
        return JSON.dumps(document)
    except Exception:
        pass
    try:
        return JSON.dumps({name: _storable(value) for name, value in document.items()})
    except Exception:
        log.warning("idempotask: the arguments of a dead letter could not be stored at all")
        return b""


@dataclass(frozen=True)
class LetterArguments:
    """A letter's stored arguments, read back (:func:`letter_arguments`).

    ``values`` maps each name to its stored value, placeholders included (None when the
    bytes cannot be read here: ``error`` says why; values of your own classes need their
    module imported). ``redacted`` and ``unstored`` name the arguments that hold a
    :class:`Redacted` or :class:`Unserializable` placeholder. ``fingerprint`` is set for a
    call made under an explicit key.
    """

    kept: bool
    values: dict[str, Any] | None = None
    error: str | None = None
    redacted: tuple[str, ...] = ()
    unstored: tuple[str, ...] = ()
    fingerprint: str = ""

    @property
    def complete(self) -> bool:
        """Whether the stored values are the call's own, every one (a replay can run
        them as they are)."""
        return self.values is not None and not self.redacted and not self.unstored

    def why_incomplete(self) -> str:
        """Why the stored values cannot rebuild the call ("" when they can)."""
        if self.values is None:
            return f"the stored arguments cannot be read: {self.error}"
        reasons = []
        if self.redacted:
            reasons.append(
                f"argument(s) {', '.join(self.redacted)} were redacted when the letter was "
                "recorded (redact=)"
            )
        if self.unstored:
            reasons.append(f"argument(s) {', '.join(self.unstored)} could not be stored")
        return "; ".join(reasons)

    def shown(self) -> dict[str, Any]:
        """What was kept, as ``redact=`` gave it: each value, a redacted argument's shown
        value, names ``redact=`` added; removed and unstorable arguments left out. This is
        what a ``replay_with=`` hook receives."""
        shown: dict[str, Any] = {}
        for name, value in (self.values or {}).items():
            if isinstance(value, Redacted):
                if value.how != "removed":
                    shown[name] = value.shown
            elif not isinstance(value, Unserializable):
                shown[name] = value
        return shown


def letter_arguments(letter: DeadLetter) -> LetterArguments:
    """Read ``letter``'s stored arguments; never raises.

    >>> from idempotask.backends.base import DeadLetter
    >>> letter_arguments(DeadLetter(id="1", function="f", kind="transient", error_type="E",
    ...                             message="m")).kept
    False
    """
    if not letter.arguments:
        return LetterArguments(kept=False, values={})
    try:
        document = JSON.loads(letter.arguments)
    except Exception as exc:
        return LetterArguments(kept=True, error=str(exc) or type(exc).__name__)
    if not isinstance(document, dict):
        return LetterArguments(kept=True, error="not a mapping of names to values")
    fingerprint = document.pop(FINGERPRINT, "")
    redacted = tuple(str(n) for n, v in document.items() if isinstance(v, Redacted))
    unstored = tuple(str(n) for n, v in document.items() if isinstance(v, Unserializable))
    return LetterArguments(
        kept=True,
        values=document,
        redacted=redacted,
        unstored=unstored,
        fingerprint=fingerprint if isinstance(fingerprint, str) else "",
    )


def call_arguments(
    signature: inspect.Signature | None,
    name: str,
    values: Mapping[str, Any],
    *,
    kept: bool,
    source: str = "the stored arguments",
) -> tuple[tuple[Any, ...], dict[str, Any]] | str:
    """Positional and keyword arguments to call function ``name`` with ``values`` (by
    name), or why they do not make a call of its signature (``source`` names where the
    values came from)."""
    if signature is None:
        if values:
            return f"{name} has no inspectable signature to replay {source} with"
        return (), {}
    unknown = sorted(set(values) - set(signature.parameters))
    if unknown:
        return f"{name} no longer takes {', '.join(map(repr, unknown))}; its signature changed"
    ordered = {arg: values[arg] for arg in signature.parameters if arg in values}
    bound = inspect.BoundArguments(signature, ordered)
    args, kwargs = bound.args, bound.kwargs
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        what = "were not kept" if not kept else "do not make a call"
        return f"{source} {what} ({exc})"
    return args, kwargs
