from __future__ import annotations

from django import forms
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
