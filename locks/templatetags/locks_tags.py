from __future__ import annotations

from typing import Any

from django import template

register = template.Library()


@register.filter
def sorted_items(mapping: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """A dict's items by key: JSON columns (jsonb) do not keep the order they were written in."""
    return sorted((mapping or {}).items())
