"""Text from outside the program made safe to show in a log line or a terminal."""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: str) -> str:
    r"""``text`` with every character that is not printable escaped (ESC, OSC, CR, line
    breaks, bidi overrides...), as Python escapes them in a string literal (``repr``
    does the same, so values shown with ``!r`` need no more).

    >>> printable("ok\x1b]0;owned\x07\r")
    'ok\\x1b]0;owned\\x07\\r'
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
