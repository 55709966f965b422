from django.apps import AppConfig


class BillingOpsConfig(AppConfig):
    name = "billing_ops"
    verbose_name = "Billing Ops"

    def ready(self) -> None:
        from billing_ops import job_kinds  # noqa: F401  (registers the job kinds)
