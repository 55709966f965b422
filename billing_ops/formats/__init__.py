"""Per-language date and number formats (FORMAT_MODULE_PATH), and ``grouped()``: a count
written in Python text the way the templates' ``intcomma`` writes it in the active
language (1,234 in English, 1 234 in Georgian). Machine-readable output (CSV, JSON,
metrics) does not use it."""

from __future__ import annotations

from django.utils.formats import number_format
from django.utils.translation import ngettext_lazy


def grouped(value: int | float) -> str:
    return number_format(value, force_grouping=True)


# Django's own Georgian catalogue predates its timesince messages ("%d year", not
# "%(num)d year"), so the `timesince` filter would write English durations on Georgian
# pages. Naming the messages here puts them in our catalogue, which Django reads first.
DJANGO_TIMESINCE_MESSAGES = (
    ngettext_lazy("%(num)d year", "%(num)d years", "num"),
    ngettext_lazy("%(num)d month", "%(num)d months", "num"),
    ngettext_lazy("%(num)d week", "%(num)d weeks", "num"),
    ngettext_lazy("%(num)d day", "%(num)d days", "num"),
    ngettext_lazy("%(num)d hour", "%(num)d hours", "num"),
    ngettext_lazy("%(num)d minute", "%(num)d minutes", "num"),
)
