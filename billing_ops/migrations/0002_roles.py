"""The three roles as groups with their permissions (see billing_ops.access)."""

from django.db import migrations

ROLE_PERMISSIONS = {
    "Viewer": ("view_dashboard",),
    "Operator": ("view_dashboard", "queue_job"),
    "Approver": ("view_dashboard", "approve_job"),
}


def create_roles(apps, schema_editor):
    from django.contrib.auth.management import create_permissions

    # Permissions are normally created after migrate; this migration needs them now.
    app_config = apps.get_app_config("billing_ops")
    app_config.models_module = True
    create_permissions(app_config, verbosity=0, apps=apps)
    app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for role, codenames in ROLE_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=role)
        group.permissions.add(
            *Permission.objects.filter(content_type__app_label="billing_ops", codename__in=codenames)
        )


class Migration(migrations.Migration):
    dependencies = [
        ("billing_ops", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_roles, migrations.RunPython.noop)]
