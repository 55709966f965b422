"""The scheduled cleanup (daily at 02:00, as the lock-release analysis recommends) and the
system user that requests it. A database row, not CELERY_BEAT_SCHEDULE: beat re-applies
that dict at every start and would undo what approvers set in the UI."""

from django.conf import settings
from django.db import migrations

SCHEDULE_NAME = "scheduled-lock-cleanup"
SCHEDULER_USERNAME = "scheduler"


def create(apps, schema_editor):
    CrontabSchedule = apps.get_model("django_celery_beat", "CrontabSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    User = apps.get_model("auth", "User")
    crontab, _ = CrontabSchedule.objects.get_or_create(
        minute="0", hour="2", day_of_week="*", day_of_month="*", month_of_year="*",
        timezone=settings.CELERY_TIMEZONE,
    )
    PeriodicTask.objects.get_or_create(
        name=SCHEDULE_NAME,
        defaults={"task": "locks.tasks.scheduled_cleanup", "crontab": crontab, "enabled": True},
    )
    # Requests scheduled releases; cannot log in (unusable password) and holds no role.
    User.objects.get_or_create(
        username=SCHEDULER_USERNAME, defaults={"password": "!scheduler-cannot-log-in", "is_active": True}
    )


class Migration(migrations.Migration):
    dependencies = [
        ("locks", "0004_cleanup_policy"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [migrations.RunPython(create, migrations.RunPython.noop)]
