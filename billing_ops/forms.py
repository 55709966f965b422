from __future__ import annotations

from django import forms
from django.conf import settings
from django.utils.translation import gettext_lazy as _

from billing_ops.environments import all_environments


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


class PreferenceForm(forms.Form):
    language = forms.ChoiceField(label=_("Language"), choices=language_choices)
    time_zone = forms.ChoiceField(label=_("Display time zone"), choices=time_zone_choices, required=False)
