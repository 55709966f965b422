from __future__ import annotations

import django_filters
from django.utils.translation import gettext_lazy as _

from billing_ops.forms import environment_choices
from billing_ops.job_kinds import REGISTRY
from billing_ops.models import Job, JobStatus, Notification, NotificationChannel, NotificationStatus


def kind_choices() -> list[tuple[str, str]]:
    return [(k.name, str(k.label)) for k in REGISTRY.values()]


class JobFilter(django_filters.FilterSet):
    environment = django_filters.ChoiceFilter(label=_("Environment"), choices=environment_choices)
    kind = django_filters.ChoiceFilter(label=_("Kind"), choices=kind_choices)
    status = django_filters.ChoiceFilter(label=_("Status"), choices=JobStatus.choices)

    class Meta:
        model = Job
        fields = ["environment", "kind", "status"]


class NotificationFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(label=_("Status"), choices=NotificationStatus.choices)
    channel = django_filters.ChoiceFilter(label=_("Channel"), choices=NotificationChannel.choices)

    class Meta:
        model = Notification
        fields = ["status", "channel"]
