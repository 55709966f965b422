"""The Celery app. Messages carry only a job id; the job row in `default` is the truth."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "billing_ops.settings")

app = Celery("billing_ops")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

WORKER_HEARTBEAT_INTERVAL_S = 10
_stop_heartbeat = threading.Event()


def _heartbeat_loop(hostname: str) -> None:
    """Tell /healthz this worker is alive: a Redis key that expires when it stops."""
    import redis
    from django.conf import settings
    from django.utils import timezone

    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    key = f"{settings.WORKER_HEARTBEAT_KEY_PREFIX}{hostname}"
    while not _stop_heartbeat.is_set():
        # Redis down: health shows no workers, which is the truth as far as it can know.
        with contextlib.suppress(redis.RedisError):
            client.set(key, timezone.now().isoformat(), ex=WORKER_HEARTBEAT_INTERVAL_S * 3)
        _stop_heartbeat.wait(WORKER_HEARTBEAT_INTERVAL_S)


@worker_ready.connect
def _start_worker_heartbeat(sender: Any = None, **kwargs: Any) -> None:
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    threading.Thread(target=_heartbeat_loop, args=(hostname,), daemon=True, name="worker-heartbeat").start()


@worker_shutdown.connect
def _stop_worker_heartbeat(**kwargs: Any) -> None:
    _stop_heartbeat.set()
