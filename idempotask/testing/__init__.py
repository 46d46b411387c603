"""The store conformance suite: any backend, ours or a third party's, runs the same contract.

It needs pytest and hypothesis (``pip install 'idempotask[dev]'`` or just those two);
``import idempotask`` never imports this package. A backend's test module is about ten
lines: subclass :class:`StoreContract`, give it a ``backend`` fixture, and build the
hypothesis state machine from a factory::

    import pytest
    from idempotask.testing import StoreContract, make_state_machine
    from mystore import MyBackend

    class TestMyBackend(StoreContract):
        @pytest.fixture
        def backend(self) -> MyBackend:
            return MyBackend("mystore://localhost")

    TestMyBackendMachine = make_state_machine(lambda: MyBackend("mystore://localhost")).TestCase

The backend must implement :class:`~idempotask.backends.base.Backend` and the test-only
``expire_now(key)`` hook (:class:`~idempotask.backends.base.SupportsExpireNow`), which makes
a record's lease or ttl run out now on the store's own clock. Every contract test runs
twice, through the sync methods and through the async ones driven on an event loop; keys
carry a prefix unique to each test, so a shared server needs no cleaning. One test sleeps
about 1.2 s to check a real lease runs out; set ``real_time_tests = False`` on the class
to skip it.

Dead-letter stores run :class:`DeadLetterStoreContract` the same way, with a
``dead_letter_store`` fixture (see :mod:`idempotask.testing.deadletters`), and breaker
stores :class:`BreakerStoreContract`, with a ``breaker_store`` fixture (see
:mod:`idempotask.testing.breakers`). For richer
assertion messages add ``pytest.register_assert_rewrite("idempotask.testing")`` to your
``conftest.py``.
"""

from __future__ import annotations

from idempotask.testing.breakers import BreakerStoreContract, BreakerView
from idempotask.testing.contract import (
    LEASE,
    TTL,
    StoreContract,
    check_expires_in,
    expect_record,
    new_token,
)
from idempotask.testing.deadletters import (
    AsyncDeadLetterView,
    DeadLetterStoreContract,
    DeadLetterView,
    SyncDeadLetterView,
    open_dead_letter_view,
)
from idempotask.testing.machine import ModelRecord, ReferenceStore, make_state_machine
from idempotask.testing.views import AsyncView, Mode, StoreView, SyncView, open_view

__all__ = [
    "LEASE",
    "TTL",
    "AsyncDeadLetterView",
    "AsyncView",
    "BreakerStoreContract",
    "BreakerView",
    "DeadLetterStoreContract",
    "DeadLetterView",
    "Mode",
    "ModelRecord",
    "ReferenceStore",
    "StoreContract",
    "StoreView",
    "SyncDeadLetterView",
    "SyncView",
    "check_expires_in",
    "expect_record",
    "make_state_machine",
    "new_token",
    "open_dead_letter_view",
    "open_view",
]
