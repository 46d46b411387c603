"""What every command shares: its context, the refusal error, where the stores are (said
without passwords) and how stored bytes are shown."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from idempotask import config
from idempotask.backends.deadletters import DeadLetter
from idempotask.cli._text import safe, to_json
from idempotask.deadletter import DeadLetterQueue, Redacted, Unserializable, default_queue
from idempotask.deadletter._arguments import FINGERPRINT
from idempotask.serializers import get_serializer

_JSON = get_serializer("json")


class CommandError(Exception):
    """An expected failure: printed as ``idempotask: error: <message>``, exit ``code``
    (1: refused or not found; 2: bad usage)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Context:
    """One run of the command: its arguments and where it writes."""

    args: argparse.Namespace
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    now: float = field(default_factory=time.time)
    prog: str = "idempotask"
    """How the command is run, in the hints messages give (``manage.py idempotask``
    under Django)."""
    acting_as: str | None = None
    """Who acts, for a letter's history, when not the default ``cli:<login name>``."""
    store_hint: str = "pass --url (or set $IDEMPOTASK_URL) to reach your store"
    """What to do when the configured store is the process-local ``memory://``."""
    tables_hint: str = "create it with `idempotask db create --url URL`"
    """What to do when a SQL store's table is missing."""

    @property
    def json(self) -> bool:
        """Whether machine-readable output was asked for."""
        return bool(getattr(self.args, "json", False))

    def print(self, text: str = "") -> None:
        """A line of the command's output, control characters escaped (JSON output has
        none: :func:`~idempotask.cli._text.to_json` escapes them the JSON way)."""
        print(safe(text), file=self.out, flush=True)

    def show(self, data: Any, *lines: str) -> None:
        """The command's result: ``data`` as JSON with ``--json``, else ``lines``."""
        if self.json:
            self.print(to_json(data))
        for line in () if self.json else lines:
            self.print(line)

    def note(self, text: str) -> None:
        """A remark for people, on stderr (never mixed into the output)."""
        print(safe(f"idempotask: {text}"), file=self.err, flush=True)

    def queue(self) -> DeadLetterQueue:
        """The configured dead-letter queue."""
        return default_queue()

    @property
    def actor(self) -> str:
        """Who acts, for a letter's history: ``acting_as`` when given, else
        ``cli:<login name>``."""
        if self.acting_as:
            return self.acting_as
        try:
            user = getpass.getuser()
        except Exception:  # no login name (a container without a passwd entry)
            user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"
        return f"cli:{user}"


# -- where the stores are, without passwords -----------------------------------------------

_USERINFO = re.compile(r"(?<=://)([^/@\s:]*):[^/@\s]*@")
_ENCODED_USERINFO = re.compile(r"(?i)(%3A%2F%2F[^/&%@]*)%3A(?:(?!%2F)[^/&])*?%40")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (also inside a percent-encoded URL in
    its query, as a fallback URL's ``secondary=`` carries one).

    >>> redact_url("redis://:s3cret@cache:6379/0")
    'redis://:***@cache:6379/0'
    >>> redact_url("fallback+redis://h/0?secondary=postgresql%3A%2F%2Fapp%3Apw%40db%2Fapp")
    'fallback+redis://h/0?secondary=postgresql%3A%2F%2Fapp%3A***%40db%2Fapp'
    """
    url = _USERINFO.sub(r"\1:***@", url)
    return _ENCODED_USERINFO.sub(r"\1%3A***%40", url)


def scrub(message: str, *urls: str | None) -> str:
    """``message`` with the passwords of ``urls`` taken out, should a driver echo them."""
    for url in urls:
        for match in _USERINFO.finditer(url or ""):
            secret = match.group(0).split(":", 1)[1][:-1]
            if secret:
                message = message.replace(secret, "***")
    return message


def backend_url() -> str | None:
    """The idempotency store's URL as configured (None for a store given as an object)."""
    chosen = config.settings().backend
    if chosen is None:
        return os.environ.get(config.ENV_URL) or config.DEFAULT_URL
    return chosen if isinstance(chosen, str) else None


def dead_letter_url() -> str | None:
    """The dead-letter store's URL as configured: the option, else
    ``$IDEMPOTASK_DEAD_LETTER_URL``, else the idempotency store's URL (as
    :func:`idempotask.config.get_dead_letter_store` decides); None for an object."""
    chosen = config.settings().dead_letter_store
    if chosen is not None:
        return chosen if isinstance(chosen, str) else None
    return os.environ.get(config.ENV_DEAD_LETTER_URL) or backend_url()


def _describe(store: str, url: str | None, chosen: object) -> str:
    return f"the {store} store at {redact_url(url) if url is not None else repr(chosen)}"


def describe_backend() -> str:
    """``the idempotency store at redis://host:6379/0``, password hidden."""
    return _describe("idempotency", backend_url(), config.settings().backend)


def describe_dead_letter_store() -> str:
    """``the dead-letter store at redis://host:6379/0``, password hidden."""
    return _describe("dead-letter", dead_letter_url(), config.settings().dead_letter_store)


# -- stored bytes, shown ---------------------------------------------------------------------


def _readable(value: object) -> str:
    if isinstance(value, Unserializable):
        reason = f": {value.reason}" if value.reason else ""
        return f"<not stored: {value.type_name}{reason}>"
    if isinstance(value, Redacted):
        if value.how == "removed":
            return "<removed by redact=>"
        shown = _readable(value.shown)
        return f"<added by redact=: {shown}>" if value.how == "added" else f"<redacted: {shown}>"
    try:
        return repr(value)
    except Exception as exc:  # rebuilt without __init__: a __repr__ may need what it sets
        return f"<{type(value).__qualname__} whose repr() raised {type(exc).__name__}: {exc}>"


@dataclass(frozen=True)
class Decoded:
    """Stored typed JSON, three ways: the JSON document itself (lossless, for ``--json``),
    the Python value's repr (None when it cannot be rebuilt here), and why not."""

    document: Any = None
    text: str | None = None
    error: str | None = None


def _load(data: bytes) -> tuple[Any, Any, str | None]:
    """The JSON document in ``data``, the value the typed JSON serializer makes of it,
    and why not when either fails (the value is then None)."""
    try:
        document = json.loads(data.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, None, f"{len(data)} bytes that are not typed JSON (another serializer?)"
    try:
        return document, _JSON.loads(data), None
    except Exception as exc:
        return document, None, str(exc)


def decode(data: bytes) -> Decoded:
    """Decode bytes written by the typed JSON serializer; never raises.

    Classes are only looked up among imported modules (``--import`` the module that
    defines them); other bytes (pickle, foreign data) are reported, never unpickled.
    """
    document, value, error = _load(data)
    return Decoded(document, None if error is not None else _readable(value), error)


@dataclass(frozen=True)
class Arguments:
    """A letter's stored arguments, decoded for people and for ``--json``: the typed JSON
    document, name -> repr of each value, or why they cannot be shown."""

    kept: bool
    document: Any = None
    values: dict[str, str] | None = None
    error: str | None = None


def decode_arguments(letter: DeadLetter) -> Arguments:
    """The letter's arguments (``kept`` is False when none were stored); never raises."""
    if not letter.arguments:
        return Arguments(kept=False)
    document, value, error = _load(letter.arguments)
    if error is None and not isinstance(value, dict):
        error = "not a mapping of names to values"
    if error is not None:
        return Arguments(True, document, None, error)
    shown = {str(name): _readable(v) for name, v in value.items() if name != FINGERPRINT}
    return Arguments(True, document, shown)
