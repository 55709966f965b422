"""Billing Ops settings: one file, driven by environment variables.

Every setting is listed in the README. Helpers raise ImproperlyConfigured on a malformed
value so that a bad deployment fails at start-up, not at the first request.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.core.exceptions import ImproperlyConfigured

from billing_ops.environments import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_STATEMENT_TIMEOUT_MS,
    database_settings,
    load_environments,
    parse_database_url,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("BILLING_OPS_VAR_DIR", BASE_DIR / "var"))


def _load_devstack_env() -> None:
    """Private services started by `make run`/`make test` leave their URLs in var/devstack.env.

    Read them only when the deployment configured nothing, so that `./manage.py ...` works
    in a checkout that `make run` set up, and a configured URL always wins.
    """
    env_file = VAR_DIR / "devstack.env"
    if os.environ.get("DATABASE_URL") or not env_file.exists():
        return
    for line in env_file.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            os.environ.setdefault(name.strip(), value.strip())


_load_devstack_env()


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, not {raw!r}")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, not {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}")
    return value


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DJANGO_DEBUG", False)
DEMO_MODE = env_bool("BILLING_OPS_DEMO", False)
TESTING = "pytest" in sys.modules or env_bool("BILLING_OPS_TESTING", False)
# Production (not debug, demo or test): a secret key is required, HTTPS only (below).
PRODUCTION = not (DEBUG or DEMO_MODE or TESTING)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not PRODUCTION:
        SECRET_KEY = "insecure-local-only-" + str(BASE_DIR)
    else:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY is not set")

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

# Which process this is (web, worker, beat, cli): shows in pg_stat_activity.application_name.
PROCESS_ROLE = os.environ.get("BILLING_OPS_PROCESS_ROLE", "cli")

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "django_tables2",
    "django_filters",
    "django_celery_beat",
    "billing_ops",
    "locks",
    "reconciliation",
    "audit",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "billing_ops.security.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    # After authentication: a signed-in user's saved language and time zone win.
    "billing_ops.preferences.PreferenceMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "billing_ops.middleware.MethodNotAllowedPageMiddleware",
    # Innermost: sees the view's exceptions first (an environment's database that is down).
    "billing_ops.middleware.EnvironmentUnavailableMiddleware",
]

ROOT_URLCONF = "billing_ops.urls"
WSGI_APPLICATION = "billing_ops.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "billing_ops.context_processors.navigation",
            ],
        },
    },
]

# --- Databases -------------------------------------------------------------------------
# `default` is the dashboard's own database; every environment is an extra alias.
CONNECT_TIMEOUT_S = env_int("BILLING_OPS_CONNECT_TIMEOUT_S", DEFAULT_CONNECT_TIMEOUT_S, minimum=1)
STATEMENT_TIMEOUT_MS = env_int("BILLING_OPS_STATEMENT_TIMEOUT_MS", DEFAULT_STATEMENT_TIMEOUT_MS, minimum=100)

_database_url = os.environ.get("DATABASE_URL", "")
if not _database_url:
    raise ImproperlyConfigured(
        "DATABASE_URL is not set. Run `make run` (which starts a private PostgreSQL) "
        "or set DATABASE_URL to the dashboard's own database."
    )
DATABASES = {
    "default": database_settings(
        parse_database_url(_database_url, where="DATABASE_URL"),
        application_name=f"billing-ops {PROCESS_ROLE}",
        connect_timeout_s=CONNECT_TIMEOUT_S,
        statement_timeout_ms=STATEMENT_TIMEOUT_MS,
        conn_max_age_s=env_int("BILLING_OPS_CONN_MAX_AGE_S", 60),
    )
}

ENVIRONMENTS_FILE = Path(os.environ.get("BILLING_OPS_ENVIRONMENTS") or BASE_DIR / "environments.demo.toml")
ENVIRONMENTS = load_environments(ENVIRONMENTS_FILE)
for _env in ENVIRONMENTS.values():
    DATABASES[_env.alias] = database_settings(
        _env.conninfo,
        application_name=f"billing-ops {PROCESS_ROLE} env={_env.key}",
        connect_timeout_s=CONNECT_TIMEOUT_S,
        statement_timeout_ms=STATEMENT_TIMEOUT_MS,
    )
DATABASE_ROUTERS = ["billing_ops.routers.EnvironmentRouter"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis and Celery --------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
if not REDIS_URL:
    raise ImproperlyConfigured("REDIS_URL is not set. Run `make run` or set REDIS_URL.")

JOB_SOFT_TIME_LIMIT_S = env_int("BILLING_OPS_JOB_SOFT_TIME_LIMIT_S", 3 * 3600, minimum=10)
JOB_TIME_LIMIT_S = JOB_SOFT_TIME_LIMIT_S + 300
# A job whose worker has not written a heartbeat for this long is considered lost.
JOB_HEARTBEAT_S = env_int("BILLING_OPS_JOB_HEARTBEAT_S", 5, minimum=1)
JOB_STALE_AFTER_S = env_int("BILLING_OPS_JOB_STALE_AFTER_S", 60, minimum=3)
# A queued job not picked up for this long is sent again (the claim makes a duplicate harmless).
JOB_REDISPATCH_AFTER_S = env_int("BILLING_OPS_JOB_REDISPATCH_AFTER_S", 120, minimum=1)
SWEEP_INTERVAL_S = env_int("BILLING_OPS_SWEEP_INTERVAL_S", 15, minimum=1)
# Tests get a queue of their own so that a worker of `make run` never takes their jobs.
CELERY_QUEUE = os.environ.get("BILLING_OPS_QUEUE") or (
    f"billing_ops_test_{os.getpid()}" if TESTING else "billing_ops"
)

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None  # job state lives in the `default` database, not in Redis
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = JOB_SOFT_TIME_LIMIT_S
CELERY_TASK_TIME_LIMIT = JOB_TIME_LIMIT_S
CELERY_TASK_DEFAULT_QUEUE = CELERY_QUEUE
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # Must exceed the hard time limit, or Redis would hand a long job to a second worker.
    "visibility_timeout": JOB_TIME_LIMIT_S + 600,
    "socket_connect_timeout": 2,
    "socket_timeout": 10,
}
# Publishing must not hang a web request while Redis is down: fail fast, the sweeper re-sends.
CELERY_TASK_PUBLISH_RETRY = False
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_SEND_TASK_EVENTS = False
CELERY_TIMEZONE = os.environ.get("BILLING_OPS_SCHEDULE_TIME_ZONE", "UTC")
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_BEAT_SCHEDULE = {
    "sweep-jobs": {"task": "billing_ops.tasks.sweep_jobs", "schedule": float(SWEEP_INTERVAL_S)},
}
# Workers report a heartbeat into Redis under this key prefix; /healthz reads it.
WORKER_HEARTBEAT_KEY_PREFIX = f"billing_ops:worker:{CELERY_QUEUE}:"

# --- Stuck-lock monitor ------------------------------------------------------------------
# An IN_PROGRESS_ACCOUNTING run not modified for this long: its worker thread likely died.
STALE_RUN_AFTER_MIN = env_int("BILLING_OPS_STALE_RUN_AFTER_MIN", 120, minimum=1)
# The overview's per-environment budget; a slower environment is shown as timed out.
OVERVIEW_STATEMENT_TIMEOUT_MS = env_int("BILLING_OPS_OVERVIEW_STATEMENT_TIMEOUT_MS", 10_000, minimum=100)
# The overview shows an environment's figures again for this long (per web process) instead
# of aggregating its lock.locks for every page view; 0: always ask. Tests always ask.
OVERVIEW_MAX_AGE_S = env_int("BILLING_OPS_OVERVIEW_MAX_AGE_S", 0 if TESTING else 5)
SNAPSHOT_INTERVAL_S = env_int("BILLING_OPS_SNAPSHOT_INTERVAL_S", 900, minimum=10)
# Alerts turn critical when stuck locks are older than this, or more than this many.
ALERT_CRITICAL_AGE_H = env_int("BILLING_OPS_ALERT_CRITICAL_AGE_H", 24, minimum=1)
ALERT_CRITICAL_LOCKS = env_int("BILLING_OPS_ALERT_CRITICAL_LOCKS", 10_000, minimum=1)
# Bearer token Prometheus presents at /metrics; unset: only signed-in viewers may read it.
METRICS_TOKEN = os.environ.get("BILLING_OPS_METRICS_TOKEN", "")

# --- Notifications -------------------------------------------------------------------------
# Who hears about alerts: comma-separated addresses, and/or one Slack-compatible webhook.
ALERT_EMAILS = env_list("BILLING_OPS_ALERT_EMAILS", "")
for _address in ALERT_EMAILS:
    if _address.count("@") != 1 or _address.startswith("@") or _address.endswith("@") or " " in _address:
        raise ImproperlyConfigured(f"BILLING_OPS_ALERT_EMAILS: not an email address: {_address!r}")
# A credential (whoever has it can post): never rendered or logged, even in this error.
ALERT_WEBHOOK_URL = os.environ.get("BILLING_OPS_ALERT_WEBHOOK_URL", "").strip()
if ALERT_WEBHOOK_URL and not ALERT_WEBHOOK_URL.lower().startswith(("http://", "https://")):
    raise ImproperlyConfigured("BILLING_OPS_ALERT_WEBHOOK_URL must be an http:// or https:// URL")
# Who hears that a reconciliation was rolled back or an environment restored (runbook §6.3):
# the ops channel (a Slack-compatible webhook; default: the alert webhook) and the product
# owner / finance by email (default: nobody).
STAKEHOLDER_EMAILS = env_list("BILLING_OPS_STAKEHOLDER_EMAILS", "")
for _address in STAKEHOLDER_EMAILS:
    if _address.count("@") != 1 or _address.startswith("@") or _address.endswith("@") or " " in _address:
        raise ImproperlyConfigured(f"BILLING_OPS_STAKEHOLDER_EMAILS: not an email address: {_address!r}")
OPS_WEBHOOK_URL = os.environ.get("BILLING_OPS_OPS_WEBHOOK_URL", "").strip() or ALERT_WEBHOOK_URL
if OPS_WEBHOOK_URL and not OPS_WEBHOOK_URL.lower().startswith(("http://", "https://")):
    raise ImproperlyConfigured("BILLING_OPS_OPS_WEBHOOK_URL must be an http:// or https:// URL")
# How often beat looks for notifications that are due (new ones are also sent on commit).
NOTIFICATION_DELIVER_INTERVAL_S = env_int("BILLING_OPS_NOTIFICATION_DELIVER_INTERVAL_S", 30, minimum=1)

EMAIL_HOST = os.environ.get("DJANGO_EMAIL_HOST", "")
EMAIL_PORT = env_int("DJANGO_EMAIL_PORT", 25, minimum=1)
EMAIL_HOST_USER = os.environ.get("DJANGO_EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("DJANGO_EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("DJANGO_EMAIL_USE_TLS", False)
# Without it an SMTP server that accepts and never answers would hold a worker forever.
EMAIL_TIMEOUT = env_int("DJANGO_EMAIL_TIMEOUT_S", 10, minimum=1)
DEFAULT_FROM_EMAIL = os.environ.get("DJANGO_DEFAULT_FROM_EMAIL", "billing-ops@localhost")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
# No mail server configured: messages go to the worker's log instead of nowhere.
EMAIL_BACKEND = (
    "django.core.mail.backends.smtp.EmailBackend"
    if EMAIL_HOST
    else "django.core.mail.backends.console.EmailBackend"
)

# The monitor's periodic tasks. Added here because their intervals are defined above; a
# message older than its interval is dropped (the next one is already on its way), so a
# worker that was down does not come back to a backlog of identical runs. (`expire_seconds`
# is how django-celery-beat's DatabaseScheduler spells Celery's `expires`.)
CELERY_BEAT_SCHEDULE["snapshot-environments"] = {
    "task": "locks.tasks.snapshot_environments",
    "schedule": float(SNAPSHOT_INTERVAL_S),
    "options": {"expire_seconds": SNAPSHOT_INTERVAL_S},
}
CELERY_BEAT_SCHEDULE["deliver-notifications"] = {
    "task": "billing_ops.tasks.deliver_notifications",
    "schedule": float(NOTIFICATION_DELIVER_INTERVAL_S),
    "options": {"expire_seconds": NOTIFICATION_DELIVER_INTERVAL_S},
}
# --- End of notifications -------------------------------------------------------------------

# --- Audit ----------------------------------------------------------------------------------
# How often beat requests a verification of every environment's audit_logs chain and of the
# dashboard's own trail (one at a time per chain: a verification still going is not doubled).
CHAIN_VERIFY_INTERVAL_S = env_int("BILLING_OPS_CHAIN_VERIFY_INTERVAL_S", 24 * 3600, minimum=60)
CELERY_BEAT_SCHEDULE["verify-audit-chains"] = {
    "task": "audit.tasks.scheduled_chain_verify",
    "schedule": float(CHAIN_VERIFY_INTERVAL_S),
    "options": {"expire_seconds": CHAIN_VERIFY_INTERVAL_S},
}
# --- End of audit ---------------------------------------------------------------------------

# --- Reconciliation ------------------------------------------------------------------------
# Uploaded CSVs wait here (random names, outside the web root) until their job settles.
UPLOAD_DIR = Path(os.environ.get("BILLING_OPS_UPLOAD_DIR") or VAR_DIR / "uploads")
RECONCILIATION_MAX_CSV_BYTES = env_int("BILLING_OPS_MAX_CSV_BYTES", 2 * 1024**3, minimum=1024)
RECONCILIATION_BATCH_SIZE = env_int("BILLING_OPS_UPSERT_BATCH_SIZE", 50_000, minimum=1)
# The whole upsert is one transaction; a statement in it may run this long.
UPSERT_STATEMENT_TIMEOUT_MS = env_int("BILLING_OPS_UPSERT_STATEMENT_TIMEOUT_MS", 30 * 60_000, minimum=1000)
# How long the upsert waits for a row or table another session holds (runbook §5.2).
UPSERT_LOCK_TIMEOUT_MS = env_int("BILLING_OPS_UPSERT_LOCK_TIMEOUT_MS", 60_000, minimum=100)
# --- End of reconciliation --------------------------------------------------------------------
# --- Reconciliation files ----------------------------------------------------------------------
# pg_dump backups (runbook §1.1), one subfolder per environment key; they hold every row of
# the environment, so the folder should be as private as the database.
BACKUP_DIR = Path(os.environ.get("BILLING_OPS_BACKUP_DIR") or VAR_DIR / "backups")
# Reconciliation run folders (runbook §1.3): <RUN_ID>/missing_lines.csv and summary.json.
RECONCILIATIONS_DIR = Path(os.environ.get("BILLING_OPS_RECONCILIATIONS_DIR") or VAR_DIR / "reconciliations")

# --- Auth, i18n, static ------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "overview"
LOGOUT_REDIRECT_URL = "login"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", PRODUCTION)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE

# Sign-in throttling (billing_ops.access): this many failed sign-ins for one user name, or
# from one client address, within the window lock further attempts out until it ends.
# Counted in Redis; while Redis is unreachable sign-ins are not throttled (and still audited).
LOGIN_FAILURE_LIMIT = env_int("BILLING_OPS_LOGIN_FAILURE_LIMIT", 5, minimum=1)
# 0: no per-address limit (behind a proxy every client has the proxy's address).
LOGIN_FAILURE_LIMIT_PER_ADDRESS = env_int("BILLING_OPS_LOGIN_FAILURE_LIMIT_PER_ADDRESS", 20)
LOGIN_FAILURE_WINDOW_S = env_int("BILLING_OPS_LOGIN_FAILURE_WINDOW_S", 15 * 60, minimum=1)
LOGIN_FAILURE_KEY_PREFIX = f"billing_ops:login-failures:{CELERY_QUEUE}:"

# --- Transport and browser hardening (SECURITY.md) ------------------------------------------
# Production (not debug, demo or test) is HTTPS only: `manage.py check --deploy` is clean
# with the defaults. Behind a TLS-terminating proxy set DJANGO_SECURE_PROXY_SSL_HEADER=true
# (only if the proxy overwrites X-Forwarded-Proto on every request).
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", PRODUCTION)
# Load balancers probe over plain HTTP; /healthz carries nothing secret.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
if env_bool("DJANGO_SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 365 * 24 * 3600 if PRODUCTION else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", True)
# The preload directive only lets the apex domain be submitted to browsers' preload list;
# nothing is preloaded unless someone submits it.
SECURE_HSTS_PRELOAD = env_bool("DJANGO_HSTS_PRELOAD", True)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# Sent on every response, in every mode (the browser tests run with it): the app's own
# static JS and CSS only; no inline script, style element or style attribute, no eval.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; object-src 'none'"
)

# The languages the dashboard ships (locale/<code>/LC_MESSAGES/django.po, compiled .mo
# committed next to it). A signed-in user's choice is saved (billing_ops.preferences);
# before sign-in the language cookie, then the browser's Accept-Language decide.
LANGUAGES = [("en", "English"), ("ka", "ქართული")]
LANGUAGE_CODE = os.environ.get("BILLING_OPS_LANGUAGE", "en")
if LANGUAGE_CODE not in dict(LANGUAGES):
    raise ImproperlyConfigured(f"BILLING_OPS_LANGUAGE must be one of {', '.join(dict(LANGUAGES))}")
LOCALE_PATHS = [BASE_DIR / "locale"]
LANGUAGE_COOKIE_AGE = 365 * 24 * 3600  # the sign-in page remembers the last choice for a year
LANGUAGE_COOKIE_SAMESITE = "Lax"
# LANGUAGE_CODE is also the language of texts written with no reader at hand: emails,
# webhook messages, alert summaries and job log lines are written (and stored) in it.
# The display time zone a user has not chosen one (each user can pick their own).
TIME_ZONE = os.environ.get("BILLING_OPS_DISPLAY_TIME_ZONE", "UTC")
try:
    ZoneInfo(TIME_ZONE)
except (ZoneInfoNotFoundError, ValueError):
    raise ImproperlyConfigured(f"BILLING_OPS_DISPLAY_TIME_ZONE: unknown time zone {TIME_ZONE!r}") from None
USE_I18N = True
# Dates and times as operators read them in logs, with the zone shown: one formats module
# per language (billing_ops/formats/<code>), whose separators `intcomma` uses for counts.
FORMAT_MODULE_PATH = ["billing_ops.formats"]
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
if DEBUG or TESTING:
    STORAGES["staticfiles"] = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}
    WHITENOISE_USE_FINDERS = True

DJANGO_TABLES2_TEMPLATE = "django_tables2/bootstrap5.html"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("BILLING_OPS_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

if TESTING:
    # Hashing test users' passwords with PBKDF2 would dominate the suite's time.
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
