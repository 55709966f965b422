from __future__ import annotations

from typing import Any

from django import forms
from django.utils.translation import gettext_lazy as _

from reconciliation.artifacts import RunFolder
from reconciliation.verification import RUN_ID_MAX_LENGTH


class ArtifactValidateForm(forms.Form):
    """A run folder, chosen from the reconciliations directory's list: never a typed path."""

    run_folder = forms.ChoiceField(label=_("Run folder"), choices=())

    def __init__(self, *args: Any, folders: list[RunFolder], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["run_folder"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [(f.name, f.name) for f in folders]


class UpsertVerifyForm(forms.Form):
    # Any run id: runs of the old script are verified too. It is only ever a bound parameter.
    run_id = forms.CharField(label=_("Run id"), max_length=RUN_ID_MAX_LENGTH, strip=True)
