"""Pages as text: the Jinja2 environment (autoescaping every template), the filters the
templates use, and how stored text is shown.

Everything a letter holds (messages, tracebacks, arguments, function names) may be
chosen by an attacker, so it is shown in two steps: control characters become visible
escapes (``\\x1b``, ``\\u202e``: an ANSI or OSC sequence, a carriage return or a bidi
override cannot hide or reorder text), then Jinja's autoescaping makes ``<``, ``>``,
``&`` and quotes inert. No template marks stored text ``|safe``.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from idempotask.cli._text import clip, iso, relative, safe, span

__all__ = ["HERE", "environment", "visible"]

HERE = Path(__file__).resolve().parent


def visible(text: object, lines: bool = True) -> str:
    """``text`` with control characters shown as escapes (newlines and tabs kept when
    ``lines``); Jinja escapes the HTML afterwards."""
    return safe(str(text), lines=lines)


def _clip(text: object, limit: int = 120) -> str:
    return clip(str(text), limit)


def _ago(epoch: float | None, now: float) -> str:
    return "-" if epoch is None else relative(epoch, now)


def _utc(epoch: float | None) -> str:
    text = iso(epoch)
    return "-" if text is None else text.replace("T", " ").replace("Z", " UTC")


def _hhmm(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%H:%M")


def _day(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%a %d %b")


def _number(value: int | float) -> str:
    return f"{value:,}"


def _span(seconds: float | None) -> str:
    return "-" if seconds is None else span(seconds)


def environment() -> Environment:
    """The templates of the package, autoescaped, with undefined names an error."""
    env = Environment(
        loader=FileSystemLoader(str(HERE / "templates")),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    filters: dict[str, Any] = {
        "visible": visible,
        "clip": _clip,
        "ago": _ago,
        "utc": _utc,
        "hhmm": _hhmm,
        "day": _day,
        "number": _number,
        "span": _span,
    }
    env.filters.update(filters)
    return env
