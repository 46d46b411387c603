"""The spool keeps letters private (issue 13 §2): its default directory is created 0700
and refused when someone else could have made it; its files are never reached through a
symbolic link, and never shared with other users."""

from __future__ import annotations

import logging
import os
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from idempotask import DeadLetter, DeadLetterQueue, dead_letter
from idempotask.backends.base import Action
from idempotask.spool import Spool, SpoolError, decode_letter, encode_letter, spool_path

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX owners, modes and symlinks"),
    pytest.mark.filterwarnings("ignore::idempotask.deadletter.KeepsAllArgumentsWarning"),
]

NOBODY = 65534  # a uid that is not this test's (chown needs root: skipped otherwise)


def letter(id: str = "1") -> DeadLetter:
    return DeadLetter(
        id=id,
        function="billing.charge",
        kind="transient",
        error_type="builtins.TimeoutError",
        message="gateway timed out",
        arguments=b'{"card":"4111"}',
    )


@pytest.fixture
def shared_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /tmp, with the cache directory unusable so the spool falls back
    to ``<tmp>/idempotask-<uid>``."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    cache = tmp_path / "cache-is-a-file"
    cache.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("IDEMPOTASK_SPOOL", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    monkeypatch.setattr("idempotask.spool._default_dirs", {})
    return shared


def private_dir(shared: Path) -> Path:
    return shared / f"idempotask-{os.getuid()}"


def test_the_fallback_directory_is_created_private(shared_tmp: Path) -> None:
    path = spool_path(None, "billing")
    directory = private_dir(shared_tmp)
    assert path == str(directory / "spool-billing.jsonl")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    Spool(path).append(letter())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_world_writable_fallback_directory_is_refused(shared_tmp: Path) -> None:
    directory = private_dir(shared_tmp)
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(SpoolError, match=r"can be written by others \(mode 0777\)"):
        spool_path(None, "billing")


def test_a_fallback_directory_owned_by_someone_else_is_refused(shared_tmp: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("making a directory another user owns needs root")
    directory = private_dir(shared_tmp)
    directory.mkdir(mode=0o700)
    os.chown(directory, NOBODY, NOBODY)
    with pytest.raises(SpoolError, match=f"belongs to uid {NOBODY}"):
        spool_path(None, "billing")


def test_a_symlink_in_place_of_the_fallback_directory_is_refused(shared_tmp: Path) -> None:
    elsewhere = shared_tmp / "attacker"
    elsewhere.mkdir(mode=0o700)
    private_dir(shared_tmp).symlink_to(elsewhere)
    with pytest.raises(SpoolError, match="not a directory"):
        spool_path(None, "billing")


def test_a_planted_symlink_is_never_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The letter does not land in the link's target: it goes to the CRITICAL log."""
    target = tmp_path / "target.txt"
    target.write_text("")
    spool_file = tmp_path / "spool.jsonl"
    spool_file.symlink_to(target)
    queue = DeadLetterQueue(_DownStore(), spool=spool_file)

    @dead_letter(queue=queue)
    def charge(order_id: int) -> None:
        raise TimeoutError("gateway timed out")

    with caplog.at_level(logging.CRITICAL, logger="idempotask"), pytest.raises(TimeoutError):
        charge(7)
    assert target.read_text() == ""
    assert any("symbolic link" in r.getMessage() for r in caplog.records)
    with pytest.raises(SpoolError, match="symbolic link"):
        Spool(spool_file).letters()


def test_a_planted_file_others_can_read_is_refused(tmp_path: Path) -> None:
    spool_file = tmp_path / "spool.jsonl"
    spool_file.write_text("")
    spool_file.chmod(0o666)
    with pytest.raises(SpoolError, match=r"can be read or written by others \(mode 0666\)"):
        Spool(spool_file).append(letter())
    assert spool_file.read_text() == ""


def test_a_planted_lock_file_link_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    spool_file = tmp_path / "spool.jsonl"
    Path(str(spool_file) + ".lock").symlink_to(target)
    with pytest.raises(SpoolError, match="symbolic link"):
        Spool(spool_file).append(letter())


def test_a_planted_batch_is_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "spool.jsonl")
    spool.append(letter("mine"))
    planted = tmp_path / "spool.jsonl.123-abcd.batch"
    planted.write_bytes(encode_letter(letter("planted")) + b"\n")
    planted.chmod(0o666)
    delivered = []
    with caplog.at_level(logging.ERROR, logger="idempotask"):
        for batch in spool.take():
            with batch:
                for x in batch:
                    delivered.append(x.id)
                    batch.done(x)
    assert delivered == ["mine"]
    assert any("left alone" in r.getMessage() for r in caplog.records)


def test_a_spool_line_keeps_the_letters_history() -> None:
    history = (Action(1.5, "failed", "worker", "transient", "TimeoutError: x"),)
    original = letter().evolve(history=history)
    assert decode_letter(encode_letter(original)) == original


def test_a_line_whose_arguments_are_not_text_is_unreadable_not_an_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.jsonl")
    spool.append(letter("good"))
    spool.append_line(b'{"spool": 1, "id": "bad", "arguments": 5}')
    with pytest.raises(ValueError, match="arguments is not text"):
        decode_letter(b'{"spool": 1, "id": "bad", "arguments": 5}')
    assert [x.id for x in spool.letters()] == ["good"]  # a look at the spool, not a crash
    for batch in spool.take():
        with batch:
            for x in batch:
                batch.done(x)
    assert (tmp_path / "spool.jsonl.rejected").read_bytes() == (
        b'{"spool": 1, "id": "bad", "arguments": 5}\n'
    )


def test_a_delivery_stopped_in_a_later_batch_counts_what_stays_in_that_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from idempotask import BackendError
    from idempotask.backends.memory import MemoryBackend

    spool = Spool(tmp_path / "spool.jsonl")
    for n in range(3):
        spool.append(letter(f"new-{n}"))
    left = tmp_path / "spool.jsonl.999-crashed.batch"  # a crashed deliverer's batch
    left.write_bytes(b"".join(encode_letter(letter(f"old-{n}")) + b"\n" for n in range(2)))
    left.chmod(0o600)
    store = MemoryBackend().dead_letter_store()
    added = store.add

    def add(x: DeadLetter) -> DeadLetter:
        if x.id.startswith("old-"):
            raise BackendError("down again")
        return added(x)

    store.add = add  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="idempotask"):
        assert DeadLetterQueue(store, spool=spool).flush_spool() == 3
    assert "; 2 letter(s) stay in the spool" in caplog.text  # not "-1"
    assert sorted(x.id for x in spool.letters()) == ["old-0", "old-1"]


class _DownStore:
    """A dead-letter store that is down for every operation."""

    def __getattr__(self, name: str) -> object:
        from idempotask import BackendError

        def fail(*args: object, **kwargs: object) -> object:
            raise BackendError("store down")

        return fail


def _deliver_all(spool: Spool) -> list[str]:
    from idempotask.backends.memory import MemoryBackend

    store = MemoryBackend().dead_letter_store()
    DeadLetterQueue(store, spool=spool).flush_spool()
    return sorted(x.id for x in store.query())


def test_a_letter_appended_after_a_torn_last_line_is_still_delivered(tmp_path: Path) -> None:
    """A spool whose last line was cut short (a crash, a copy, a disk that filled up): the
    next letter must start on a line of its own, not be glued to the torn one and
    rejected with it."""
    spool = Spool(tmp_path / "spool.jsonl")
    spool.append(letter("before"))
    whole = encode_letter(letter("torn"))
    with open(spool.path, "ab") as file:
        file.write(whole[: len(whole) // 2])  # no newline: cut mid-line
    spool.append(letter("after"))
    assert _deliver_all(spool) == ["after", "before"]
    assert (tmp_path / "spool.jsonl.rejected").read_bytes() == whole[: len(whole) // 2] + b"\n"


_DISK_FULL = """
import resource, signal, sys
from idempotask import DeadLetter
from idempotask.spool import Spool
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
def letter(id):
    return DeadLetter(id=id, function="f", kind="transient", error_type="E", message="m" * 300)
spool = Spool(sys.argv[1])
spool.append(letter("first"))
# The disk fills up: the next append is cut short, and so is its closing newline.
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
import os
resource.setrlimit(resource.RLIMIT_FSIZE, (os.stat(sys.argv[1]).st_size + 100, hard))
try:
    spool.append(letter("cut"))
except OSError as exc:
    print("refused:", exc)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
spool.append(letter("later"))
"""


def test_a_letter_spooled_after_the_disk_filled_up_is_still_delivered(tmp_path: Path) -> None:
    """A real short write (the file size limit of a child process stands in for a full
    disk, so the newline meant to end the torn line fails too): the letter spooled once
    there is room again is delivered, and only the torn one is rejected."""
    import subprocess

    path = tmp_path / "spool.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", _DISK_FULL, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert done.returncode == 0, done.stderr
    assert "refused: short write" in done.stdout
    assert _deliver_all(Spool(path)) == ["first", "later"]


def test_a_letter_the_store_refuses_does_not_hold_back_the_letters_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One spooled letter a real store refuses (here a line put back by hand with a bad
    value, as SpoolError's docstring invites) must not keep every letter behind it out
    of the store forever: they are delivered, and the refused one stays spooled."""
    import json

    from idempotask.backends.sql import SQLAlchemyBackend

    backend = SQLAlchemyBackend(f"sqlite:///{tmp_path / 'letters.db'}")
    backend.create_tables()
    store = backend.dead_letter_store()
    spool = Spool(tmp_path / "spool.jsonl")
    refused = json.loads(encode_letter(letter("refused")))
    refused["attempts"] = "3"
    spool.append_line(json.dumps(refused).encode())
    spool.append(letter("good"))
    queue = DeadLetterQueue(store, spool=spool)
    with caplog.at_level(logging.ERROR, logger="idempotask"):
        assert queue.flush_spool() == 1
        assert queue.flush_spool() == 0  # the refused one is tried again, still refused
    assert [x.id for x in store.query()] == ["good"]
    assert [x.id for x in spool.letters()] == ["refused"]
    assert "attempts must be an int" in caplog.text
    backend.close()


def test_a_line_whose_id_is_not_text_is_rejected_and_the_spool_drains(tmp_path: Path) -> None:
    """The spool keys delivered letters by id: a line whose id is a list must be an
    unreadable line (rejected), not a letter that makes every delivery raise and leaves
    its batch behind for ever."""
    import json

    spool = Spool(tmp_path / "spool.jsonl")
    bad = json.loads(encode_letter(letter("bad")))
    bad["id"] = ["bad"]
    spool.append_line(json.dumps(bad).encode())
    spool.append(letter("good"))
    assert _deliver_all(spool) == ["good"]
    assert not spool.pending()
    assert (tmp_path / "spool.jsonl.rejected").read_bytes() == json.dumps(bad).encode() + b"\n"
