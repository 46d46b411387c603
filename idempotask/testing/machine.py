"""A hypothesis state machine checking a backend against a pure reference model.

:class:`ReferenceStore` is the store contract with no clock: records expire only when
``expire_now`` says so (the machine's leases and ttls are long enough never to run out on
their own during a run). :func:`make_state_machine` builds a machine that sends random
claims, completes, fails, renews, deletes, gets and expiries over a few keys, alternating
the backend's sync and async methods, and compares every observable result with the model.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from idempotask.backends.base import Backend, Record, State
from idempotask.testing.contract import expect_record
from idempotask.testing.views import Mode, open_view

__all__ = ["ModelRecord", "ReferenceStore", "make_state_machine"]


@dataclasses.dataclass
class ModelRecord:
    """A record of the reference model; ``duration`` is the lease or ttl it was given.

    Its fields are in the order :func:`~idempotask.testing.expect_record` takes them."""

    state: State
    token: str
    owner: str
    fingerprint: str
    payload: bytes
    duration: float


class ReferenceStore:
    """The store contract as a plain dict: the oracle the state machine compares with.

    Nothing expires by itself; :meth:`expire_now` removes a record, since an expired record
    behaves exactly as an absent one.
    """

    def __init__(self) -> None:
        self.records: dict[str, ModelRecord] = {}

    def claim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> tuple[ModelRecord, bool]:
        """The record after the claim, and whether the claim holds the key."""
        current = self.records.get(key)
        if current is None:
            current = ModelRecord(State.IN_PROGRESS, token, owner, fingerprint, b"", lease)
            self.records[key] = current
            return current, True
        retake = current.state is State.IN_PROGRESS and (
            current.token == token or (owner != "" and current.owner == owner)
        )
        if not retake:
            return current, False
        # The claim's own token, owner and lease take over; the fingerprint survives unless
        # the claim brings one.
        current.token, current.owner, current.duration = token, owner, lease
        if fingerprint:
            current.fingerprint = fingerprint
        return current, True

    def finish(self, key: str, token: str, payload: bytes, *, ttl: float, state: State) -> bool:
        """complete (``state=COMPLETED``) or fail (``state=FAILED``)."""
        current = self.records.get(key)
        if current is None or current.token != token:
            return False
        if current.state is not State.IN_PROGRESS:
            return current.state is state
        current.state, current.payload, current.duration = state, payload, ttl
        return True

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        """Restart the lease if held with ``token``."""
        current = self.records.get(key)
        if current is None or current.state is not State.IN_PROGRESS or current.token != token:
            return False
        current.duration = lease
        return True

    def get(self, key: str) -> ModelRecord | None:
        """The record under ``key``, if any."""
        return self.records.get(key)

    def delete(self, key: str, *, token: str | None = None) -> bool:
        """Remove the record, only if it carries ``token`` when one is given."""
        current = self.records.get(key)
        if current is None or (token is not None and current.token != token):
            return False
        del self.records[key]
        return True

    def expire_now(self, key: str) -> bool:
        """Let the record's lease or ttl run out: it is gone."""
        return self.records.pop(key, None) is not None


# Small pools, so that tokens, owners and keys collide often and every branch is reached.
_KEYS = ["a", "a:", "ключ:{b}"]
_TOKENS = ["tok-1", "tok-2", "tok-3"]
_OWNERS = ["", "own-1", "own-2"]
_FINGERPRINTS = ["", "fp-1", "fp-2"]
_PAYLOADS = [b"", b"\x00\xff", b"ok", bytes(range(256)) * 8]
# Whole seconds, long enough never to run out during a run, and distinct so that a store
# which ignores the value it was given shows in expires_in.
_LEASES = [60.0, 120.0]
_TTLS = [600.0, 1200.0]

_via = st.sampled_from(["sync", "async"])
_key = st.sampled_from(_KEYS)
_token = st.sampled_from(_TOKENS)
# For complete, fail, renew and delete: "current" means the token of the record now under
# the key, so the interesting paths (the holder finishing, a retried finish) come up often
# rather than once in a few hundred steps.
_token_or_current = st.just("current") | _token
# Likewise a key name, or "existing": a key the model holds a record under.
_key_or_existing = st.just("existing") | _key


def _has_records(machine: RuleBasedStateMachine) -> bool:
    model: ReferenceStore = machine.model  # type: ignore[attr-defined]
    return bool(model.records)


def make_state_machine(
    backend_factory: Callable[[], Backend],
    *,
    max_examples: int = 50,
    stateful_step_count: int = 30,
) -> type[RuleBasedStateMachine]:
    """A state machine class for the backends ``backend_factory`` returns.

    The factory is called once per example; it may return a fresh store or a shared one
    (every example uses its own unique key prefix, so old records on a real server do not
    matter). Each example owns an event loop for the async calls, so a shared backend must
    cope with being awaited from a new loop each time. Run it with
    ``TestStoreMachine = make_state_machine(factory).TestCase`` in a test module.
    """

    @settings(
        max_examples=max_examples,
        stateful_step_count=stateful_step_count,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    class StoreMachine(RuleBasedStateMachine):
        """Random operations on a backend, each compared with :class:`ReferenceStore`."""

        def __init__(self) -> None:
            super().__init__()
            backend = backend_factory()
            prefix = f"idempotask-machine:{uuid.uuid4().hex}:"
            modes: tuple[Mode, ...] = ("sync", "async")
            self.views = {mode: open_view(backend, mode, prefix=prefix) for mode in modes}
            self.model = ReferenceStore()

        def key(self, name: str) -> str:
            """The full key for a pool name; "existing" picks one the model has a record for."""
            if name == "existing":
                # The most recently created record: the one a follow-up step most likely
                # has something interesting to do with.
                records = self.model.records
                return next(reversed(records)) if records else self.views["sync"].key(_KEYS[0])
            return self.views["sync"].key(name)

        def pick(self, key: str, token: str) -> str:
            """``token``, or for "current" the token of the model's record under ``key``."""
            if token != "current":
                return token
            record = self.model.get(key)
            return record.token if record is not None else _TOKENS[0]

        def check(self, key: str, via: Mode) -> None:
            """The backend's record under ``key`` matches the model's."""
            self.compare(key, self.views[via].get(key), self.model.get(key))

        def compare(self, key: str, got: Record | None, want: ModelRecord | None) -> None:
            """``got`` (the backend's) equals ``want`` (the model's) in every field."""
            if want is None:
                assert got is None, f"expected no record under {key!r}, got {got!r}"
                return
            # A ModelRecord's fields are expect_record's arguments after the key, in order.
            expect_record(got, key, *dataclasses.astuple(want))

        @rule(
            name=_key_or_existing,
            token=_token,
            owner=st.sampled_from(_OWNERS),
            fingerprint=st.sampled_from(_FINGERPRINTS),
            lease=st.sampled_from(_LEASES),
            via=_via,
        )
        def claim(
            self, name: str, token: str, owner: str, fingerprint: str, lease: float, via: Mode
        ) -> None:
            """A claim: same holder, same record, same answer as the model's."""
            key = self.key(name)
            got = self.views[via].claim(
                key, token, lease=lease, owner=owner, fingerprint=fingerprint
            )
            want, held = self.model.claim(
                key, token, lease=lease, owner=owner, fingerprint=fingerprint
            )
            assert got.held_by(token) is held, f"held_by({token!r}) should be {held}: {got!r}"
            self.compare(key, got, want)

        @precondition(_has_records)
        @rule(
            name=_key_or_existing,
            token=_token_or_current,
            payload=st.sampled_from(_PAYLOADS),
            ttl=st.sampled_from(_TTLS),
            completed=st.booleans(),
            via=_via,
        )
        def finish(
            self, name: str, token: str, payload: bytes, ttl: float, completed: bool, via: Mode
        ) -> None:
            """complete or fail: same answer as the model's, then the same record."""
            key = self.key(name)
            token = self.pick(key, token)
            state = State.COMPLETED if completed else State.FAILED
            current = self.model.get(key)
            if current is not None and current.state is state and current.token == token:
                # The contract makes a repeat harmless only with the same payload; a retry
                # sends the same bytes, so the machine does too.
                payload = current.payload
            view = self.views[via]
            method = view.complete if completed else view.fail
            got = method(key, token, payload, ttl=ttl)
            want = self.model.finish(key, token, payload, ttl=ttl, state=state)
            assert got is want, f"{state.value} with {token!r} returned {got}, expected {want}"
            self.check(key, via)

        @precondition(_has_records)
        @rule(
            name=_key_or_existing,
            token=_token_or_current,
            lease=st.sampled_from(_LEASES),
            via=_via,
        )
        def renew(self, name: str, token: str, lease: float, via: Mode) -> None:
            """renew: same answer as the model's, then the same record."""
            key = self.key(name)
            token = self.pick(key, token)
            got = self.views[via].renew(key, token, lease=lease)
            want = self.model.renew(key, token, lease=lease)
            assert got is want, f"renew with {token!r} returned {got}, expected {want}"
            self.check(key, via)

        @precondition(_has_records)
        @rule(name=_key_or_existing, token=st.none() | _token_or_current, via=_via)
        def delete(self, name: str, token: str | None, via: Mode) -> None:
            """delete with or without a token: same answer, then the same record."""
            key = self.key(name)
            token = None if token is None else self.pick(key, token)
            got = self.views[via].delete(key, token=token)
            want = self.model.delete(key, token=token)
            assert got is want, f"delete(token={token!r}) returned {got}, expected {want}"
            self.check(key, via)

        @rule(name=_key, via=_via)
        def get(self, name: str, via: Mode) -> None:
            """get returns the model's record."""
            self.check(self.key(name), via)

        @precondition(_has_records)
        @rule(name=_key_or_existing)
        def expire_now(self, name: str) -> None:
            """The test hook: the record is gone, as in the model."""
            key = self.key(name)
            got = self.views["sync"].expire_now(key)
            want = self.model.expire_now(key)
            assert got is want, f"expire_now returned {got}, expected {want}"
            self.check(key, "sync")

        def teardown(self) -> None:
            """Delete this example's keys and close its event loop."""
            for view in self.views.values():
                view.close()

    return StoreMachine
