"""A small inline SVG of stuck locks over time: no JavaScript, no chart library.

The picture: the area under the line of stuck locks, the y-axis maximum and zero on the
left, the first and last snapshot times below, and a dot (with a tooltip) on the latest
value. Every text is escaped; the markup around it is built here from numbers only, which
is why the result may be marked safe. Colours are presentation attributes, so a page's CSS
(classes ``stuck-chart-*``) can override them.
"""

from __future__ import annotations

from datetime import datetime

from django.utils import timezone
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe
from django.utils.translation import gettext as _

from billing_ops.formats import grouped

DEFAULT_WIDTH_PX = 600
DEFAULT_HEIGHT_PX = 160
MARGIN_LEFT_PX = 64  # room for the y-axis labels
MARGIN_RIGHT_PX = 10
MARGIN_TOP_PX = 10
MARGIN_BOTTOM_PX = 22  # room for the time labels
FONT_SIZE_PX = 11
DOT_RADIUS_PX = 3.5
TIME_FORMAT = "%Y-%m-%d %H:%M"


def _label_time(value: datetime) -> str:
    return (
        timezone.localtime(value).strftime(TIME_FORMAT)
        if timezone.is_aware(value)
        else value.strftime(TIME_FORMAT)
    )


def _thin(series: list[tuple[datetime, int]], max_points: int) -> list[tuple[datetime, int]]:
    """At most ``max_points`` points (one per pixel is all a line can show), keeping each
    bucket's highest value so that no peak disappears, and always the latest point."""
    if len(series) <= max_points:
        return series
    size = len(series) / max_points
    buckets = [series[int(i * size) : int((i + 1) * size)] for i in range(max_points)]
    thinned = [max(bucket, key=lambda p: p[1]) for bucket in buckets if bucket]
    if thinned[-1] != series[-1]:
        thinned[-1] = series[-1]
    return thinned


def stuck_locks_svg(
    series: list[tuple[datetime, int]], *, width: int = DEFAULT_WIDTH_PX, height: int = DEFAULT_HEIGHT_PX
) -> SafeString:
    """``series`` is ``[(taken_at, stuck_locks), ...]`` oldest first (``stuck_locks_series``)."""
    plot_w = max(width - MARGIN_LEFT_PX - MARGIN_RIGHT_PX, 1)
    plot_h = max(height - MARGIN_TOP_PX - MARGIN_BOTTOM_PX, 1)
    bottom = MARGIN_TOP_PX + plot_h
    text = f'font-size="{FONT_SIZE_PX}" font-family="sans-serif" fill="#555"'
    if not series:
        title = _("Stuck locks over time: no snapshots yet")
        body = (
            f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" {text}>'
            + escape(_("No snapshots yet"))
            + "</text>"
        )
        return _svg(width, height, title, body)

    series = _thin(sorted(series), plot_w)
    first_at, last_at = series[0][0], series[-1][0]
    span_s = (last_at - first_at).total_seconds()
    top_value = max(value for _at, value in series)
    scale_value = top_value or 1  # all zero: a flat line on the axis

    def x(at: datetime) -> float:
        if span_s <= 0:  # a single moment: put it in the middle
            return MARGIN_LEFT_PX + plot_w / 2
        return MARGIN_LEFT_PX + plot_w * (at - first_at).total_seconds() / span_s

    def y(value: int) -> float:
        return bottom - plot_h * value / scale_value

    points = [(x(at), y(value)) for at, value in series]
    line = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
    latest_at, latest = series[-1]
    left, right = MARGIN_LEFT_PX, MARGIN_LEFT_PX + plot_w
    parts = [
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#999"/>',  # x axis
        f'<line x1="{left}" y1="{MARGIN_TOP_PX}" x2="{left}" y2="{bottom}" stroke="#999"/>',  # y axis
        f'<text x="{MARGIN_LEFT_PX - 4}" y="{bottom}" text-anchor="end" {text}>0</text>',
    ]
    if top_value:  # an all-zero series has no maximum worth a second label
        parts.append(
            f'<text x="{MARGIN_LEFT_PX - 4}" y="{MARGIN_TOP_PX + FONT_SIZE_PX}" text-anchor="end" {text}>'
            f"{escape(grouped(top_value))}</text>"
        )
    if len(points) > 1:
        area = f"{points[0][0]:.1f},{bottom} {line} {points[-1][0]:.1f},{bottom}"
        parts += [
            f'<polygon class="stuck-chart-area" points="{area}" fill="#f8d7da" stroke="none"/>',
            f'<polyline class="stuck-chart-line" points="{line}" fill="none" stroke="#c0392b" '
            'stroke-width="1.5" stroke-linejoin="round"/>',
        ]
    time_y = bottom + FONT_SIZE_PX + 6
    if span_s > 0:
        parts += [
            f'<text x="{MARGIN_LEFT_PX}" y="{time_y}" text-anchor="start" {text}>'
            f"{escape(_label_time(first_at))}</text>",
            f'<text x="{MARGIN_LEFT_PX + plot_w}" y="{time_y}" text-anchor="end" {text}>'
            f"{escape(_label_time(last_at))}</text>",
        ]
    else:
        parts.append(
            f'<text x="{points[-1][0]:.1f}" y="{time_y}" text-anchor="middle" {text}>'
            f"{escape(_label_time(last_at))}</text>"
        )
    tooltip = _("%(n)s stuck locks at %(at)s") % {"n": grouped(latest), "at": _label_time(latest_at)}
    parts.append(
        f'<circle class="stuck-chart-latest" cx="{points[-1][0]:.1f}" cy="{points[-1][1]:.1f}" '
        f'r="{DOT_RADIUS_PX}" fill="#c0392b"><title>{escape(tooltip)}</title></circle>'
    )
    title = _("Stuck locks over time: %(n)s now, at most %(top)s") % {
        "n": grouped(latest),
        "top": grouped(top_value),
    }
    return _svg(width, height, title, "".join(parts))


def _svg(width: int, height: int, title: str, body: str) -> SafeString:
    # Everything interpolated into the markup is a number or already escaped.
    return mark_safe(  # noqa: S308
        f'<svg class="stuck-chart" xmlns="http://www.w3.org/2000/svg" width="{int(width)}" '
        f'height="{int(height)}" viewBox="0 0 {int(width)} {int(height)}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>{body}</svg>'
    )
