"""Per-user language and display time zone, remembered across sessions.

The choice is saved in ``UserPreference`` and copied into the session when the user signs
in (or on the first request of an older session), so ``PreferenceMiddleware`` activates it
on every request without a query. The language cookie is set as well, so the sign-in page
after a sign-out speaks the language the user last chose. Changing one's own preferences
is not an operator action: every signed-in user may, and it is not in the audit trail.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from django.conf import settings
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.utils import timezone, translation
from django.utils.translation import gettext as _

from billing_ops.models import UserPreference

SameSite = Literal["Lax", "Strict", "None", False] | None

SESSION_LANGUAGE_KEY = "billing_ops_language"
SESSION_TIME_ZONE_KEY = "billing_ops_time_zone"


@dataclass(frozen=True)
class Preference:
    language: str  # a code from settings.LANGUAGES
    time_zone: str  # an IANA zone name


def deployment_language() -> translation.override:
    """For texts written with no reader at hand and stored or sent (job log lines, results,
    alert summaries, emails): the deployment's language, whoever's request wrote them."""
    return translation.override(settings.LANGUAGE_CODE)


def language_codes() -> list[str]:
    return [code for code, _name in settings.LANGUAGES]


@functools.cache
def time_zone_names() -> list[str]:
    """The installed zones (read from disk once: ~600 files; they do not change while we run)."""
    return sorted(available_timezones())


def preference_get(user: Any) -> Preference:
    """The user's saved choice, or the deployment's defaults where they made none."""
    row = UserPreference.objects.filter(user_id=user.pk).first()
    language = row.language if row and row.language in language_codes() else settings.LANGUAGE_CODE
    time_zone = row.time_zone if row and row.time_zone else settings.TIME_ZONE
    return Preference(language=language, time_zone=time_zone)


def preference_update(*, user: Any, language: str | None = None, time_zone: str | None = None) -> Preference:
    """Save the user's language and/or display time zone (None: leave as it is)."""
    if language is not None and language not in language_codes():
        raise ValidationError(_("Unknown language: %(code)s") % {"code": language})
    if time_zone is not None and time_zone:
        try:
            ZoneInfo(time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValidationError(_("Unknown time zone: %(zone)s") % {"zone": time_zone}) from None
    fields: dict[str, str] = {}
    if language is not None:
        fields["language"] = language
    if time_zone is not None:
        fields["time_zone"] = time_zone
    UserPreference.objects.update_or_create(user_id=user.pk, defaults=fields)
    return preference_get(user)


def preference_remember(request: HttpRequest, preference: Preference) -> None:
    """Put the preference in the session, where the middleware reads it."""
    request.session[SESSION_LANGUAGE_KEY] = preference.language
    request.session[SESSION_TIME_ZONE_KEY] = preference.time_zone


class PreferenceMiddleware:
    """Activate a signed-in user's language and time zone for the request; keep the language
    cookie in step so the sign-in page follows the user's choice. A session without them (a
    new sign-in) gets the saved ones on its first request."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            if SESSION_LANGUAGE_KEY not in request.session:
                preference_remember(request, preference_get(user))
            language = request.session[SESSION_LANGUAGE_KEY]
            if language in language_codes():
                translation.activate(language)
                request.LANGUAGE_CODE = language
            try:
                timezone.activate(ZoneInfo(request.session[SESSION_TIME_ZONE_KEY]))
            except (ZoneInfoNotFoundError, ValueError, KeyError):
                timezone.deactivate()
        try:
            response = self.get_response(request)
            # LocaleMiddleware (outside) keeps a header already set: the language the page has.
            response.headers.setdefault("Content-Language", translation.get_language())
        finally:
            # Leave the thread as it was found: the next request (or test) starts from the
            # defaults, never from this user's choice.
            timezone.deactivate()
            translation.deactivate()
        # Read again: the request may have just changed it (the switcher).
        language = request.session.get(SESSION_LANGUAGE_KEY) if hasattr(request, "session") else None
        if language and request.COOKIES.get(settings.LANGUAGE_COOKIE_NAME) != language:
            language_cookie_set(response, language)
        return response


def language_cookie_set(response: HttpResponse, language: str) -> None:
    response.set_cookie(
        settings.LANGUAGE_COOKIE_NAME,
        language,
        max_age=settings.LANGUAGE_COOKIE_AGE,
        path=settings.LANGUAGE_COOKIE_PATH,
        domain=settings.LANGUAGE_COOKIE_DOMAIN,
        secure=settings.LANGUAGE_COOKIE_SECURE,
        httponly=settings.LANGUAGE_COOKIE_HTTPONLY,
        samesite=cast(SameSite, settings.LANGUAGE_COOKIE_SAMESITE),
    )
