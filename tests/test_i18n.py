"""The dashboard in English and Georgian: the main pages in both languages, the switcher
remembered per user, the display time zone, and the committed `ka` catalogue (complete,
placeholders intact, its .mo compiled from it, nothing in the code missing from it)."""

from __future__ import annotations

import ast
import gettext
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils import translation

from billing_ops import services
from billing_ops.models import Job, UserPreference
from tests.conftest import make_user
from tests.factories import make_locks, make_run

BASE_DIR = Path(settings.BASE_DIR)
PO_PATH = BASE_DIR / "locale" / "ka" / "LC_MESSAGES" / "django.po"
MO_PATH = PO_PATH.with_suffix(".mo")
GEORGIAN = re.compile("[\u10d0-\u10ff]")
PASSWORD = "pw-for-i18n-tests"
RUN_ID = 4711
RUN_LOCKS = 1500  # above a thousand: grouped by the language's separator


# --- The catalogue, read without gettext tools ---------------------------------------------


@dataclass
class PoEntry:
    msgid: str
    msgid_plural: str | None = None
    msgctxt: str | None = None
    msgstr: list[str] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)


def po_entries(path: Path) -> list[PoEntry]:
    """A .po file's entries (obsolete ones left out). The header is the entry with msgid ""."""
    entries: list[PoEntry] = []
    entry: PoEntry | None = None
    flags: set[str] = set()
    target: tuple[str, int] | None = None

    def text(line: str) -> str:
        value = ast.literal_eval(line)  # PO strings use C escapes, a subset of Python's
        assert isinstance(value, str)
        return value

    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#~"):
            continue
        if line.startswith("#,"):
            flags |= {flag.strip() for flag in line[2:].split(",") if flag.strip()}
            continue
        if line.startswith("#"):
            continue
        keyword, _space, rest = line.partition(" ")
        if line.startswith('"'):
            assert entry is not None and target is not None, f"stray string: {raw}"
            name, index = target
            if name == "msgstr":
                entry.msgstr[index] += text(line)
            else:
                setattr(entry, name, (getattr(entry, name) or "") + text(line))
        elif keyword in ("msgctxt", "msgid"):
            if keyword == "msgctxt" or entry is None or entry.msgstr:
                entry = PoEntry(msgid="", flags=flags)
                entries.append(entry)
                flags = set()
            setattr(entry, keyword, text(rest))
            target = (keyword, 0)
        elif keyword == "msgid_plural":
            assert entry is not None
            entry.msgid_plural = text(rest)
            target = ("msgid_plural", 0)
        elif keyword.startswith("msgstr"):
            assert entry is not None
            index = int(keyword[7:-1]) if keyword != "msgstr" else 0
            entry.msgstr.append(text(rest))
            assert len(entry.msgstr) == index + 1, f"msgstr out of order: {raw}"
            target = ("msgstr", index)
        else:
            raise AssertionError(f"unexpected line: {raw}")
    return entries


def messages(path: Path) -> list[PoEntry]:
    return [entry for entry in po_entries(path) if entry.msgid]


def mo_catalog_from_po(entries: list[PoEntry]) -> dict[object, str]:
    """What Python's gettext should read from the .mo compiled from these entries."""
    catalog: dict[object, str] = {}
    for entry in entries:
        if not entry.msgid or "fuzzy" in entry.flags:
            continue
        key = f"{entry.msgctxt}\x04{entry.msgid}" if entry.msgctxt is not None else entry.msgid
        if entry.msgid_plural is None:
            catalog[key] = entry.msgstr[0]
        else:
            for index, value in enumerate(entry.msgstr):
                catalog[(key, index)] = value
    return catalog


NAMED = re.compile(r"%\((\w+)\)[-#0 +]*\d*(?:\.\d+)?[sdifgr]")
POSITIONAL = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdifgr]")


def placeholders(text: str, *, python_format: bool) -> list[str]:
    text = text.replace("%%", "")
    found = sorted(NAMED.findall(text))
    if python_format:
        found += sorted(m.group(0) for m in POSITIONAL.finditer(NAMED.sub("", text)))
    return found


def test_the_catalogue_is_complete_with_nothing_fuzzy() -> None:
    entries = po_entries(PO_PATH)
    header = entries[0]
    assert header.msgid == "" and "fuzzy" not in header.flags
    assert "Language: ka" in header.msgstr[0]
    untranslated = [e.msgid for e in entries[1:] if not all(s.strip() for s in e.msgstr)]
    fuzzy = [e.msgid for e in entries[1:] if "fuzzy" in e.flags]
    assert len(entries) > 900
    assert untranslated == [] and fuzzy == []


def test_every_translation_keeps_its_placeholders() -> None:
    wrong = []
    for entry in messages(PO_PATH):
        python_format = "python-format" in entry.flags
        allowed = [placeholders(entry.msgid, python_format=python_format)]
        if entry.msgid_plural is not None:
            allowed.append(placeholders(entry.msgid_plural, python_format=python_format))
        for value in entry.msgstr:
            if placeholders(value, python_format=python_format) not in allowed:
                wrong.append((entry.msgid, value))
    assert wrong == []


def test_the_placeholder_check_sees_a_lost_or_renamed_placeholder() -> None:
    assert placeholders("Job #%(id)s of %(n)s", python_format=True) != placeholders(
        "დავალება #%(id)s", python_format=True
    )
    assert placeholders("%(n)s locks", python_format=True) != placeholders(
        "%(count)s lock-ი", python_format=True
    )
    assert placeholders("100%% done, %s left", python_format=True) == ["%s"]


def test_the_committed_mo_is_the_po_compiled() -> None:
    with MO_PATH.open("rb") as mo:
        compiled = gettext.GNUTranslations(mo)
    catalog = {key: value for key, value in compiled._catalog.items() if key != ""}  # type: ignore[attr-defined]
    assert catalog == mo_catalog_from_po(po_entries(PO_PATH))


@pytest.mark.skipif(
    shutil.which("xgettext") is None, reason="needs GNU gettext (CI installs it: apt-get install gettext)"
)
def test_makemessages_finds_nothing_missing_from_the_catalogue(tmp_path: Path) -> None:
    """Extract the messages of a copy of the code into a copy of the catalogue: every msgid
    the code and templates use must already be there, translated, and none left over."""
    for name in ("billing_ops", "locks", "reconciliation", "audit", "templates", "locale"):
        shutil.copytree(BASE_DIR / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("manage.py", "environments.demo.toml"):
        shutil.copy(BASE_DIR / name, tmp_path / name)
    subprocess.run(
        [sys.executable, "manage.py", "makemessages", "-l", "ka", "--no-obsolete", "--add-location=file"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=300,
    )
    extracted = messages(tmp_path / "locale" / "ka" / "LC_MESSAGES" / "django.po")
    missing = [e.msgid for e in extracted if "fuzzy" in e.flags or not all(s.strip() for s in e.msgstr)]
    assert missing == []
    key = lambda e: (e.msgctxt, e.msgid, e.msgid_plural)  # noqa: E731
    assert sorted(map(key, extracted), key=str) == sorted(map(key, messages(PO_PATH)), key=str)


GETTEXT_NAMES = {"_", "gettext", "gettext_lazy", "ngettext", "ngettext_lazy", "pgettext", "pgettext_lazy"}
APP_DIRS = ("billing_ops", "locks", "reconciliation", "audit")


def test_no_message_hides_inside_an_f_string() -> None:
    """xgettext does not look into f-strings: a message there never reaches the catalogue,
    and the makemessages test above could not see it missing."""
    hidden = []
    for app in APP_DIRS:
        for path in sorted((BASE_DIR / app).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.JoinedStr):
                    continue
                for inner in ast.walk(node):
                    if (
                        isinstance(inner, ast.Call)
                        and isinstance(inner.func, ast.Name)
                        and inner.func.id in GETTEXT_NAMES
                    ):
                        hidden.append(f"{path.relative_to(BASE_DIR)}:{inner.lineno}")
    assert hidden == []


# --- The pages in both languages -------------------------------------------------------------


class _Text(HTMLParser):
    """The text a reader sees: text nodes and the attributes that show (title, placeholder...)."""

    SHOWN_ATTRIBUTES = ("title", "placeholder", "aria-label", "alt")

    def __init__(self) -> None:
        super().__init__()
        self.segments: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self.skip += 1
        for name, value in attrs:
            if name in self.SHOWN_ATTRIBUTES and value:
                self.segments.append(" ".join(value.split()))
            if tag == "input" and name == "value" and dict(attrs).get("type") == "submit" and value:
                self.segments.append(" ".join(value.split()))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self.skip -= 1

    def handle_data(self, data: str) -> None:
        if not self.skip and data.strip():
            self.segments.append(" ".join(data.split()))


def shown_text(html: str) -> list[str]:
    parser = _Text()
    parser.feed(html)
    return parser.segments


def translated_messages() -> dict[str, str]:
    """msgid -> Georgian, for the messages whose Georgian differs from the English."""
    return {
        e.msgid: e.msgstr[0]
        for e in messages(PO_PATH)
        if e.msgid_plural is None and e.msgctxt is None and e.msgstr[0] != e.msgid
    }


@pytest.fixture
def georgian_pages(unprotected_env, clean_environments, django_capture_on_commit_callbacks):
    """A COMPLETED run holding locks (one of them on a point of delivery), and a job."""
    env = unprotected_env
    make_run(env, RUN_ID, number="BILLING202512220055")
    make_locks(env, RUN_ID, RUN_LOCKS - 1, system=True, entity_type="customers")
    make_locks(env, RUN_ID, 1, system=False, entity_type="points-of-delivery")
    user = make_user("bilingual", "Viewer", "Operator", "Approver", password=PASSWORD)
    with django_capture_on_commit_callbacks(execute=False):
        services.job_request(actor=user, kind="environment_check", environment=env.key)
    return env, user


MAIN_PAGES = [
    ("overview", {}),
    ("stuck_runs", {"env_key": None}),
    ("run_detail", {"env_key": None, "run_id": RUN_ID}),
    ("job_list", {}),
    ("approval_list", {}),
    ("reconciliation_home", {"env_key": None}),
    ("audit_trail", {}),
    ("alert_list", {}),
    ("cleanup_schedule", {}),
    ("preference_edit", {}),
    ("notification_list", {}),
    ("lock_lookup", {"?q": "BILLING202512220055"}),
]


def page_url(name: str, kwargs: dict[str, object], env_key: str) -> str:
    query = f"?q={kwargs['?q']}" if "?q" in kwargs else ""
    path_kwargs = {k: (env_key if v is None else v) for k, v in kwargs.items() if k != "?q"}
    return reverse(name, kwargs=path_kwargs) + query


def client_in(user: User, language: str) -> Client:
    UserPreference.objects.update_or_create(user=user, defaults={"language": language})
    client = Client()
    client.force_login(user)  # signs in as a browser would: the saved choice comes with it
    return client


pytestmark_pages = pytest.mark.django_db(databases="__all__", transaction=True)


@pytestmark_pages
@pytest.mark.parametrize("name,kwargs", MAIN_PAGES, ids=[name for name, _kwargs in MAIN_PAGES])
def test_the_main_pages_render_in_english_and_georgian(name, kwargs, georgian_pages) -> None:
    env, user = georgian_pages
    url = page_url(name, kwargs, env.key)
    english = client_in(user, "en").get(url)
    georgian = client_in(user, "ka").get(url)
    assert english.status_code == georgian.status_code == 200
    en_html, ka_html = english.content.decode(), georgian.content.decode()
    assert '<html lang="en">' in en_html and '<html lang="ka">' in ka_html
    assert georgian["Content-Language"] == "ka"
    assert not GEORGIAN.search(" ".join(shown_text(en_html)).replace("ქართული", ""))
    assert GEORGIAN.search(ka_html.split("<main>", 1)[1]), "the page's own content is in Georgian"

    # Every text of the English page that the catalogue translates is translated in Georgian.
    catalogue = translated_messages()
    ka_segments = set(shown_text(ka_html))
    left_in_english = {s for s in shown_text(en_html) if s in catalogue and s in ka_segments}
    assert left_in_english == set()
    with translation.override("ka"):
        assert translation.gettext("Overview") in ka_html


@pytestmark_pages
@pytest.mark.parametrize("name", ["stuck_runs", "run_detail"])
def test_statuses_and_entity_types_stay_as_the_data_has_them(name, georgian_pages) -> None:
    env, user = georgian_pages
    kwargs = dict(MAIN_PAGES)[name]
    html = client_in(user, "ka").get(page_url(name, kwargs, env.key)).content.decode()
    assert "COMPLETED" in html and "BILLING202512220055" in html
    if name == "run_detail":
        assert "points-of-delivery" in html and "customers" in html


@pytestmark_pages
def test_counts_are_grouped_the_way_the_language_writes_them(georgian_pages) -> None:
    env, user = georgian_pages
    url = reverse("run_detail", kwargs={"env_key": env.key, "run_id": RUN_ID})
    assert "1,500" in client_in(user, "en").get(url).content.decode()
    ka_html = client_in(user, "ka").get(url).content.decode()
    assert "1\xa0500" in ka_html and "1,500" not in ka_html


@pytestmark_pages
def test_the_sign_in_page_speaks_the_language_of_the_cookie(db) -> None:
    client = Client()
    assert '<html lang="en">' in client.get(reverse("login")).content.decode()
    client.cookies[settings.LANGUAGE_COOKIE_NAME] = "ka"
    html = client.get(reverse("login")).content.decode()
    assert '<html lang="ka">' in html
    with translation.override("ka"):
        assert translation.gettext("Log in") in html


# --- The switcher and the time zone -----------------------------------------------------------


@pytestmark_pages
def test_the_language_choice_is_remembered_across_sessions(unprotected_env) -> None:
    user = make_user("switcher", "Viewer", password=PASSWORD)
    client = Client()
    assert client.login(username="switcher", password=PASSWORD)
    assert '<html lang="en">' in client.get("/").content.decode()

    response = client.post(reverse("language_set"), {"language": "ka", "next": "/jobs/"})
    assert response.status_code == 302 and response["Location"] == "/jobs/"
    assert UserPreference.objects.get(user=user).language == "ka"
    assert '<html lang="ka">' in client.get("/jobs/").content.decode()

    client.post(reverse("logout"))
    # Signed out, the sign-in page still follows the choice (the cookie) ...
    assert '<html lang="ka">' in client.get(reverse("login")).content.decode()
    # ... and a fresh browser that signs in gets it from the saved preference.
    fresh = Client()
    assert fresh.login(username="switcher", password=PASSWORD)
    assert '<html lang="ka">' in fresh.get("/").content.decode()

    fresh.post(reverse("language_set"), {"language": "en", "next": "/"})
    assert UserPreference.objects.get(user=user).language == "en"
    assert '<html lang="en">' in fresh.get("/").content.decode()


@pytestmark_pages
def test_the_switcher_refuses_an_unknown_language_and_a_foreign_next(unprotected_env, client_for) -> None:
    user = make_user("switcher2", "Viewer")
    client = client_for(user)
    response = client.post(reverse("language_set"), {"language": "xx", "next": "https://evil.example/"})
    assert response.status_code == 302 and response["Location"] == "/"
    assert not UserPreference.objects.filter(user=user).exists()


@pytestmark_pages
def test_the_display_time_zone_changes_the_rendered_time(
    unprotected_env, django_capture_on_commit_callbacks, client_for
) -> None:
    user = make_user("tz-user", "Viewer", "Operator")
    with django_capture_on_commit_callbacks(execute=False):
        job = services.job_request(actor=user, kind="environment_check", environment=unprotected_env.key)
    Job.objects.filter(pk=job.pk).update(requested_at=datetime(2026, 1, 5, 8, 0, tzinfo=UTC))
    client = client_for(user)
    assert "2026-01-05 08:00 UTC" in client.get(reverse("job_list")).content.decode()

    response = client.post(reverse("preference_edit"), {"language": "en", "time_zone": "Asia/Tbilisi"})
    assert response.status_code == 302
    assert UserPreference.objects.get(user=user).time_zone == "Asia/Tbilisi"
    assert "2026-01-05 12:00 +04" in client.get(reverse("job_list")).content.decode()

    client.post(reverse("preference_edit"), {"language": "ka", "time_zone": "Asia/Tbilisi"})
    assert "05.01.2026 12:00 +04" in client.get(reverse("job_list")).content.decode()

    # Back to the deployment's default zone.
    client.post(reverse("preference_edit"), {"language": "en", "time_zone": ""})
    assert "2026-01-05 08:00 UTC" in client.get(reverse("job_list")).content.decode()


@pytestmark_pages
def test_an_unknown_time_zone_is_refused(unprotected_env, client_for) -> None:
    user = make_user("tz-user2", "Viewer")
    client = client_for(user)
    response = client.post(reverse("preference_edit"), {"language": "en", "time_zone": "Mars/Olympus"})
    assert response.status_code == 200
    assert not UserPreference.objects.filter(user=user).exists()


@pytestmark_pages
def test_the_cleanup_schedule_says_which_zone_it_runs_in(unprotected_env, client_for, settings) -> None:
    user = make_user("tz-user3", "Viewer")
    client = client_for(user)
    html = client.get(reverse("cleanup_schedule")).content.decode()
    assert f'data-schedule-time-zone="{settings.CELERY_TIMEZONE}"' in html


@pytestmark_pages
def test_the_reports_headings_follow_the_language_and_the_csv_keys_do_not(georgian_pages) -> None:
    _env, user = georgian_pages
    client = client_in(user, "ka")
    markdown = client.get(reverse("report_download", kwargs={"fmt": "md"})).content.decode()
    with translation.override("ka"):
        for heading in ("Executive Summary", "Recommendations", "Conclusion", "Billing Number"):
            assert translation.gettext(heading) in markdown and translation.gettext(heading) != heading
    assert "COMPLETED" in markdown and "BILLING202512220055" in markdown
    csv_text = client.get(reverse("report_download", kwargs={"fmt": "csv"})).content.decode()
    assert csv_text.splitlines()[0].startswith("environment,label,host,")
    assert not GEORGIAN.search(csv_text)


@pytestmark_pages
def test_texts_stored_for_everyone_are_in_the_deployments_language(
    unprotected_env, django_capture_on_commit_callbacks
) -> None:
    """A Georgian reader's request: the page tells them in Georgian, the job's log (read by
    everyone, later) is written in LANGUAGE_CODE."""
    user = make_user("ka-operator", "Operator")
    client = client_in(user, "ka")
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post(
            reverse("environment_check_request"), {"environment": unprotected_env.key}, follow=True
        )
    job = Job.objects.get(requested_by=user)
    with translation.override("ka"):
        queued = translation.gettext("Environment check queued as job #%(id)s.") % {"id": job.pk}
    assert queued in response.content.decode()
    # A live worker of another test may already have started the job: its lines count too.
    messages = [line.message for line in job.log_lines.order_by("pk")]
    assert messages[0] == "Requested by ka-operator."
    assert not any(GEORGIAN.search(message) for message in messages)

    # Cancelled by the Georgian reader: the line for everyone is in English too.
    second = Job.objects.create(kind="environment_check", environment=unprotected_env.key, requested_by=user)
    client.post(reverse("job_cancel", args=[second.pk]))
    cancelled = [line.message for line in second.log_lines.all()]
    assert cancelled == ["Cancelled by ka-operator before it started."]


def test_durations_are_written_in_the_active_language() -> None:
    # Django's own ka catalogue lacks timesince's messages; ours carries them.
    from datetime import timedelta

    from django.utils import timezone, translation
    from django.utils.timesince import timesince

    then = timezone.now() - timedelta(days=400, minutes=5)
    with translation.override("ka"):
        assert timesince(then).replace("\xa0", " ") == "1 წელი, 1 თვე"
    with translation.override("en"):
        assert timesince(then).replace("\xa0", " ") == "1 year, 1 month"
