"""Text in and out of the command line: durations and times to parse, tables, times and
values to print. Pure functions, no I/O."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_NUMBER = r"\d+(?:\.\d+)?"
_PLAIN = re.compile(_NUMBER)
_COMPOUND = re.compile(rf"(?:{_NUMBER}[smhdw])+")
_PART = re.compile(rf"({_NUMBER})([smhdw])")

DURATION_HELP = "90s, 15m, 24h, 30d, 2w, 1h30m or plain seconds"
TIME_HELP = "an ISO 8601 time (UTC unless it names an offset) or a duration ago (24h)"


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90s``, ``15m``, ``24h``, ``30d``, ``2w``, ``1h30m`` or plain
    seconds (``300``, ``2.5``). Raises ValueError otherwise.

    >>> parse_duration("1h30m"), parse_duration("90"), parse_duration("30d")
    (5400.0, 90.0, 2592000.0)
    """
    s = text.strip().lower()
    if _PLAIN.fullmatch(s):
        return float(s)
    if _COMPOUND.fullmatch(s):
        return sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(s))
    raise ValueError(f"invalid duration {text!r}: use {DURATION_HELP}")


def parse_time(text: str, now: float | None = None) -> float:
    """Epoch seconds for an ISO 8601 time (naive means UTC; ``Z`` accepted), ``now``,
    or a duration ago (``24h`` is 24 hours before ``now``). Raises ValueError otherwise.

    >>> parse_time("2026-01-02T03:04:05Z")
    1767323045.0
    >>> parse_time("1h", now=7200.0)
    3600.0
    """
    s = text.strip()
    current = time.time() if now is None else now
    if s.lower() == "now":
        return current
    try:
        return current - parse_duration(s)
    except ValueError:
        pass
    iso = s[:-1] + "+00:00" if s[-1:] in ("Z", "z") else s
    try:
        moment = _dt.datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(f"invalid time {text!r}: use {TIME_HELP}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.timestamp()


def _argument_type(
    parse: Callable[[str], float], name: str, *, positive: bool = False
) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(f"invalid {name} {text!r}: must be more than 0")
        return value

    convert.__name__ = name  # argparse names the type in some messages
    return convert


duration_arg = _argument_type(parse_duration, "duration")
positive_duration_arg = _argument_type(parse_duration, "duration", positive=True)
time_arg = _argument_type(parse_time, "time")


def _whole_number_type(minimum: int, name: str) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}: expected a whole number")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}: must be {minimum} or more")
        return value

    convert.__name__ = name
    return convert


positive_int_arg = _whole_number_type(1, "positive_int_arg")
non_negative_int_arg = _whole_number_type(0, "non_negative_int_arg")


def positive_float_arg(text: str) -> float:
    """A finite float > 0, for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: must be more than 0")
    return value


# -- out ----------------------------------------------------------------------------------

# What must never reach a terminal raw: C0 controls but tab and newline (ESC starts the
# sequences that move the cursor, recolour, retitle or query the terminal; CR overwrites
# a line), DEL, C1 controls (0x9b is a one-byte CSI, 0x9d an OSC), and the invisible
# characters that reorder or hide text (bidirectional overrides, line separators).
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_UNSAFE_LINE = re.compile(_UNSAFE.pattern[:-1] + "\n\t]")
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t", "\x1b": "\\x1b"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def safe(text: str, *, lines: bool = True) -> str:
    """``text`` with every control character an attacker could use on a terminal shown
    as an escape (``\\x1b``, ``\\r``, ``\\u202e``): a stored message or traceback
    cannot move the cursor, rewrite what is shown, retitle the terminal or hide text.
    Newlines and tabs stay unless ``lines`` is False.

    >>> safe("boom\\x1b]0;pwned\\x07\\r\\nnext")
    'boom\\\\x1b]0;pwned\\\\x07\\\\r\\nnext'
    """
    return (_UNSAFE if lines else _UNSAFE_LINE).sub(_escape, text)


def iso(epoch: float | None, *, precise: bool = False) -> str | None:
    """``2026-01-02T03:04:05Z`` (milliseconds when ``precise``), or None.

    >>> iso(1767323045.25), iso(1767323045.25, precise=True)
    ('2026-01-02T03:04:05Z', '2026-01-02T03:04:05.250Z')
    """
    if epoch is None:
        return None
    try:
        moment = _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc)
    except (OverflowError, OSError, ValueError):  # no calendar's: a letter written by hand
        return repr(epoch)
    text = moment.isoformat(timespec="milliseconds" if precise else "seconds")
    return text.replace("+00:00", "Z")


def span(seconds: float) -> str:
    """A short human length of time: ``45s``, ``12m``, ``3h 5m``, ``2d 4h``.

    >>> span(45), span(720), span(11100), span(187200)
    ('45s', '12m', '3h 5m', '2d 4h')
    """
    s = round(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h {m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d {h}h" if h else f"{d}d"


def relative(epoch: float, now: float) -> str:
    """``3m ago``, ``in 2h 5m`` or ``now``.

    >>> relative(100.0, 280.0), relative(400.0, 280.0), relative(280.2, 280.0)
    ('3m ago', 'in 2m', 'now')
    """
    delta = epoch - now
    if not math.isfinite(delta):  # not a time: a letter written by hand
        return repr(epoch)
    if abs(delta) < 1:
        return "now"
    return f"in {span(delta)}" if delta > 0 else f"{span(delta)} ago"


def when(epoch: float | None, now: float, *, none: str = "-") -> str:
    """Relative and ISO: ``3m ago (2026-01-02T03:04:05Z)``."""
    if epoch is None:
        return none
    return f"{relative(epoch, now)} ({iso(epoch)})"


def clip(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters, control characters escaped.

    >>> clip("gateway\\ntimed out after a long wait", 20)
    'gateway timed out...'
    """
    line = safe(" ".join(text.split()), lines=False)
    return line if len(line) <= limit else line[: max(limit - 3, 0)].rstrip() + "..."


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: str = "") -> str:
    """An aligned plain-text table; columns whose index is in ``right`` are right-aligned
    (pass e.g. ``"34"``). No trailing spaces.

    >>> print(table(["NAME", "N"], [["a", 1], ["bbb", 22]], right="1"))
    NAME   N
    a      1
    bbb   22
    """
    cells = [[str(h) for h in headers], *([safe(str(c), lines=False) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(widths[i]) if str(i) in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def fields(pairs: Iterable[tuple[str, object]]) -> str:
    """``label:  value`` lines with the values aligned; multi-line values are indented."""
    pairs = list(pairs)
    width = max((len(label) for label, _ in pairs), default=0) + 2
    lines = []
    for label, value in pairs:
        first, *rest = safe(str(value)).split("\n") or [""]
        lines.append(f"{label + ':':<{width}}{first}".rstrip())
        lines.extend((" " * width + line).rstrip() for line in rest)
    return "\n".join(lines)


def indent(text: str, prefix: str = "  ") -> str:
    """Every line of ``text`` prefixed (blank lines stay blank), control characters
    escaped."""
    return "\n".join((prefix + line).rstrip() for line in safe(text).split("\n"))


def to_json(value: Any, *, lines: bool = False) -> str:
    """JSON with sorted keys: indented, or one line for JSON Lines output. Pure ASCII,
    every control character escaped the JSON way (DEL too, which ``json`` leaves raw), so
    the exact values reach a program and nothing reaches a terminal raw."""
    if lines:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    else:
        text = json.dumps(value, sort_keys=True, indent=2)
    return text.replace("\x7f", "\\u007f")


def plural(n: int, word: str) -> str:
    """``1 dead letter``, ``2 dead letters``.

    >>> plural(1, "dead letter"), plural(2, "dead letter")
    ('1 dead letter', '2 dead letters')
    """
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
