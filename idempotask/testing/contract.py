"""The store contract as a pytest base class: subclass it and provide a ``backend`` fixture
(how, and what the backend needs: see :mod:`idempotask.testing`).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import ClassVar

import pytest

from idempotask.backends.base import Backend, Record, State
from idempotask.testing.views import StoreView, SyncView, open_view

__all__ = ["LEASE", "TTL", "StoreContract", "check_expires_in", "expect_record", "new_token"]

#: The lease and ttl the contract tests use: long enough never to run out on their own.
LEASE = 60.0
TTL = 600.0
# Stores may round a lease or ttl up to their resolution; allow up to a second of it.
_RESOLUTION = 1.0

_PAYLOADS = {
    "empty": b"",
    "nul-and-ff": b"\x00\xff",
    "all-bytes": bytes(range(256)),
    "not-utf8": b"\xc3\x28\xa0\xa1\xe2\x28\xa1",
    "1-MiB": os.urandom(1 << 20),
}

_ODD_KEYS = {
    "unicode": "ключ-🔑-鍵-é",
    "colons": "ns:billing.charge:1:9f86d081884c7d65",
    "hash-tag-braces": "ns:{billing.charge:1:abc}",
    "quotes-and-wildcards": "a b'\"%_*?[]\\;--",
    "long-300": "x" * 150 + ":" + "y" * 149,
}

# Keys a careless store would conflate: prefixes, case, trailing space (SQL PAD SPACE
# collations), accents (accent-insensitive collations), glob characters.
_LOOKALIKE_KEYS = ["a", "A", "a ", "a:", "a:b", "á", "ab", "a*", "a?"]


def new_token() -> str:
    """A fresh claim token, as a caller would generate one."""
    return uuid.uuid4().hex


def _describe(record: Record | None) -> str:
    if record is None:
        return "no record"
    payload = record.payload if len(record.payload) <= 40 else record.payload[:40] + b"..."
    return (
        f"Record(state={record.state.value}, token={record.token!r}, owner={record.owner!r}, "
        f"fingerprint={record.fingerprint!r}, payload={payload!r} ({len(record.payload)} bytes), "
        f"expires_in={record.expires_in!r})"
    )


def expect_record(
    record: Record | None,
    key: str,
    state: State,
    token: str,
    owner: str = "",
    fingerprint: str = "",
    payload: bytes = b"",
    limit: float | None = None,
) -> Record:
    """Assert ``record`` has exactly these fields, and a sane ``expires_in`` (≤ ``limit``).

    Fields may be given by position: key, state, token, owner, fingerprint, payload."""
    assert record is not None, f"expected a {state.value} record under {key!r}, got none"
    got = (record.key, record.state, record.token, record.owner, record.fingerprint)
    want = (key, state, token, owner, fingerprint)
    assert got == want, f"expected {want}, got {_describe(record)}"
    assert record.payload == payload, (
        f"payload differs: expected {len(payload)} bytes, got {_describe(record)}"
    )
    check_expires_in(record, limit)
    return record


def check_expires_in(record: Record, limit: float | None) -> None:
    """Assert ``record.expires_in`` is None or a number in ``[0, limit]`` (plus resolution)."""
    remaining = record.expires_in
    if remaining is None:
        return
    assert isinstance(remaining, (int, float)), f"expires_in is not a number: {remaining!r}"
    assert remaining >= 0, f"expires_in is negative: {_describe(record)}"
    if limit is not None:
        assert remaining <= limit + _RESOLUTION, (
            f"expires_in exceeds the lease/ttl of {limit}: {_describe(record)}"
        )


class StoreContract:
    """Conformance tests for a :class:`~idempotask.backends.base.Backend`.

    Subclass it in a class whose name starts with ``Test`` and define a ``backend``
    fixture returning the store under test (it must also have ``expire_now(key)``). Each
    test gets ``store``, a synchronous view of that backend, once per mode ("sync" and
    "async"); keys come from ``store.key(name)``, unique to the test, so a shared server
    needs no cleaning between runs.
    """

    #: Run the one test that sleeps (~1.2 s) to check a real lease runs out.
    real_time_tests: ClassVar[bool] = True

    @pytest.fixture(params=["sync", "async"])
    def store(self, request: pytest.FixtureRequest, backend: Backend) -> Iterator[StoreView]:
        """The backend under test seen through the sync or the async methods."""
        with contextlib.closing(open_view(backend, request.param)) as view:
            yield view

    # -- claim ---------------------------------------------------------------------------

    def test_claim_on_absent_key_takes_it(self, store: StoreView) -> None:
        """A claim on an absent key holds it, with the claim's token, owner and fingerprint."""
        key, token = store.key(), new_token()
        record = store.claim(key, token, lease=LEASE, owner="task-1", fingerprint="fp-1")
        assert record.held_by(token), _describe(record)
        for got in (record, store.get(key)):
            expect_record(got, key, State.IN_PROGRESS, token, "task-1", "fp-1", limit=LEASE)

    @pytest.mark.parametrize(
        ("first_owner", "second_owner"),
        [("task-1", "task-2"), ("", ""), ("", "task-1")],
        ids=["another-owner", "no-owners", "an-owner-after-an-ownerless-claim"],
    )
    def test_second_claim_returns_the_holders_record(
        self, store: StoreView, first_owner: str, second_owner: str
    ) -> None:
        """A claim with another token gets the existing in-progress record, not the key,
        when its owner differs, when neither has an owner (empty owners never match each
        other), and when it has an owner and the holder has none."""
        key, first, second = store.key(), new_token(), new_token()
        store.claim(key, first, lease=LEASE, owner=first_owner, fingerprint="fp-1")
        record = store.claim(key, second, lease=LEASE, owner=second_owner, fingerprint="fp-2")
        assert not record.held_by(second), _describe(record)
        expect_record(record, key, State.IN_PROGRESS, first, first_owner, "fp-1", limit=LEASE)

    def test_claim_retried_with_same_token_retakes_it(self, store: StoreView) -> None:
        """A claim retried with its own token (after a timeout) recognises its success."""
        key, token = store.key(), new_token()
        store.claim(key, token, lease=LEASE, owner="task-1", fingerprint="fp-1")
        record = store.claim(key, token, lease=LEASE, owner="task-1", fingerprint="fp-1")
        assert record.held_by(token), _describe(record)
        expect_record(record, key, State.IN_PROGRESS, token, "task-1", "fp-1", limit=LEASE)

    def test_claim_with_same_owner_retakes_it_with_the_new_token(self, store: StoreView) -> None:
        """A framework retry (same owner, new token) re-takes the claim; the old token is out."""
        key, first, second = store.key(), new_token(), new_token()
        store.claim(key, first, lease=LEASE, owner="task-1", fingerprint="fp-1")
        record = store.claim(key, second, lease=LEASE, owner="task-1")
        assert record.held_by(second), _describe(record)
        # No new fingerprint given: the record keeps the one it had.
        expect_record(record, key, State.IN_PROGRESS, second, "task-1", "fp-1", limit=LEASE)
        assert store.complete(key, first, b"stale", ttl=TTL) is False
        assert store.renew(key, first, lease=LEASE) is False
        assert store.complete(key, second, b"fresh", ttl=TTL) is True
        expect_record(store.get(key), key, State.COMPLETED, second, "task-1", "fp-1", b"fresh", TTL)

    def test_retake_replaces_the_fingerprint_when_a_new_one_is_given(
        self, store: StoreView
    ) -> None:
        """Re-taking with a non-empty fingerprint stores that fingerprint."""
        key, first, second = store.key(), new_token(), new_token()
        store.claim(key, first, lease=LEASE, owner="task-1", fingerprint="fp-1")
        record = store.claim(key, second, lease=LEASE, owner="task-1", fingerprint="fp-2")
        assert record.held_by(second), _describe(record)
        assert record.fingerprint == "fp-2", _describe(record)

    def test_retake_resets_the_lease(self, store: StoreView) -> None:
        """Re-taking starts a new lease of the length the re-take asked for."""
        key, token = store.key(), new_token()
        store.claim(key, token, lease=5, owner="task-1")
        record = store.claim(key, new_token(), lease=3600, owner="task-1")
        check_expires_in(record, 3600)
        stored = store.get(key)
        assert stored is not None
        check_expires_in(stored, 3600)
        if stored.expires_in is not None:
            assert stored.expires_in > 5 + _RESOLUTION, _describe(stored)

    def test_expired_lease_is_taken_over(self, store: StoreView) -> None:
        """A claim whose lease ran out is taken over as if absent."""
        key, first, second = store.key(), new_token(), new_token()
        store.claim(key, first, lease=LEASE, owner="task-1", fingerprint="fp-1")
        assert store.expire_now(key) is True
        record = store.claim(key, second, lease=LEASE, owner="task-2")
        assert record.held_by(second), _describe(record)
        # A takeover starts a new record: nothing of the old claim's survives.
        expect_record(record, key, State.IN_PROGRESS, second, "task-2", limit=LEASE)

    def test_late_holder_changes_nothing_after_a_takeover(self, store: StoreView) -> None:
        """After a takeover the old token's complete, fail, renew and delete all do nothing."""
        key, first, second = store.key(), new_token(), new_token()
        store.claim(key, first, lease=LEASE, owner="task-1")
        store.expire_now(key)
        store.claim(key, second, lease=LEASE, owner="task-2", fingerprint="fp-2")
        assert store.complete(key, first, b"late", ttl=TTL) is False
        assert store.fail(key, first, b"late", ttl=TTL) is False
        assert store.renew(key, first, lease=LEASE) is False
        assert store.delete(key, token=first) is False
        expect_record(store.get(key), key, State.IN_PROGRESS, second, "task-2", "fp-2", limit=LEASE)

    def test_expired_lease_cannot_be_completed_by_its_holder(self, store: StoreView) -> None:
        """A lease that ran out is gone: its own token can no longer complete, fail or renew."""
        key, token = store.key(), new_token()
        store.claim(key, token, lease=LEASE)
        store.expire_now(key)
        assert store.renew(key, token, lease=LEASE) is False
        assert store.complete(key, token, b"late", ttl=TTL) is False
        assert store.fail(key, token, b"late", ttl=TTL) is False
        assert store.get(key) is None

    def test_same_owner_after_expiry_takes_a_fresh_claim(self, store: StoreView) -> None:
        """The owner's retry after its lease ran out takes the key like anyone else."""
        key, first, second = store.key(), new_token(), new_token()
        store.claim(key, first, lease=LEASE, owner="task-1", fingerprint="fp-1")
        store.expire_now(key)
        record = store.claim(key, second, lease=LEASE, owner="task-1")
        assert record.held_by(second), _describe(record)
        assert record.fingerprint == "", _describe(record)

    # -- complete and fail ---------------------------------------------------------------

    @pytest.mark.parametrize("payload", _PAYLOADS.values(), ids=_PAYLOADS.keys())
    def test_complete_preserves_the_payload_exactly(self, store: StoreView, payload: bytes) -> None:
        """A completed record returns its payload byte for byte, through get and claim."""
        key, token = store.key(), new_token()
        store.claim(key, token, lease=LEASE, owner="task-1", fingerprint="fp-1")
        assert store.complete(key, token, payload, ttl=TTL) is True
        other = new_token()
        claimed = store.claim(key, other, lease=LEASE)
        assert not claimed.held_by(other), _describe(claimed)
        for record in (store.get(key), claimed):
            expect_record(record, key, State.COMPLETED, token, "task-1", "fp-1", payload, TTL)

    def test_complete_repeated_with_same_token_is_harmless(self, store: StoreView) -> None:
        """A retried complete with the same token and payload returns True again."""
        key, token = store.key(), new_token()
        store.claim(key, token, lease=LEASE)
        assert store.complete(key, token, b"result", ttl=TTL) is True
        assert store.complete(key, token, b"result", ttl=TTL) is True
        expect_record(store.get(key), key, State.COMPLETED, token, payload=b"result", limit=TTL)

    def test_complete_with_wrong_token_changes_nothing(self, store: StoreView) -> None:
        """complete is compare-and-set on the token: another token returns False."""
        key, token = store.key(), new_token()
        store.claim(key, token, lease=LEASE, owner="task-1")
        assert store.complete(key, new_token(), b"intruder", ttl=TTL) is False
        assert store.fail(key, new_token(), b"intruder", ttl=TTL) is False
        expect_record(store.get(key), key, State.IN_PROGRESS, token, "task-1", limit=LEASE)

    def test_complete_and_fail_on_absent_key_return_false(self, store: StoreView) -> None:
        """Nothing is stored for a key that was never claimed."""
        key, token = store.key(), new_token()
        assert store.complete(key, token, b"x", ttl=TTL) is False
        assert store.fail(key, token, b"x", ttl=TTL) is False
        assert store.get(key) is None

    @pytest.mark.parametrize("payload", [b"", b"ValueError: boom\n\x00\xff"], ids=["empty", "text"])
    def test_fail_stores_a_failed_record(self, store: StoreView, payload: bytes) -> None:
        """fail stores FAILED with its payload; a retried fail with the same token is True."""
        key, token = store.key(), new_token()
        store.claim(key, token, lease=LEASE, owner="task-1", fingerprint="fp-1")
        assert store.fail(key, token, payload, ttl=30) is True
        assert store.fail(key, token, payload, ttl=30) is True
        expect_record(store.get(key), key, State.FAILED, token, "task-1", "fp-1", payload, 30)

    def test_complete_after_fail_returns_false(self, store: StoreView) -> None:
        """Once FAILED, the same token cannot turn the record into COMPLETED, nor back."""
        key, token = store.key(), new_token()
        store.claim(key, token, lease=LEASE)
        assert store.fail(key, token, b"error", ttl=TTL) is True
        assert store.complete(key, token, b"result", ttl=TTL) is False
        assert store.renew(key, token, lease=LEASE) is False
        expect_record(store.get(key), key, State.FAILED, token, payload=b"error", limit=TTL)

        other = store.key("other")
        store.claim(other, token, lease=LEASE)
        assert store.complete(other, token, b"result", ttl=TTL) is True
        assert store.fail(other, token, b"error", ttl=TTL) is False
        expect_record(store.get(other), other, State.COMPLETED, token, payload=b"result", limit=TTL)

    @pytest.mark.parametrize("state", [State.COMPLETED, State.FAILED], ids=lambda s: s.value)
    def test_claim_on_a_finished_record_returns_it(self, store: StoreView, state: State) -> None:
        """A COMPLETED or FAILED record is returned, not taken, even to its owner or token."""
        key, token = store.key(), new_token()
        store.claim(key, token, lease=LEASE, owner="task-1")
        finish = store.complete if state is State.COMPLETED else store.fail
        assert finish(key, token, b"stored", ttl=TTL) is True
        for claimant, owner in [(new_token(), "task-2"), (new_token(), "task-1"), (token, "")]:
            record = store.claim(key, claimant, lease=LEASE, owner=owner)
            assert not record.held_by(claimant), _describe(record)
            expect_record(record, key, state, token, "task-1", payload=b"stored", limit=TTL)

    @pytest.mark.parametrize("state", [State.COMPLETED, State.FAILED], ids=lambda s: s.value)
    def test_ttl_expiry_makes_the_key_absent_and_claimable(
        self, store: StoreView, state: State
    ) -> None:
        """Once the ttl passes the record is gone and the key can be claimed afresh."""
        key, token = store.key(), new_token()
        store.claim(key, token, lease=LEASE, fingerprint="fp-1")
        finish = store.complete if state is State.COMPLETED else store.fail
        assert finish(key, token, b"stored", ttl=TTL) is True
        assert store.expire_now(key) is True
        assert store.get(key) is None
        assert store.complete(key, token, b"stored", ttl=TTL) is False
        assert store.fail(key, token, b"stored", ttl=TTL) is False
        second = new_token()
        record = store.claim(key, second, lease=LEASE)
        assert record.held_by(second), _describe(record)
        expect_record(record, key=key, state=State.IN_PROGRESS, token=second, limit=LEASE)

    # -- renew ---------------------------------------------------------------------------

    def test_renew_extends_the_lease(self, store: StoreView) -> None:
        """renew with the holder's token returns True and restarts the lease."""
        key, token = store.key(), new_token()
        store.claim(key, token, lease=5, owner="task-1")
        assert store.renew(key, token, lease=3600) is True
        record = expect_record(store.get(key), key, State.IN_PROGRESS, token, "task-1", limit=3600)
        if record.expires_in is not None:
            assert record.expires_in > 5 + _RESOLUTION, _describe(record)

    def test_renew_with_wrong_token_or_on_absent_key_returns_false(self, store: StoreView) -> None:
        """renew is compare-and-set on the token."""
        key, token = store.key(), new_token()
        assert store.renew(key, token, lease=LEASE) is False
        assert store.get(key) is None
        store.claim(key, token, lease=LEASE)
        assert store.renew(key, new_token(), lease=LEASE) is False
        assert store.complete(key, token, b"done", ttl=TTL) is True
        assert store.renew(key, token, lease=LEASE) is False
        expect_record(store.get(key), key, State.COMPLETED, token, payload=b"done", limit=TTL)

    # -- get and delete ------------------------------------------------------------------

    def test_get_on_absent_key_returns_none(self, store: StoreView) -> None:
        """get on a key never written returns None."""
        assert store.get(store.key("never-written")) is None

    def test_delete_without_token_removes_any_record(self, store: StoreView) -> None:
        """delete() without a token removes whatever is there, in any state."""
        for state in State:
            key, token = store.key(state.value), new_token()
            store.claim(key, token, lease=LEASE)
            if state is State.COMPLETED:
                store.complete(key, token, b"r", ttl=TTL)
            elif state is State.FAILED:
                store.fail(key, token, b"e", ttl=TTL)
            assert store.delete(key) is True
            assert store.get(key) is None
            assert store.delete(key) is False
            second = new_token()
            assert store.claim(key, second, lease=LEASE).held_by(second)

    def test_delete_with_token_is_compare_and_delete(self, store: StoreView) -> None:
        """delete(token=...) removes the record only if it carries that token."""
        key, token = store.key(), new_token()
        store.claim(key, token, lease=LEASE)
        assert store.delete(key, token=new_token()) is False
        assert store.get(key) is not None
        assert store.delete(key, token=token) is True
        assert store.get(key) is None
        assert store.delete(key, token=token) is False

        done = store.key("done")
        store.claim(done, token, lease=LEASE)
        store.complete(done, token, b"r", ttl=TTL)
        assert store.delete(done, token=new_token()) is False
        assert store.delete(done, token=token) is True
        assert store.get(done) is None

    def test_expired_record_behaves_as_absent(self, store: StoreView) -> None:
        """An expired record is not returned, not deletable and not expirable again."""
        key, token = store.key(), new_token()
        store.claim(key, token, lease=LEASE)
        assert store.expire_now(key) is True
        assert store.get(key) is None
        assert store.delete(key) is False
        assert store.delete(key, token=token) is False
        assert store.expire_now(key) is False

    def test_expire_now_on_absent_key_returns_false(self, store: StoreView) -> None:
        """The test hook reports whether a live record was there."""
        assert store.expire_now(store.key("never-written")) is False

    # -- keys, fingerprints, expires_in ----------------------------------------------------

    @pytest.mark.parametrize("name", _ODD_KEYS.values(), ids=_ODD_KEYS.keys())
    def test_keys_are_opaque_strings(self, store: StoreView, name: str) -> None:
        """Any string works as a key: unicode, colons, braces, quotes, 300 characters."""
        key, token = store.key(name), new_token()
        assert store.claim(key, token, lease=LEASE).held_by(token)
        assert store.complete(key, token, b"ok", ttl=TTL) is True
        expect_record(store.get(key), key, State.COMPLETED, token, payload=b"ok", limit=TTL)
        assert store.delete(key, token=token) is True

    def test_distinct_keys_do_not_interfere(self, store: StoreView) -> None:
        """Keys differing only in case, accents, a suffix or trailing space are distinct."""
        tokens = {name: new_token() for name in _LOOKALIKE_KEYS}
        for name, token in tokens.items():
            record = store.claim(store.key(name), token, lease=LEASE)
            assert record.held_by(token), f"{name!r} collided: {_describe(record)}"
        for name, token in tokens.items():
            assert store.complete(store.key(name), token, name.encode(), ttl=TTL) is True
        for name, token in tokens.items():
            expect_record(
                store.get(store.key(name)),
                store.key(name),
                State.COMPLETED,
                token,
                payload=name.encode(),
                limit=TTL,
            )
        store.delete(store.key("a"))
        assert store.get(store.key("a")) is None
        assert store.get(store.key("A")) is not None
        assert store.get(store.key("a:")) is not None

    def test_fingerprint_and_owner_round_trip(self, store: StoreView) -> None:
        """Long fingerprints and owner ids come back exactly as given."""
        key, token = store.key(), new_token()
        fingerprint = "sha256:" + "0123456789abcdef" * 4
        owner = "celery:" + str(uuid.uuid4())
        store.claim(key, token, lease=LEASE, owner=owner, fingerprint=fingerprint)
        store.complete(key, token, b"r", ttl=TTL)
        expect_record(store.get(key), key, State.COMPLETED, token, owner, fingerprint, b"r", TTL)

    def test_expires_in_is_none_or_within_the_lease_and_ttl(self, store: StoreView) -> None:
        """expires_in is None or a non-negative number no larger than the lease or ttl."""
        key, token = store.key(), new_token()
        check_expires_in(store.claim(key, token, lease=30), 30)
        in_progress = store.get(key)
        assert in_progress is not None
        check_expires_in(in_progress, 30)
        store.complete(key, token, b"r", ttl=90)
        completed = store.get(key)
        assert completed is not None
        check_expires_in(completed, 90)
        check_expires_in(store.claim(key, new_token(), lease=30), 90)

    # -- concurrency -----------------------------------------------------------------------

    def test_concurrent_claims_elect_exactly_one_holder(self, store: StoreView) -> None:
        """Racing claims (threads in sync mode, tasks in async mode): exactly one holds."""
        key = store.key()
        tokens = [new_token() for _ in range(store.concurrency)]
        records = store.claim_concurrently(key, tokens, lease=LEASE)
        winners = [t for t, r in zip(tokens, records, strict=True) if r.held_by(t)]
        assert len(winners) == 1, f"{len(winners)} of {len(tokens)} claims hold the key"
        for record in records:
            assert record.state is State.IN_PROGRESS, _describe(record)
            assert record.token == winners[0], _describe(record)

    def test_concurrent_takeover_of_an_expired_lease_elects_one(self, store: StoreView) -> None:
        """Racing claims on a lease that ran out: exactly one takes it over."""
        key, stale = store.key(), new_token()
        store.claim(key, stale, lease=LEASE)
        store.expire_now(key)
        tokens = [new_token() for _ in range(store.concurrency)]
        records = store.claim_concurrently(key, tokens, lease=LEASE)
        winners = [t for t, r in zip(tokens, records, strict=True) if r.held_by(t)]
        assert len(winners) == 1, f"{len(winners)} of {len(tokens)} claims hold the key"
        assert store.complete(key, stale, b"late", ttl=TTL) is False

    # -- the store's own clock -------------------------------------------------------------

    def test_a_real_lease_runs_out_on_the_store_clock(self, backend: Backend) -> None:
        """A one-second lease really runs out after about a second (the one sleeping test)."""
        if not self.real_time_tests:
            pytest.skip("real_time_tests = False on this backend's test class")
        with contextlib.closing(SyncView(backend)) as view:
            key, first, second = view.key(), new_token(), new_token()
            started = time.monotonic()
            assert view.claim(key, first, lease=1.0).held_by(first)
            assert not view.claim(key, second, lease=1.0).held_by(second), "expired at once"
            taken = False
            while not taken and time.monotonic() - started < 1.6:
                time.sleep(0.05)
                taken = view.claim(key, second, lease=LEASE).held_by(second)
            elapsed = time.monotonic() - started
            assert taken, "a 1-second lease was still held after 1.6 s"
            # Slack for the gap between the clocks of this process and of the store.
            assert elapsed >= 0.9, f"a 1-second lease ran out after only {elapsed:.2f} s"
            assert view.complete(key, first, b"late", ttl=TTL) is False
