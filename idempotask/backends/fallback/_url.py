"""The URL form of a fallback store: ``fallback+redis://...?secondary=<encoded URL>``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from urllib.parse import quote, unquote

from idempotask.errors import ConfigurationError

__all__ = ["fallback_url", "seconds", "split_url"]

# The Redis URL schemes a fallback URL may wrap, and the query options that are ours.
_PRIMARY_SCHEMES = ("redis", "rediss", "unix")
_SCHEME_PREFIX = "fallback+"
_URL_OPTIONS = ("secondary", "probe_interval", "confirm_window")


def seconds(option: str, value: object, *, allow_zero: bool = False) -> float:
    """Validate a duration option of the fallback store."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        kind = "non-negative" if allow_zero else "positive"
        raise ConfigurationError(
            f"FallbackBackend: {option} must be a {kind}, finite number of seconds, got {value!r}"
        )
    return float(value)


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """The primary's URL, and our options (``secondary`` decoded) from a fallback URL.

    >>> split_url("fallback+redis://h:6379/0?socket_timeout=1&secondary=sqlite%3A%2F%2F%2Fa.db")
    ('redis://h:6379/0?socket_timeout=1', {'secondary': 'sqlite:///a.db'})
    """
    scheme, sep, rest = url.partition("://") if isinstance(url, str) else ("", "", "")
    primary_scheme = scheme.lower().removeprefix(_SCHEME_PREFIX)
    if not sep or not scheme.lower().startswith(_SCHEME_PREFIX):
        raise ConfigurationError(
            f"fallback URL: expected 'fallback+redis://host:6379/0?secondary=...', got "
            f"{_redacted(url)!r}"
        )
    if primary_scheme not in _PRIMARY_SCHEMES:
        raise ConfigurationError(
            f"fallback URL: the primary must be a Redis URL ({', '.join(_PRIMARY_SCHEMES)}), "
            f"got {scheme!r}; write e.g. 'fallback+redis://host:6379/0?secondary=...'"
        )
    base, _, query = rest.partition("?")
    kept: list[str] = []
    ours: dict[str, str] = {}
    for part in query.split("&") if query else ():
        raw_name, _, raw_value = part.partition("=")
        name = unquote(raw_name)
        if name not in _URL_OPTIONS:
            kept.append(part)  # the Redis URL's own, passed on verbatim
            continue
        if name in ours:
            raise ConfigurationError(f"fallback URL: {name!r} is given twice")
        if name == "secondary" and ("://" in raw_value or "?" in raw_value):
            # Unencoded, its own '&' and '?' would be read as the fallback URL's.
            raise ConfigurationError(
                "fallback URL: the secondary URL must be percent-encoded whole, e.g. "
                "secondary=postgresql%2Bpsycopg%3A%2F%2Fapp%40db%2Fapp (urllib.parse.quote("
                "url, safe='') does it; idempotask.backends.fallback.fallback_url() builds "
                "the whole URL)"
            )
        ours[name] = unquote(raw_value)
    if not ours.get("secondary"):
        raise ConfigurationError(
            "fallback URL: the secondary store is missing; add "
            "?secondary=<percent-encoded URL>, e.g. secondary=sqlite%3A%2F%2F%2Fidem.db"
        )
    if ours["secondary"].lower().startswith(_SCHEME_PREFIX):
        raise ConfigurationError("fallback URL: the secondary cannot be a fallback store itself")
    primary = f"{primary_scheme}://{base}" + ("?" + "&".join(kept) if kept else "")
    return primary, ours


def _redacted(url: object) -> str:
    """A URL for an error message, without anything between ``://`` and ``@``."""
    if not isinstance(url, str):
        return repr(url)
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    return f"{scheme}{sep}{netloc.rpartition('@')[2]}{slash}{path.partition('?')[0]}"


def fallback_url(
    primary: str,
    secondary: str,
    *,
    probe_interval: float | None = None,
    confirm_window: float | None = None,
) -> str:
    """The URL of a :class:`FallbackBackend` on a Redis ``primary`` URL and any
    ``secondary`` URL (encoded here, so its own ``?``, ``&`` and ``%`` survive).

    >>> fallback_url("redis://cache:6379/0", "postgresql+psycopg://app@db/app")
    'fallback+redis://cache:6379/0?secondary=postgresql%2Bpsycopg%3A%2F%2Fapp%40db%2Fapp'
    >>> fallback_url("redis://cache/0?socket_timeout=1", "sqlite:///idem.db", probe_interval=2)
    'fallback+redis://cache/0?socket_timeout=1&secondary=sqlite%3A%2F%2F%2Fidem.db&probe_interval=2'
    """
    scheme = primary.partition("://")[0].lower() if isinstance(primary, str) else ""
    if scheme not in _PRIMARY_SCHEMES:
        raise ConfigurationError(
            f"fallback_url: the primary must be a redis://, rediss:// or unix:// URL, got "
            f"{_redacted(primary)!r}"
        )
    if not isinstance(secondary, str) or "://" not in secondary:
        raise ConfigurationError(
            f"fallback_url: the secondary must be a store URL, got {_redacted(secondary)!r}"
        )
    params: Mapping[str, float | None] = {
        "probe_interval": probe_interval,
        "confirm_window": confirm_window,
    }
    query = [f"secondary={quote(secondary, safe='')}"]
    for name, value in params.items():
        if value is not None:
            seconds(name, value, allow_zero=name == "confirm_window")
            query.append(f"{name}={value:g}")
    separator = "&" if "?" in primary else "?"
    return f"{_SCHEME_PREFIX}{primary}{separator}{'&'.join(query)}"
