from django.apps import AppConfig


class BillingOpsConfig(AppConfig):
    name = "billing_ops"
    verbose_name = "Billing Ops"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_login_failed

        from billing_ops import job_kinds  # noqa: F401  (registers the job kinds)
        from billing_ops.access import record_login_failure

        user_login_failed.connect(record_login_failure, dispatch_uid="billing_ops.login_failed")
