"""Database router: the environment is always explicit.

Mirror models (tables the billing platform owns, in every environment database) carry
``environment_mirror = True``. A query on them must name its database with
``.using(env.alias)``; without it this router raises instead of silently reading
``default``, where those tables do not exist, or worse, the wrong environment. The
dashboard's own models live only in ``default`` and are migrated only there.
"""

from __future__ import annotations

from typing import Any

from django.db import models

from billing_ops.environments import ALIAS_PREFIX


class MissingEnvironment(RuntimeError):
    """A mirror-model query was made without choosing an environment database."""


def is_mirror(model: type[models.Model]) -> bool:
    return bool(getattr(model, "environment_mirror", False))


class EnvironmentRouter:
    def _route(self, model: type[models.Model], hints: dict[str, Any]) -> str | None:
        if not is_mirror(model):
            return "default"
        instance = hints.get("instance")
        if instance is not None and instance._state.db:
            return instance._state.db  # related lookups stay in the instance's environment
        raise MissingEnvironment(
            f"{model.__name__} mirrors an environment table: choose the environment with "
            f".using(env.alias) (e.g. {model.__name__}.objects.using('env_test'))"
        )

    def db_for_read(self, model: type[models.Model], **hints: Any) -> str | None:
        return self._route(model, hints)

    def db_for_write(self, model: type[models.Model], **hints: Any) -> str | None:
        return self._route(model, hints)

    def allow_relation(self, obj1: models.Model, obj2: models.Model, **hints: Any) -> bool | None:
        return obj1._state.db == obj2._state.db

    def allow_migrate(self, db: str, app_label: str, model_name: str | None = None, **hints: Any) -> bool:
        model = hints.get("model")
        if model is not None and is_mirror(model):
            return False
        # Nothing of the dashboard's is ever created in an environment database.
        return not db.startswith(ALIAS_PREFIX)
