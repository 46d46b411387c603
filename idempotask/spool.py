"""The local spool: where a dead letter waits when its store cannot take it.

A failure must never be lost because the dead-letter store is down at that moment. The
queue then appends the letter to a spool file and delivers it once the store answers
again (on the next letter it records successfully, on
:meth:`~idempotask.deadletter.DeadLetterQueue.flush_spool`, and before each
:meth:`~idempotask.deadletter.DeadLetterQueue.process_due`).

The file is JSON lines, one letter per line (:func:`encode_letter`), and any number of
threads and processes may append to it and deliver from it:

- **append**: one ``os.write`` of the whole line on an ``O_APPEND`` descriptor, then
  ``fsync``, under an exclusive lock on ``<spool>.lock``: a mutex between threads and a
  POSIX record lock (``lockf``) between processes, which a forked child does not inherit
  (Windows: the mutex only). A short write (disk full) is terminated with a newline, and
  a file whose last line is torn all the same (the disk refused that newline too, a
  crash) gets one before the next line, so a torn line never corrupts the next.
- **deliver**: under the same lock the spool is renamed to a *batch* file
  ``<spool>.<pid>-<random>.batch``, which the deliverer holds with a non-blocking
  ``flock`` of its own; appenders meanwhile start a fresh spool and never wait for the
  store. Delivered letters are dropped, undelivered lines are appended back to the spool,
  and only then is the batch removed. A deliverer that crashed leaves an unlocked batch,
  which the next delivery takes over. A line may therefore be delivered twice, which is
  harmless: adding an id that exists is a no-op in every store.
- **unreadable lines** (a crash mid-write) are moved to ``<spool>.rejected`` and logged,
  never silently dropped.
- **privacy**: letters hold what ``redact=`` kept of personal data. Every spool file is
  created 0600 and opened without following a symbolic link (``O_NOFOLLOW``); a file
  that is a link, belongs to another user or that others may read or write is refused
  (:class:`SpoolError`, and the letter goes to the CRITICAL log record instead).

Where: ``configure(spool_path=...)``, else ``$IDEMPOTASK_SPOOL`` (a file, or a directory
to hold ``spool-<namespace>.jsonl``), else ``$XDG_CACHE_HOME/idempotask`` or
``~/.cache/idempotask``, else ``<tempdir>/idempotask-<uid>``; see :func:`spool_path`. The
two default directories are created 0700 and refused when they are a symbolic link,
belong to another user or others may write to them (:func:`private_directory`): in a
shared temporary directory, someone else could have made ``idempotask-<uid>`` first.

One spool file per namespace: several processes may share it on POSIX (record locks and
``flock``); on Windows, where neither exists, a spool file serves one process at a time.

>>> import tempfile, os
>>> spool = Spool(os.path.join(tempfile.mkdtemp(), "spool.jsonl"))
>>> spool.pending()
False
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import json
import logging
import os
import stat
import sys
import tempfile
import threading
import uuid
from collections.abc import Generator, Iterator
from typing import Any

from idempotask.backends.base import DeadLetter, Status, decode_history, encode_history
from idempotask.errors import CorruptRecordError, IdempotaskError

if sys.platform != "win32":  # POSIX: locks that hold across processes
    import fcntl

__all__ = [
    "ENV_SPOOL",
    "Spool",
    "SpoolBatch",
    "SpoolError",
    "decode_letter",
    "encode_letter",
    "private_directory",
    "spool_path",
]

log = logging.getLogger("idempotask")

ENV_SPOOL = "IDEMPOTASK_SPOOL"
_FORMAT = 1
_BATCH_SUFFIX = ".batch"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # POSIX; Windows has no such flag
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Appenders and deliverers of this process exclude each other with it (and, on POSIX,
# other processes with a record lock on the lock file).
_process_lock = threading.Lock()


def _fresh_lock_in_child() -> None:
    # A thread of the parent may have held it at fork(); the child has no such thread.
    global _process_lock
    _process_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_lock_in_child)


class SpoolError(IdempotaskError):
    """A letter could not be written to the spool either (the store was down too).

    The letter is in the CRITICAL log record that accompanies this error, as a JSON line
    that :meth:`Spool.append_line` or a text editor can put back into a spool file.
    """


# -- the line format ---------------------------------------------------------------------


def encode_letter(letter: DeadLetter) -> bytes:
    """One spool line (without the newline): the letter as JSON, arguments in base64.

    >>> line = encode_letter(DeadLetter(id="1", function="f", kind="transient",
    ...                                 error_type="E", message="m", arguments=b"\\x00"))
    >>> decode_letter(line).arguments
    b'\\x00'
    """
    fields: dict[str, Any] = {f.name: getattr(letter, f.name) for f in dataclasses.fields(letter)}
    fields["arguments"] = base64.b64encode(letter.arguments).decode("ascii")
    fields["status"] = Status(letter.status).value
    fields["history"] = encode_history(letter.history)
    # ensure_ascii keeps lone surrogates in messages writable; the line is pure ASCII.
    return json.dumps({"spool": _FORMAT, **fields}, ensure_ascii=True).encode("ascii")


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(DeadLetter))


def decode_letter(line: bytes) -> DeadLetter:
    """The letter of one spool line; ValueError when the line is not one of ours."""
    data = json.loads(line)
    if not isinstance(data, dict) or data.get("spool") != _FORMAT:
        raise ValueError("not a spool line of format 1")
    fields = {k: v for k, v in data.items() if k in _FIELD_NAMES}
    if not isinstance(fields.get("id"), str):  # delivery keys letters by id
        raise ValueError("spool line: id is not text")
    arguments = fields.get("arguments", "")
    if not isinstance(arguments, str):
        raise ValueError("spool line: arguments is not text")
    fields["arguments"] = base64.b64decode(arguments, validate=True)
    fields["status"] = Status(fields.get("status", Status.PENDING.value))
    history = fields.get("history") or ""
    if not isinstance(history, str):
        raise ValueError("spool line: history is not text")
    try:
        fields["history"] = decode_history(history, "spool line")
    except CorruptRecordError as exc:
        raise ValueError(str(exc)) from None
    try:
        return DeadLetter(**fields)
    except TypeError as exc:
        raise ValueError(f"spool line misses fields: {exc}") from None


# -- locking ---------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on ``<spool>.lock``, between the threads of this process (a
    mutex) and between processes (a POSIX record lock).

    Record locks (``lockf``) rather than ``flock``: an ``flock`` belongs to an open file
    description, which a child forked while a thread holds the lock would inherit and
    keep alive, so the lock would never be released. Record locks belong to a process
    and are not inherited.
    """
    with _process_lock:
        if sys.platform == "win32":  # pragma: no cover
            yield
            return
        fd = _open(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the record lock


def _try_lock(fd: int) -> bool:
    """Take a batch for this deliverer: an ``flock``, which excludes other threads too."""
    if sys.platform == "win32":  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _open(path: str, flags: int) -> int:
    """Open a spool file as the module docstring's "privacy" says (created 0600, never
    through a link, refused unless private); a :class:`SpoolError` says why."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | _CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SpoolError(
                f"{path} is a symbolic link, and the spool never follows one: remove it"
            ) from None
        raise
    try:
        info = os.fstat(fd)
        problem = _foreign(info, regular=True)
        if problem:
            raise SpoolError(f"refusing the spool file {path}: it {problem}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _foreign(info: os.stat_result, *, regular: bool) -> str:
    """Why a spool file or directory is not private to this user ("" when it is)."""
    if regular and not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if not regular and not stat.S_ISDIR(info.st_mode):
        return "is not a directory (a symbolic link?)"
    if sys.platform == "win32":  # pragma: no cover - no POSIX owners and modes there
        return ""
    uid = os.getuid()
    if info.st_uid != uid:
        return f"belongs to uid {info.st_uid}, not to this user (uid {uid})"
    loose = info.st_mode & (0o077 if regular else 0o022)
    if loose:
        what = "read or written" if regular else "written"
        return f"can be {what} by others (mode {stat.S_IMODE(info.st_mode):04o})"
    return ""


def _append(path: str, data: bytes) -> None:
    """Append ``data`` (whole lines) in one write, durably."""
    fd = _open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.lseek(fd, size - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":
                # A torn last line (a crash, or a full disk that refused its newline
                # too): end it first, or these letters would be glued to it and rejected.
                data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):
            # End the torn line so the next append starts clean; the reader rejects it.
            with contextlib.suppress(OSError):
                os.write(fd, b"\n")
            raise OSError(f"short write to the spool {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


# -- the spool ---------------------------------------------------------------------------


class Spool:
    """A spool file of dead letters; see the module docstring for the protocol.

    >>> import tempfile, os
    >>> spool = Spool(os.path.join(tempfile.mkdtemp(), "spool.jsonl"))
    >>> spool.append(DeadLetter(id="1", function="f", kind="transient", error_type="E",
    ...                         message="m"))
    >>> [x.id for x in spool.letters()]
    ['1']
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self._lock_path = self.path + ".lock"

    def __repr__(self) -> str:
        return f"Spool({self.path!r})"

    def _ensure_dir(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)

    def append(self, letter: DeadLetter) -> None:
        """Write ``letter`` durably; raises OSError when the file cannot be written."""
        self.append_line(encode_letter(letter))

    def append_line(self, line: bytes) -> None:
        """Write one encoded letter (see :func:`encode_letter`) durably."""
        self._ensure_dir()
        with _locked(self._lock_path):
            _append(self.path, line.rstrip(b"\n") + b"\n")

    def _batch_paths(self) -> list[str]:
        directory, base = os.path.split(self.path)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        return sorted(
            os.path.join(directory, name)
            for name in names
            if name.startswith(base + ".") and name.endswith(_BATCH_SUFFIX)
        )

    def pending(self) -> bool:
        """Whether letters wait in the spool (cheap: a stat and a directory listing)."""
        try:
            if os.stat(self.path).st_size > 0:
                return True
        except FileNotFoundError:
            pass
        return bool(self._batch_paths())

    def letters(self) -> list[DeadLetter]:
        """Every readable letter waiting, in the spool and in batches (a read-only look)."""
        found: list[DeadLetter] = []
        for path in [self.path, *self._batch_paths()]:
            try:
                fd = _open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                data = _read_all(fd)
            finally:
                os.close(fd)
            for raw in data.splitlines():
                with contextlib.suppress(ValueError):
                    found.append(decode_letter(raw))
        return found

    def take(self) -> Generator[SpoolBatch, None, None]:
        """Batches to deliver, each locked for this caller; use each as a context manager.

        >>> for batch in spool.take():  # doctest: +SKIP
        ...     with batch:
        ...         for letter in batch:
        ...             store.add(letter)
        ...             batch.done(letter)

        Letters not marked done go back to the spool when the batch is closed.
        """
        mine: str | None = None
        if self.pending():
            self._ensure_dir()
            first: SpoolBatch | None = None
            with _locked(self._lock_path):
                try:
                    size = os.stat(self.path).st_size
                except FileNotFoundError:
                    size = 0
                if size > 0:
                    mine = f"{self.path}.{os.getpid()}-{uuid.uuid4().hex[:8]}{_BATCH_SUFFIX}"
                    os.rename(self.path, mine)
                    # Locked before the spool lock is released, so appenders start a new
                    # spool and other deliverers see this batch as taken.
                    first = self._open_batch(mine)
            if first is not None:
                yield first
        for path in self._batch_paths():
            if path == mine:
                continue
            batch = self._open_batch(path)
            if batch is not None:
                yield batch

    def _open_batch(self, path: str) -> SpoolBatch | None:
        try:
            fd = _open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        except SpoolError as exc:
            # Not a file this user wrote (planted beside the spool): never read it.
            log.error("idempotask: dead-letter spool batch left alone: %s", exc)
            return None
        try:
            # Held by a live deliverer, or already finished and unlinked: not ours.
            if not _try_lock(fd) or os.fstat(fd).st_nlink == 0:
                os.close(fd)
                return None
            data = _read_all(fd)
        except BaseException:
            os.close(fd)
            raise
        return SpoolBatch(self, path, fd, data)


class SpoolBatch:
    """Letters taken from the spool by one deliverer, locked until it is closed.

    Iterate it for the letters; call :meth:`done` for each delivered one. Closing it (the
    ``with`` block ending, even by an exception) appends the others back to the spool and
    removes the batch file.
    """

    def __init__(self, spool: Spool, path: str, fd: int, data: bytes) -> None:
        self.spool = spool
        self.path = path
        self._fd = fd
        self._lines: list[tuple[bytes, DeadLetter]] = []
        bad: list[bytes] = []
        for raw in data.splitlines():
            if not raw.strip():
                continue
            try:
                self._lines.append((raw, decode_letter(raw)))
            except (ValueError, TypeError):
                bad.append(raw)
        self._bad = bad
        self._done: set[str] = set()

    def __iter__(self) -> Iterator[DeadLetter]:
        return iter([letter for _, letter in self._lines])

    def __len__(self) -> int:
        return len(self._lines)

    def done(self, letter: DeadLetter) -> None:
        """``letter`` reached the store: it leaves the spool when the batch closes."""
        self._done.add(letter.id)

    def __enter__(self) -> SpoolBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Put undelivered letters back, then remove the batch (kept if that fails)."""
        if self._fd < 0:
            return
        try:
            if self._bad:
                rejected = self.spool.path + ".rejected"
                _append(rejected, b"".join(line + b"\n" for line in self._bad))
                log.error(
                    "idempotask: %d unreadable line(s) in the dead-letter spool %s moved to %s",
                    len(self._bad),
                    self.spool.path,
                    rejected,
                )
                self._bad = []
            rest = [raw for raw, letter in self._lines if letter.id not in self._done]
            if rest:
                self.spool.append_line(b"\n".join(rest))
            os.unlink(self.path)
        finally:
            os.close(self._fd)
            self._fd = -1


# -- where the spool lives ---------------------------------------------------------------

_default_dirs: dict[str, str] = {}


def private_directory(path: str) -> str:
    """Why ``path`` cannot hold this user's spool ("" when it can): created 0700 when
    missing; refused when it is a symbolic link, belongs to another user or others may
    write to it (a shared temporary directory is where someone else could have made it
    first)."""
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot be created ({exc.strerror or exc})"
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    problem = _foreign(info, regular=False)
    if problem:
        return problem
    if not os.access(path, os.W_OK | os.X_OK):
        return "is not writable by this user"
    return ""


def _default_directory() -> str:
    """A per-user directory: the cache directory, else a private one under the tempdir."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = f"{cache}\0{tempfile.gettempdir()}"
    if key in _default_dirs:
        return _default_dirs[key]
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    refused = []
    for candidate in (
        os.path.join(cache, "idempotask"),
        os.path.join(tempfile.gettempdir(), f"idempotask-{uid}"),
    ):
        problem = private_directory(candidate)
        if not problem:
            _default_dirs[key] = candidate
            return candidate
        refused.append(f"{candidate} {problem}")
    raise SpoolError(
        "no private directory for the dead-letter spool: "
        + "; ".join(refused)
        + f". Set ${ENV_SPOOL} or configure(spool_path=...) to a directory of your own"
    )


def spool_path(configured: str | os.PathLike[str] | None, namespace: str) -> str:
    """The spool file to use: ``configured``, else ``$IDEMPOTASK_SPOOL``, else a default.

    A directory (configured or from the environment) holds ``spool-<namespace>.jsonl``.

    >>> spool_path("/var/spool/app/dead-letters.jsonl", "billing")
    '/var/spool/app/dead-letters.jsonl'
    """
    chosen = os.fspath(configured) if configured is not None else os.environ.get(ENV_SPOOL)
    file_name = f"spool-{namespace}.jsonl"
    if not chosen:
        return os.path.join(_default_directory(), file_name)
    chosen = os.path.expanduser(chosen)
    if os.path.isdir(chosen) or chosen.endswith(os.sep):
        return os.path.join(chosen, file_name)
    return chosen
