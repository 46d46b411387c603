"""``@dead_letter``: record a function's failures before they propagate."""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, Protocol, TypeVar, overload

from idempotask._binding import Bindable
from idempotask._decorated import BoundCall, _BoundCall
from idempotask.backends.base import DeadLetter
from idempotask.call import is_cached_error, is_cancellation
from idempotask.errors import ConfigurationError
from idempotask.flow import Flow, adrive, drive
from idempotask.keys import check_name, default_name
from idempotask.retry import InCallRetry, RetryPolicy
from idempotask.taxonomy import Classifier, FailureKind

if TYPE_CHECKING:
    from typing_extensions import Self

    from idempotask.breaker import CircuitBreaker

from idempotask.deadletter._arguments import (
    KeepsAllArgumentsWarning,
    bound_arguments,
    encode_arguments,
    keep_arguments,
)
from idempotask.deadletter._core import (
    NOT_DEAD_LETTERED,
    RECORDING_CATCH,
    Hook,
    check_classifier,
    check_hook,
    check_policies,
    fire_letter_hooks,
)
from idempotask.deadletter._queue import DeadLetterQueue, default_queue
from idempotask.deadletter._replay import Registration, ReplayWith, register

log = logging.getLogger("idempotask")

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
T = TypeVar("T")
_S = TypeVar("_S")
_P2 = ParamSpec("_P2")

_MARKER = "__idempotask_dead_letter__"


class DeadLetterMethod(Protocol[P, R_co]):
    """A ``@dead_letter`` function as a caller sees it, and what looking it up on an
    instance gives (a method: the instance is passed first to the call and the helpers).

    ``dead_letter_name`` is the name its letters carry and replays look up. The key
    helpers are those of the ``@idempotent`` function under it (over a plain function
    they raise :class:`ConfigurationError`).
    """

    @property
    def dead_letter_name(self) -> str:
        """The replay name."""
        ...

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The inner ``@idempotent`` function's store key of this call."""
        ...

    def key_for_explicit(self, key: str) -> str:
        """The store key of calls made with ``using(key=key)``."""
        ...

    def forget(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Drop this call's stored result so it runs again."""
        ...

    async def aforget(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Async :meth:`forget`."""
        ...

    def forget_key(self, key: str, *, force: bool = False) -> bool:
        """Drop the record under one of the function's store keys."""
        ...

    async def aforget_key(self, key: str, *, force: bool = False) -> bool:
        """Async :meth:`forget_key`."""
        ...

    def using(self, *, key: str | None = None, owner: str | None = None) -> BoundCall[P, R_co]:
        """This function with the inner ``@idempotent``'s per-call explicit ``key`` (an
        Idempotency-Key header) and/or ``owner`` (a task id), failures still recorded.

        A letter recorded under an explicit key keeps that key and a digest of the
        arguments: the processor resolves it if the call completed meanwhile, and a
        replay runs under that same key, with arguments that must match the digest.
        """
        ...


class DeadLetterFunction(DeadLetterMethod[P, R_co], Protocol[P, R_co]):
    """What ``@dead_letter`` returns: the function, recording its failures, with the key
    helpers of the ``@idempotent`` function under it. Looked up on an instance it binds
    like a function, helpers included."""

    @property
    def __wrapped__(self) -> Callable[P, R_co]:
        """The decorated function (an ``@idempotent`` one, or plain)."""
        ...

    # Binding for type checkers, as IdempotentFunction.__get__ explains.
    @overload
    def __get__(  # type: ignore[misc]
        self: Callable[Concatenate[type[_S], _P2], R_co], instance: None, owner: type[_S]
    ) -> DeadLetterMethod[_P2, R_co]: ...

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...

    @overload
    def __get__(  # type: ignore[misc]
        self: Callable[Concatenate[type[_S], _P2], R_co],
        instance: _S,
        owner: type[Any] | None = None,
    ) -> DeadLetterMethod[_P2, R_co]: ...

    @overload
    def __get__(
        self: Callable[Concatenate[_S, _P2], R_co],
        instance: _S,
        owner: type[Any] | None = None,
    ) -> DeadLetterMethod[_P2, R_co]: ...

    @overload
    def __get__(self, instance: object, owner: type[Any] | None = None) -> Self: ...


class _DeadLetter(Bindable):
    """The runtime type of :class:`DeadLetterFunction` (see :mod:`idempotask._binding`)."""

    _kind = "dead-letter function"
    dead_letter_name: str

    def _idempotent(self, helper: str) -> Any:
        inner = self.__wrapped__
        if getattr(inner, "__idempotask_spec__", None) is None or not callable(
            getattr(inner, helper, None)
        ):
            raise ConfigurationError(
                f"{self.dead_letter_name}.{helper}() needs @idempotent under @dead_letter"
            )
        return inner

    def key_for(self, *args: Any, **kwargs: Any) -> str:
        return str(self._idempotent("key_for").key_for(*args, **kwargs))

    def key_for_explicit(self, key: str) -> str:
        return str(self._idempotent("key_for_explicit").key_for_explicit(key))

    def forget(self, *args: Any, **kwargs: Any) -> bool:
        return bool(self._idempotent("forget").forget(*args, **kwargs))

    async def aforget(self, *args: Any, **kwargs: Any) -> bool:
        return bool(await self._idempotent("aforget").aforget(*args, **kwargs))

    def forget_key(self, key: str, *, force: bool = False) -> bool:
        return bool(self._idempotent("forget_key").forget_key(key, force=force))

    async def aforget_key(self, key: str, *, force: bool = False) -> bool:
        return bool(await self._idempotent("aforget_key").aforget_key(key, force=force))

    def using(self, *, key: str | None = None, owner: str | None = None, **unknown: Any) -> Any:
        return self._bound_using(key, owner, unknown, ())

    def _bound_using(
        self, key: Any, owner: Any, unknown: dict[str, Any], prefix: tuple[Any, ...]
    ) -> _BoundCall:
        """``fn.using(key=..., owner=...)`` through the recording: the inner ``@idempotent``
        function's per-call key and owner, with failures still dead-lettered. ``prefix``:
        the instance of a method looked up on one."""
        reg: Registration = getattr(self, _MARKER)
        func: Any = self.__wrapped__
        if reg.spec is None or not callable(getattr(func, "using", None)):
            if unknown:
                raise TypeError(
                    f"{reg.name}.using() got an unexpected keyword argument "
                    f"{next(iter(unknown))!r}; it takes key= and owner="
                )
            if key is not None:
                raise ConfigurationError(
                    f"{reg.name}: using(key=...) needs @idempotent under @dead_letter"
                )
            return _BoundCall(None, None, None, "", prefix, reg.call)
        bound: _BoundCall = func.using(key=key, owner=owner, **unknown)
        if not reg.is_async:
            return bound.through(_recording(reg, bound, key), prefix)

        # A coroutine function, so that in-call retries see an async callable.
        async def call(*args: Any, **kwargs: Any) -> Any:
            return await bound(*args, **kwargs)

        return bound.through(_recording(reg, call, key), prefix)


def _kept(
    reg: Registration, args: tuple[Any, ...], kwargs: dict[str, Any], explicit: str | None
) -> bytes:
    """The call's arguments as its letter keeps them: through ``redact=`` (placeholders
    for what it did not keep as it was), with the arguments' digest for a call under an
    explicit key, whose key cannot be rebuilt from them."""
    arguments = bound_arguments(reg.signature, args, kwargs)
    if arguments and reg.redact is None and not reg.warned:
        reg.warned = True
        warnings.warn(
            f"idempotask: {reg.name} keeps every argument in its dead letters "
            f"({', '.join(arguments)}) because no redact= was given; if one may hold a "
            "secret, pass @dead_letter(redact=...) (and replay_with= to rebuild the call on "
            "replay), or redact=idempotask.deadletter.keep_all to keep them all on purpose",
            KeepsAllArgumentsWarning,
            stacklevel=5,  # the caller of the function (through the recording flow)
        )
    kept = keep_arguments(reg.redact, arguments, option="redact", name=reg.name)
    fingerprint = ""
    if explicit is not None and kept is not None and reg.spec is not None:
        try:
            fingerprint = reg.spec.fingerprint(args, kwargs)
        except Exception:
            fingerprint = ""  # unkeyable arguments: the replay cannot check them either
    return encode_arguments(kept, fingerprint=fingerprint)


def _failure_flow(
    reg: Registration,
    error: Exception,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    explicit: str | None = None,
) -> Flow[DeadLetter | None]:
    """Record a failed call; never raises (the caller's exception must propagate)."""
    try:
        queue = reg.queue if reg.queue is not None else default_queue()
        key = ""
        if reg.spec is not None:
            try:
                key = reg.spec.key(args, kwargs, explicit)
            except Exception:
                key = ""  # the key itself failed to build: the letter says why
        letter = yield from queue.record_flow(
            reg.name,
            error,
            arguments=_kept(reg, args, kwargs, explicit),
            key=key,
            route="",
            critical=reg.critical,
            classifier=reg.classifier,
            policies=reg.policies,
            replay_of=None,
            now=queue.now(),
            actor="worker",
        )
    except Exception:
        # SpoolError was logged with the letter; anything else is a bug of ours.
        log.exception("idempotask: could not record the failure of %s", reg.name)
        return None
    fire_letter_hooks(letter, reg.on_dead_letter, reg.on_retry_exhausted)
    return letter


def _dead_letterable(error: BaseException) -> bool:
    """Whether this failure gets a letter: an ``Exception`` that is not a conflict, and
    not a duplicate answered by a cached error (the first failure's letter covers it)."""
    if is_cancellation(error) or isinstance(error, NOT_DEAD_LETTERED):
        return False
    return not is_cached_error(error)


def _wrap(func: Any, options: dict[str, Any]) -> Any:
    if isinstance(func, staticmethod):
        return staticmethod(_wrap(func.__func__, options))
    if isinstance(func, classmethod):
        wrapped = _wrap(func.__func__, options)
        wrapped.binds_class()  # its helpers bind the class too (see idempotask._binding)
        return wrapped
    if not callable(func):
        raise ConfigurationError(f"@dead_letter: expected a function, got {func!r}")
    if hasattr(func, _MARKER):
        raise ConfigurationError(
            f"@dead_letter is applied twice to {getattr(func, '__qualname__', func)!r}; "
            "each failure would be recorded twice"
        )
    spec = getattr(func, "__idempotask_spec__", None)
    name = options["name"]
    if name is None:
        name = spec.name if spec is not None else default_name(func)
    name = check_name(name)
    queue = options["queue"]
    if queue is not None and not isinstance(queue, DeadLetterQueue):
        raise ConfigurationError(f"queue: expected a DeadLetterQueue, got {queue!r}")
    try:
        signature: inspect.Signature | None = inspect.signature(func)
    except (TypeError, ValueError):
        signature = None
    breaker = options["breaker"]
    if breaker is not None:
        from idempotask.breaker import check_breaker  # imported only when a breaker is given

        breaker = check_breaker(breaker)
    reg = Registration(
        name=name,
        owner=f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}",
        func=func,
        call=func,  # replaced by the wrapper below
        is_async=inspect.iscoroutinefunction(func),
        signature=signature,
        spec=spec,
        queue=queue,
        redact=check_hook("redact", options["redact"]),
        replay_with=_check_replay_with(options["replay_with"], signature),
        classifier=check_classifier(options["classifier"]),
        policies=check_policies(options["policies"]),
        retry=None,
        swallow=bool(options["swallow"]),
        critical=bool(options["critical"]),
        on_dead_letter=check_hook("on_dead_letter", options["on_dead_letter"]),
        on_retry_exhausted=check_hook("on_retry_exhausted", options["on_retry_exhausted"]),
        breaker=breaker,
    )
    reg.retry = _check_retry(options["retry"], reg.classifier)
    # Binds like a function, helpers included; a class method's binding comes along
    # with the @idempotent function's attributes.
    w = _DeadLetter.make(_recording(reg, func, None), func)
    setattr(w, _MARKER, reg)
    w.dead_letter_name = name
    reg.call = w
    register(reg)
    return w


def _recording(reg: Registration, call: Callable[..., Any], explicit: str | None) -> Any:
    """``call`` wrapped so that a failure is recorded before it propagates.

    ``explicit`` is the per-call idempotency key given to ``using(key=...)``, if any.
    """
    # In-call retries sit inside the recording: only their last failure is dead-lettered.
    # (Under @idempotent(cache_errors=...) a retry would meet the cached error: leave
    # retry= off there.) A replay runs reg.guarded(...) itself, without this recording:
    # the processor records its outcome on the letter.
    inner = reg.guarded(call)
    swallow = reg.swallow

    if reg.is_async:

        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await inner(*args, **kwargs)
            except Exception as exc:
                if _dead_letterable(exc):
                    await adrive(_failure_flow(reg, exc, args, kwargs, explicit), RECORDING_CATCH)
                    if swallow:
                        return None
                raise

        return async_wrapper

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return inner(*args, **kwargs)
        except Exception as exc:
            if _dead_letterable(exc):
                drive(_failure_flow(reg, exc, args, kwargs, explicit), RECORDING_CATCH)
                if swallow:
                    return None
            raise

    return wrapper


def _check_replay_with(hook: Any, signature: inspect.Signature | None) -> ReplayWith | None:
    """``replay_with=``: None, or a callable taking the kept arguments by name."""
    if hook is None:
        return None
    if not callable(hook) or inspect.iscoroutinefunction(hook):
        raise ConfigurationError(
            "replay_with: expected a (sync) callable taking the kept arguments by name and "
            f"returning the call's arguments by name, got {hook!r}"
        )
    if signature is None:
        raise ConfigurationError(
            "replay_with: the function's signature cannot be read, so a rebuilt call cannot "
            "be checked against it"
        )
    checked: ReplayWith = hook
    return checked


def _check_retry(retry: Any, classifier: Classifier | None) -> InCallRetry | None:
    """``retry=``: None/False (off), True (the defaults), a number of attempts, or an
    :class:`~idempotask.retry.InCallRetry`."""
    if retry is None or retry is False:
        return None
    if isinstance(retry, InCallRetry):
        return retry
    if retry is True:
        return InCallRetry(classifier=classifier)
    if isinstance(retry, int):
        return InCallRetry(attempts=retry, classifier=classifier)
    raise ConfigurationError(
        f"retry: expected True, a number of attempts or an idempotask.retry.InCallRetry, "
        f"got {retry!r}"
    )


@overload
def dead_letter(func: Callable[P, R], /) -> DeadLetterFunction[P, R]: ...


@overload
def dead_letter(
    *,
    name: str | None = None,
    queue: DeadLetterQueue | None = None,
    redact: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    replay_with: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    classifier: Classifier | None = None,
    policies: Mapping[FailureKind | str, RetryPolicy] | None = None,
    retry: bool | int | InCallRetry | None = None,
    swallow: Literal[False] = False,
    critical: bool = False,
    on_dead_letter: Hook | None = None,
    on_retry_exhausted: Hook | None = None,
    breaker: CircuitBreaker | None = None,
) -> Callable[[Callable[P, R]], DeadLetterFunction[P, R]]: ...


@overload
def dead_letter(
    *,
    name: str | None = None,
    queue: DeadLetterQueue | None = None,
    redact: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    replay_with: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    classifier: Classifier | None = None,
    policies: Mapping[FailureKind | str, RetryPolicy] | None = None,
    retry: bool | int | InCallRetry | None = None,
    swallow: bool,
    critical: bool = False,
    on_dead_letter: Hook | None = None,
    on_retry_exhausted: Hook | None = None,
    breaker: CircuitBreaker | None = None,
) -> _Swallowing: ...


def dead_letter(
    func: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    queue: DeadLetterQueue | None = None,
    redact: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    replay_with: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    classifier: Classifier | None = None,
    policies: Mapping[FailureKind | str, RetryPolicy] | None = None,
    retry: bool | int | InCallRetry | None = None,
    swallow: bool = False,
    critical: bool = False,
    on_dead_letter: Hook | None = None,
    on_retry_exhausted: Hook | None = None,
    breaker: CircuitBreaker | None = None,
) -> Any:
    """Record every failure of a function as a dead letter before it propagates.

    Put it outside ``@idempotent`` (the other order is refused), or on a plain
    function; sync and ``async def`` alike::

        @dead_letter(
            redact=lambda a: {**a, "card": "<redacted>"},  # never store the card
            replay_with=lambda kept: {**kept, "card": cards.token_for(kept["order_id"])},
        )
        @idempotent(ttl=3600)
        def charge(order_id: int, card: str) -> str: ...

    On an exception (``Exception`` subclasses only: cancellation and ``KeyboardInterrupt``
    pass through untouched, as do ``AlreadyInProgress`` and ``KeyMismatchError``), the
    failure is classified and written to the queue's store -- or its spool if the store
    is down -- with the arguments, the idempotency key of the inner ``@idempotent``, the
    traceback and the next retry time from the kind's policy (ABANDONED at once when the
    policy allows no retry, as for PERMANENT). Then the exception is re-raised.

    A replay (:meth:`DeadLetterQueue.process_due`) runs the original call under its
    original idempotency key, or does not run: from the stored arguments when they are
    the call's own, else through ``replay_with``; a rebuilt call must give the letter's
    key. A letter that cannot be rebuilt waits for a person (its history says why).

    Options:

    - ``name``: the replay name letters carry (default: the inner ``@idempotent``'s
      name, else ``module.qualname``). Two functions cannot share one.
    - ``queue``: a :class:`DeadLetterQueue` (default: :func:`default_queue`).
    - ``redact``: receives the bound arguments (name -> value, defaults applied) and
      returns what to keep. **By default every argument is kept** (a
      :class:`KeepsAllArgumentsWarning` says so once, at the first failure; pass
      ``redact=keep_all`` to keep them all on purpose). An argument it changes or drops
      is stored as a :class:`Redacted` placeholder showing what it returned, values the
      JSON serializer cannot hold as :class:`Unserializable`; a ``redact`` that raises
      keeps no arguments. Recording never fails the call path.
    - ``replay_with``: rebuilds the call's arguments for a replay from what was kept --
      ``replay_with(kept)`` gets the kept arguments by name (a redacted one as ``redact``
      returned it, a removed one absent) and returns every argument by name, reloading
      what was not stored (a card token from the order id, say). It runs only for letters
      whose stored arguments are not the call's own; when it raises, the replay counts
      as failed and is retried by the policy. An argument it leaves as ``redact``
      changed it (``"<redacted>"``) is not the call's own: the letter waits for a person.
    - ``classifier`` / ``policies``: override the queue's for this function.
    - ``retry``: short in-call retries of TRANSIENT failures before anything is
      dead-lettered: ``True`` (3 attempts), a number of attempts, or an
      :class:`~idempotask.retry.InCallRetry` (needs tenacity).
    - ``swallow``: return None instead of raising once the failure is recorded.
    - ``critical``: log at CRITICAL and call the alert hooks (``queue.on_alert``,
      ``configure(on_alert=...)``) for each letter.
    - ``on_dead_letter(letter)``: called after each new letter is written;
      ``on_retry_exhausted(letter)``: called when the letter is ABANDONED.
    - ``breaker``: a :class:`idempotask.CircuitBreaker` guarding each attempt. While it
      is open, calls fail fast with :class:`idempotask.CircuitOpenError`, classified
      EXTERNAL; its letter is retried later without using up an attempt.
    """
    options = dict(locals())  # the keyword options, by name
    del options["func"]
    if func is not None:
        return _wrap(func, options)
    return lambda f: _wrap(f, dict(options))


class _Swallowing(Protocol):
    """``@dead_letter(swallow=True)``: a failure returns None instead of raising."""

    @overload
    def __call__(
        self, func: Callable[P, Coroutine[Any, Any, T]], /
    ) -> DeadLetterFunction[P, Coroutine[Any, Any, T | None]]: ...

    @overload
    def __call__(self, func: Callable[P, R], /) -> DeadLetterFunction[P, R | None]: ...
