"""Charts as inline SVG, drawn on the server: the geometry of stacked bars, computed
here and written out by a template (``_chart.html``) with numbers and escaped labels
only, so a chart needs no script, no stylesheet from elsewhere and no library."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["KIND_ORDER", "Bar", "Chart", "Segment", "bar_chart"]

# Failure kinds bottom to top, each a CSS class of its own (colours in dashboard.css).
KIND_ORDER = ("transient", "external", "configuration", "permanent")


@dataclass(frozen=True)
class Segment:
    """One kind's part of a bar."""

    kind: str
    y: float
    height: float
    count: int


@dataclass(frozen=True)
class Bar:
    """One bucket: where it is drawn, its parts, its label and its tooltip."""

    x: float
    width: float
    total: int
    label: str
    title: str
    segments: tuple[Segment, ...]
    show_label: bool


@dataclass(frozen=True)
class Chart:
    """A stacked bar chart ``width`` x ``height`` (SVG user units), with gridlines."""

    width: int
    height: int
    top: float
    bottom: float
    left: float
    bars: tuple[Bar, ...]
    ticks: tuple[tuple[float, int], ...]
    peak: int
    caption: str


def _nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50... that is at least ``value``."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def bar_chart(
    buckets: Sequence[tuple[str, str, Mapping[str, int]]],
    *,
    caption: str,
    width: int = 720,
    height: int = 200,
    label_every: int = 1,
) -> Chart:
    """A chart of ``buckets``: (label, tooltip prefix, count per kind) each, oldest first.

    >>> chart = bar_chart([("10:00", "10:00", {"transient": 3}), ("11:00", "11:00", {})],
    ...                   caption="letters per hour")
    >>> chart.peak, [bar.total for bar in chart.bars]
    (5, [3, 0])
    """
    left, top, bottom = 40.0, 10.0, 24.0
    plot_height = height - top - bottom
    totals = [sum(counts.values()) for _, _, counts in buckets]
    peak = _nice_ceiling(max([*totals, 1]))
    slot = (width - left - 14) / max(len(buckets), 1)  # room for the last label
    bars = []
    for i, (label, title, counts) in enumerate(buckets):
        y = top + plot_height
        segments = []
        kinds = [k for k in KIND_ORDER if counts.get(k)]
        kinds += sorted(k for k in counts if k not in KIND_ORDER and counts[k])
        for kind in kinds:
            h = plot_height * counts[kind] / peak
            y -= h
            segments.append(Segment(kind, round(y, 2), round(h, 2), counts[kind]))
        parts = ", ".join(f"{counts[k]:,} {k}" for k in kinds)
        total = totals[i]
        tooltip = f"{title}: {total:,} letter{'s' if total != 1 else ''}"
        bars.append(
            Bar(
                x=round(left + i * slot + slot * 0.1, 2),
                width=round(slot * 0.8, 2),
                total=total,
                label=label,
                title=f"{tooltip} ({parts})" if parts else tooltip,
                segments=tuple(segments),
                show_label=(len(buckets) - 1 - i) % label_every == 0,
            )
        )
    ticks = tuple(
        (round(top + plot_height * (1 - fraction), 2), round(peak * fraction))
        for fraction in (0.0, 0.5, 1.0)
    )
    return Chart(width, height, top, bottom, left, tuple(bars), ticks, peak, caption)
