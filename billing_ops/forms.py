from __future__ import annotations

import math

from django import forms
from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.core.exceptions import ValidationError
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from billing_ops import access
from billing_ops.environments import all_environments


class ThrottledAuthenticationForm(AuthenticationForm):
    """Django's sign-in form, refusing to try the password while the user name or the
    client address is locked out (billing_ops.access; failures are counted by the
    user_login_failed signal). The message is the same whether the user exists or not."""

    throttled = ""

    def clean(self) -> dict[str, object]:
        username = str(self.cleaned_data.get("username") or "")
        remote = self.request.META.get("REMOTE_ADDR", "") if self.request is not None else ""
        wait_s = access.login_locked_for(username, remote)
        if wait_s:
            minutes = math.ceil(wait_s / 60)
            self.throttled = ngettext(
                "Too many failed sign-ins; try again in %(minutes)d minute.",
                "Too many failed sign-ins; try again in %(minutes)d minutes.",
                minutes,
            ) % {"minutes": minutes}
            raise ValidationError(self.throttled, code="throttled")
        cleaned = super().clean()
        access.login_failures_forget(username)
        return cleaned


def environment_choices() -> list[tuple[str, str]]:
    return [(env.key, env.label) for env in all_environments()]


class EnvironmentCheckForm(forms.Form):
    environment = forms.ChoiceField(label=_("Environment"), choices=environment_choices)


class DecisionForm(forms.Form):
    # The digest of the parameters the approver was shown; a mismatch means "review again".
    digest = forms.CharField(widget=forms.HiddenInput, max_length=64)
    comment = forms.CharField(
        label=_("Comment"), required=False, max_length=2000, widget=forms.Textarea(attrs={"rows": 2})
    )


def language_choices() -> list[tuple[str, str]]:
    return list(settings.LANGUAGES)


def time_zone_choices() -> list[tuple[str, str]]:
    from billing_ops.preferences import time_zone_names

    return [("", _("Default (%(zone)s)") % {"zone": settings.TIME_ZONE})] + [
        (name, name) for name in time_zone_names()
    ]


class LanguageForm(forms.Form):
    language = forms.ChoiceField(label=_("Language"), choices=language_choices)


class PreferenceForm(LanguageForm):
    time_zone = forms.ChoiceField(label=_("Display time zone"), choices=time_zone_choices, required=False)
