"""The store protocol every idempotency backend implements.

A store keeps one *record* per key and knows nothing of Python objects: payloads are
bytes. Six operations, each with a sync method and an ``a``-prefixed async twin on the
same object, so one backend serves sync and async callers::

    claim / aclaim        take the key, or return the record that holds it
    complete / acomplete  store a result (compare-and-set on the token)
    fail / afail          store a failure (compare-and-set on the token)
    renew / arenew        extend a lease (compare-and-set on the token)
    get / aget            read a record
    delete / adelete      remove a record (optionally only if the token matches)

Every expiry uses the store's clock, never the caller's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Backend", "Record", "State", "SupportsExpireNow"]


class State(str, enum.Enum):
    """The state of a key. ABSENT is represented by the absence of a record."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Record:
    """One key's record as a store returns it.

    ``token`` identifies the claim that wrote it (caller-generated, unique per call);
    ``owner`` is an optional id shared by retries of one execution (a task id);
    ``fingerprint`` is set when the caller supplied an explicit key, and digests the
    arguments so a reused key with other arguments is detected; ``payload`` is the
    serialized result (COMPLETED) or error (FAILED), empty while IN_PROGRESS;
    ``expires_in`` is the time left on the lease or ttl in seconds by the store's clock,
    or ``None`` when the store cannot tell cheaply.
    """

    key: str
    state: State
    token: str
    owner: str = ""
    fingerprint: str = ""
    payload: bytes = b""
    expires_in: float | None = None

    def held_by(self, token: str) -> bool:
        """True when this record is an in-progress claim taken with ``token``."""
        return self.state is State.IN_PROGRESS and self.token == token


@runtime_checkable
class Backend(Protocol):
    """The idempotency store contract.

    ``claim`` is atomic and answers in one operation: the returned record is the one
    that holds the key *after* the claim. If ``record.held_by(token)`` the caller holds
    the key; otherwise the record is the existing COMPLETED, FAILED or IN_PROGRESS
    record. The key is taken when it is absent, when its record has expired (a lease
    that ran out, a ttl that passed), when the existing IN_PROGRESS record carries the
    same non-empty ``owner`` (a framework retry of the same execution re-takes its own
    claim), or when it carries the same ``token`` (a claim retried after a timeout
    recognises its own success). Re-taking keeps the record's fingerprint unless a new
    one is given and resets the lease.

    ``complete``, ``fail`` and ``renew`` succeed only while the key is held with
    ``token`` (IN_PROGRESS, same token, lease not run out) and return whether they did;
    repeating one that already succeeded with the same token is harmless (``complete``
    and ``fail`` return True again; the first stored payload stays). ``delete`` with a
    token removes the record only if it carries that token; without one it removes
    whatever is there. A FAILED record is taken like a COMPLETED one only once its ttl
    passes, so a caller that wants to run again deletes it (with its token) first.
    ``ttl`` and ``lease`` are seconds (floats allowed; stores may round up to their
    resolution). Driver errors are raised as :class:`idempotask.BackendError`.

    Keys are opaque strings; those the library builds are ASCII and under 200
    characters (explicit per-call keys are hashed), and stores may refuse keys over
    1024 bytes. A store holding connections may offer ``close()`` / ``aclose()``.
    """

    def claim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record: ...

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool: ...

    def fail(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool: ...

    def renew(self, key: str, token: str, *, lease: float) -> bool: ...

    def get(self, key: str) -> Record | None: ...

    def delete(self, key: str, *, token: str | None = None) -> bool: ...

    async def aclaim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record: ...

    async def acomplete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool: ...

    async def afail(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool: ...

    async def arenew(self, key: str, token: str, *, lease: float) -> bool: ...

    async def aget(self, key: str) -> Record | None: ...

    async def adelete(self, key: str, *, token: str | None = None) -> bool: ...


@runtime_checkable
class SupportsExpireNow(Protocol):
    """Test-only power: make a record's lease or ttl run out now, on the store's clock.

    Real servers' clocks cannot be faked, so the conformance suite uses this to move a
    record past its expiry. Returns whether a record was there.
    """

    def expire_now(self, key: str) -> bool: ...
