"""``python -m idempotask demo``: what ``@idempotent`` and ``@dead_letter`` do, in seconds.

On a SQLite file in a temporary directory (the embedded store: no server), it runs

1. a duplicate call, answered from the store without running the body again;
2. two processes calling the same function with the same arguments at the same instant:
   one runs the body, the other waits and gets its result;
3. a process that dies in the middle of a call (``os._exit``, as ``kill -9`` would): the
   next caller waits for its lease to run out, takes the key over and runs the body;
4. a failure recorded as a dead letter, then replayed by the processor once the cause
   is gone, under the call's own key;

and says what happened in plain words. It needs SQLAlchemy (``pip install
'idempotask[sqlite]'``). The functions below are the demo's whole application.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import idempotask
from idempotask import dead_letter, idempotent
from idempotask.deadletter import keep_all

__all__ = ["main"]

LEASE = 1.0  # seconds: short, so that the crash is taken over quickly
RACE_PAUSE = 0.5  # seconds the raced body takes, so that both processes meet inside it


class _Demo:
    """What the demo's functions need to know in whichever process runs them."""

    directory = Path()
    crash = False
    gateway_down = False


def _ran(what: str) -> None:
    """Note that a body ran (and in which process), in a file every process shares."""
    with open(_Demo.directory / "bodies.log", "a", encoding="utf-8") as log:
        log.write(f"{what} {os.getpid()}\n")


def _bodies(what: str) -> list[int]:
    try:
        lines = (_Demo.directory / "bodies.log").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [int(line.rsplit(" ", 1)[1]) for line in lines if line.rsplit(" ", 1)[0] == what]


@idempotent(name="idempotask.demo.charge", ttl=3600)
def charge(order_id: int, amount: str) -> str:
    """Charge an order: the side effect that must happen once."""
    _ran(f"charge {order_id}")
    time.sleep(RACE_PAUSE)
    return f"receipt-{order_id}"


@idempotent(name="idempotask.demo.ship", ttl=3600, lease=LEASE)
def ship(order_id: int) -> str:
    """Ship an order; in the crashing process, die half-way."""
    _ran(f"ship {order_id}")
    if _Demo.crash:
        os._exit(17)  # no cleanup, no release: exactly what kill -9 leaves behind
    return f"parcel-{order_id}"


@dead_letter(name="idempotask.demo.notify", redact=keep_all)  # an order id is no secret
@idempotent(name="idempotask.demo.notify", ttl=3600)
def notify(order_id: int) -> str:
    """Send a mail through a gateway that is down at first."""
    if _Demo.gateway_down:
        raise ConnectionError("mail gateway unreachable")
    _ran(f"notify {order_id}")
    return f"mail sent for order {order_id}"


def _store(directory: Path) -> Any:
    """The SQLite store of the demo's file (records, dead letters, breakers)."""
    from idempotask.backends.sql import SQLAlchemyBackend

    return SQLAlchemyBackend(f"sqlite:///{directory / 'demo.db'}")


def _configure(directory: Path) -> None:
    """Point idempotask at the demo's SQLite file (in this process)."""
    _Demo.directory = directory
    idempotask.configure(
        backend=_store(directory),  # dead letters go beside the records, in the "demo" namespace
        namespace="demo",
        spool_path=str(directory / "spool"),
    )


# -- the processes the demo starts (spawned: each imports this module afresh) ---------------


def _racer(directory: str, start: Any, results: Any) -> None:
    _configure(Path(directory))
    start.wait()
    results.put((os.getpid(), charge(8, "5.00")))


def _crasher(directory: str) -> None:
    _configure(Path(directory))
    _Demo.crash = True
    ship(9)


# -- the four scenes ------------------------------------------------------------------------


class _Out:
    """Prints paragraphs: a heading as it is, a sentence wrapped and indented."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, text: str = "") -> None:
        if text.startswith("   "):
            text = textwrap.fill(
                text.strip(), width=88, initial_indent="   ", subsequent_indent="   "
            )
        print(text, file=self.stream, flush=True)


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _duplicate(out: _Out, context: Any) -> None:
    out("1. A duplicate call")
    first = charge(7, "9.99")
    started = time.perf_counter()
    second = charge(7, "9.99")
    took = (time.perf_counter() - started) * 1000
    out(f"   charge(7, '9.99') ran the body and stored its result {first!r}.")
    out(
        f"   Called again, it returned {second!r} from the store in {took:.1f} ms without "
        f"running the body: the body ran {_times(len(_bodies('charge 7')))}."
    )


def _race(out: _Out, context: Any) -> None:
    out("2. Two processes racing on one key")
    start = context.Barrier(2)
    results = context.Queue()
    racers = [
        context.Process(target=_racer, args=(str(_Demo.directory), start, results))
        for _ in range(2)
    ]
    for racer in racers:
        racer.start()
    got = dict(results.get(timeout=60) for _ in racers)
    for racer in racers:
        racer.join(60)
    ran = _bodies("charge 8")
    pids = sorted(got)
    names = {pid: f"process {'AB'[i]} (pid {pid})" for i, pid in enumerate(pids)}
    runner = names.get(ran[0], f"pid {ran[0]}") if ran else "no process"
    waiter = next((names[pid] for pid in pids if pid not in ran), "neither")
    first, second = names[pids[0]], names[pids[1]]
    out(f"   Two processes, {first} and {second}, called charge(8, '5.00') at once.")
    out(
        f"   {runner[:1].upper()}{runner[1:]} claimed the key and ran the body; {waiter} "
        f"found the claim, waited for the result and returned {got[pids[-1]]!r} too: the "
        f"body ran {_times(len(ran))}."
    )


def _crash(out: _Out, context: Any) -> None:
    out(f"3. A crash, taken over after the lease ({LEASE:g} s here, 60 s by default)")
    crasher = context.Process(target=_crasher, args=(str(_Demo.directory),))
    crasher.start()
    crasher.join(60)
    out(
        f"   Process C (pid {crasher.pid}) claimed ship(9), started the body and died in "
        f"the middle of it (exit code {crasher.exitcode}), leaving its claim behind."
    )
    started = time.monotonic()
    result = ship(9)
    waited = time.monotonic() - started
    out(
        f"   The next ship(9) found the claim in progress and waited {waited:.1f} s: once "
        "the dead process's lease ran out (nobody renewed it), it took the key over, ran "
        f"the body and returned {result!r}. The body ran {_times(len(_bodies('ship 9')))} "
        "in all: once in the crash, once after it."
    )


def _dead_letter(out: _Out, context: Any) -> None:
    out("4. A failure kept as a dead letter, then replayed")
    queue = idempotask.default_queue()
    _Demo.gateway_down = True
    try:
        notify(10)
    except ConnectionError as exc:
        error = f"{type(exc).__name__}: {exc}"
    else:  # pragma: no cover - the gateway is down
        error = "nothing"
    letter = queue.query(function="idempotask.demo.notify", limit=1)[0]
    due = letter.next_retry_at or time.time()
    out(
        f"   notify(10) raised {error}. Before the exception reached the caller, it was "
        f"recorded as dead letter {letter.id[:8]} (kind {letter.kind}, "
        f"retry due in {max(due - time.time(), 0) / 60:.0f} min), with its arguments and key."
    )
    _Demo.gateway_down = False
    report = queue.process_due(now=due + 1)  # as a processor would at that time
    replayed = queue.get(letter.id)
    status = replayed.status.value if replayed is not None else "gone"
    again = notify(10)
    out(
        "   The gateway came back. When the retry was due, the processor (`idempotask dlq "
        f"process`, or queue.process_due()) replayed the call under its own key: "
        f"{len(report.resolved)} letter resolved, its status now {status}."
    )
    out(
        f"   A later notify(10) returned {again!r} from the store: the mail went out "
        f"{_times(len(_bodies('notify 10')))}."
    )


def run(directory: Path, out: _Out) -> None:
    """The four scenes, on a SQLite file in ``directory``."""
    store = _store(directory)
    store.create_tables()  # records, dead letters, breakers
    store.close()
    _configure(directory)
    context = multiprocessing.get_context("spawn")  # fresh processes, as on any OS
    out(f"idempotask demo on a SQLite file: {directory / 'demo.db'}")
    # Recording a dead letter logs a warning; the demo says it in words instead.
    logger = logging.getLogger("idempotask")
    quiet, propagate = logging.NullHandler(), logger.propagate
    logger.addHandler(quiet)  # a handler of its own, so Python's last resort stays silent
    logger.propagate = False
    try:
        for scene in (_duplicate, _race, _crash, _dead_letter):
            out()
            scene(out, context)
    finally:
        logger.removeHandler(quiet)
        logger.propagate = propagate


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="idempotask demo",
        description="Show @idempotent and @dead_letter at work on a SQLite file, in seconds.",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (its path is shown)"
    )
    options = parser.parse_args(list(argv) if argv is not None else None)
    say = _Out(out if out is not None else sys.stdout)
    try:
        import sqlalchemy  # noqa: F401  (the SQLite store's driver layer)
    except ImportError:
        say("the demo runs on SQLite through SQLAlchemy: pip install 'idempotask[sqlite]'")
        return 1
    directory = Path(tempfile.mkdtemp(prefix="idempotask-demo-"))
    started = time.monotonic()
    try:
        run(directory, say)
    finally:
        idempotask.configure(backend="memory://")  # let go of the SQLite file
        if not options.keep:
            shutil.rmtree(directory, ignore_errors=True)
    say()
    kept = f"kept in {directory}" if options.keep else "deleted (--keep keeps it)"
    say(f"Done in {time.monotonic() - started:.1f} s; the SQLite file was {kept}.")
    say("Next: try the README's examples in your code; `python -m benchmarks --only memory")
    say("--only sqlite` measures the embedded stores' latency (about a minute).")
    return 0
