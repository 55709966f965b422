"""End to end in headless Chromium (Debian's, driven by Playwright) against the live server
and a real Celery worker:

* an operator queues an environment check, watches it succeed without reloading the page,
  then switches to Georgian;
* a viewer browses every read page and sees no action, and every action URL refuses them
  (navigated to, and submitted as a form with a valid CSRF token);
* an operator uploads a CSV, watches the progress bar reach 100 % and reads the counts;
* an operator requests a rollback, an approver approves it in a second browser context,
  and the notification lands in a local webhook receiver.

Screenshots of the main pages go to test-artifacts/ (git-ignored; CI keeps them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from django.utils import translation
from django.utils.translation import gettext

from billing_ops.models import Job, JobStatus, Notification
from tests.conftest import _test_url, make_user, wait_for
from tests.factories import make_locks, make_run
from tests.test_upsert import existing_line, query, run, write_csv

CHROMIUM = os.environ.get("BILLING_OPS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "a-long-browser-test-password"
SAMPLE_CSV = (
    Path(__file__).resolve().parent.parent / "samples/reconciliations/demo-20261121-fix1/missing_lines.csv"
)
# The only state-changing forms a viewer may see: the header's language switcher and log out.
VIEWER_POST_ACTIONS = ["/preferences/language/", "/logout/"]

pytestmark = [pytest.mark.browser, pytest.mark.django_db(databases="__all__", transaction=True)]


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch):
    if not Path(CHROMIUM).exists():
        if os.environ.get("BILLING_OPS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
        pytest.skip(f"Chromium not found at {CHROMIUM}; .ci/run installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread; the ORM calls this test and
    # its fixtures make are still plain synchronous calls, one at a time.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_an_operator_queues_an_environment_check_and_sees_it_succeed(
    browser, live_server, celery_worker, unprotected_env, clean_environments
) -> None:
    from playwright.sync_api import expect

    make_user("op-browser", "Operator", password="a-long-browser-test-password")
    page = browser.new_page()
    # The Content-Security-Policy is on in every mode: whatever it blocks, Chromium reports.
    refused: list[str] = []
    page.on(
        "console",
        lambda message: refused.append(message.text) if "Content Security Policy" in message.text else None,
    )
    response = page.goto(f"{live_server.url}/")
    assert response is not None and "script-src 'self'" in response.headers["content-security-policy"]
    expect(page).to_have_url(f"{live_server.url}/login/?next=/")
    page.fill("input[name=username]", "op-browser")
    page.fill("input[name=password]", "a-long-browser-test-password")
    page.click("button[type=submit]")
    expect(page.locator(f'[data-env="{unprotected_env.key}"]')).to_have_attribute("data-verdict", "green")
    page.screenshot(path=str(ARTIFACTS / "overview-operator.png"), full_page=True)

    page.click(f'[data-env="{unprotected_env.key}"] >> text=Environment')
    page.click("text=Queue an environment check")
    expect(page.locator("h1")).to_contain_text("Environment check")
    job_url = page.url
    # The status fragment refreshes itself (htmx); no reload happens here.
    expect(page.locator("[data-status]")).to_have_attribute("data-status", "succeeded", timeout=30_000)
    expect(page.locator("[role=progressbar]")).to_have_attribute("aria-valuenow", "100")
    # The bar's width is set by static/js/app.js (no inline style): full at 100 %.
    widths = page.evaluate(
        "() => { const b = document.querySelector('.progress .bar');"
        " return [b.getBoundingClientRect().width, b.parentElement.getBoundingClientRect().width]; }"
    )
    assert widths[1] > 0 and abs(widths[0] - widths[1]) < 1, widths
    expect(page.locator(".result")).to_contain_text("lock.locks")
    page.screenshot(path=str(ARTIFACTS / "job-succeeded.png"), full_page=True)

    page.reload()  # the state survives a reload: it lives in the database
    expect(page.locator("[data-status]")).to_have_attribute("data-status", "succeeded")
    assert page.url == job_url
    job = Job.objects.get()
    assert job.status == "succeeded" and job.requested_by.username == "op-browser"

    # The header's switcher: the same page in Georgian, the run's status as the data has it.
    page.click("[data-language-switcher] button[value=ka]")
    expect(page.locator("html")).to_have_attribute("lang", "ka")
    with translation.override("ka"):
        heading_ka = gettext("Environment check")
    assert heading_ka != "Environment check"
    expect(page.locator("h1")).to_contain_text(heading_ka)
    expect(page.locator("[data-status]")).to_have_attribute("data-status", "succeeded")
    page.goto(f"{live_server.url}/")
    expect(page.locator("html")).to_have_attribute("lang", "ka")
    page.screenshot(path=str(ARTIFACTS / "overview-ka.png"), full_page=True)
    assert job.requested_by.preference.language == "ka"
    assert refused == []


# --- Helpers -----------------------------------------------------------------------------------

# Every control on the page that would change something: a form posting anywhere but the
# allowed actions, a submit button outside a GET form or an allowed form (or overriding
# its form's action), an htmx request that is not a GET. Returned as short descriptions.
ACTION_CONTROLS_JS = """
(allowed) => {
  const path = (form) => new URL(form.getAttribute('action') || location.href, location.href).pathname;
  const method = (form) => (form.getAttribute('method') || 'get').toLowerCase();
  const harmless = (form) => form && (method(form) === 'get' || allowed.includes(path(form)));
  const found = [];
  for (const form of document.querySelectorAll('form')) {
    if (!harmless(form)) found.push(`form ${method(form)} ${path(form)}`);
  }
  for (const el of document.querySelectorAll('button, input[type=submit], input[type=image]')) {
    if (el.type === 'button' && !el.form) continue;  // a plain script button (none today)
    if (!harmless(el.form) || el.hasAttribute('formaction') || el.hasAttribute('formmethod')) {
      found.push(`button "${el.textContent.trim() || el.value}"`);
    }
  }
  const verbs = ['post', 'put', 'patch', 'delete'];
  const htmx = verbs.flatMap(v => [`[hx-${v}]`, `[data-hx-${v}]`]).join(',');
  for (const el of document.querySelectorAll(htmx)) found.push(`htmx ${el.outerHTML.slice(0, 80)}`);
  return found;
}
"""


def action_controls(page: Any) -> list[str]:
    return list(page.evaluate(ACTION_CONTROLS_JS, VIEWER_POST_ACTIONS))


def login(browser: Any, site: str, username: str) -> Any:
    """A new browser context (its own cookies) signed in as `username`; returns its page."""
    page = browser.new_context().new_page()
    page.goto(f"{site}/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_url(f"{site}/")
    return page


def navigate(context: Any, url: str) -> tuple[int, list[str]]:
    """Open `url` in a new tab of `context`, as typed into the address bar: the HTTP status
    the server answered and the page's action controls (none when the page is Chromium's
    own: an empty error response, such as Django's 405 for a GET on a POST-only view, makes
    Chromium fail the navigation and show its error page; the response still arrived). A new
    tab each time: that error page's own late navigation would interrupt the next goto."""
    from playwright.sync_api import Error

    page = context.new_page()
    try:
        with page.expect_response(lambda r: r.url == url and r.request.is_navigation_request()) as answer:
            try:
                page.goto(url)
                controls = action_controls(page)
            except Error as exc:
                if "ERR_HTTP_RESPONSE_CODE_FAILURE" not in str(exc):
                    raise
                controls = []
        return int(answer.value.status), controls
    finally:
        page.close()


def browser_post(page: Any, path: str, fields: dict[str, str]) -> Any:
    """Submit a form to `path` as the browser would (a top-level POST navigation carrying the
    session cookie and a valid CSRF token taken from the current page); the response."""
    token = page.locator("input[name=csrfmiddlewaretoken]").first.get_attribute("value")
    with page.expect_navigation() as navigation:
        page.evaluate(
            """([path, fields]) => {
                 const form = document.createElement('form');
                 form.method = 'post';
                 form.action = path;
                 for (const [name, value] of Object.entries(fields)) {
                   const input = document.createElement('input');
                   input.type = 'hidden'; input.name = name; input.value = value;
                   form.appendChild(input);
                 }
                 document.body.appendChild(form);
                 form.submit();
               }""",
            [path, {"csrfmiddlewaretoken": token, **fields}],
        )
    return navigation.value


def result_table(page: Any) -> dict[str, str]:
    """The job result's table (header cell: value cell)."""
    return dict(
        page.evaluate(
            "() => [...document.querySelectorAll('.result tr')].map(tr =>"
            " [tr.querySelector('th').textContent.trim(), tr.querySelector('td').textContent.trim()])"
        )
    )


# --- A viewer: every page, no action ----------------------------------------------------------


def test_a_viewer_sees_no_action_anywhere_and_every_action_url_refuses_them(
    browser, live_server, unprotected_env, protected_env, clean_environments, tmp_path
) -> None:
    from playwright.sync_api import expect

    from locks import release
    from locks.models import LockReleasePlan

    site = live_server.url
    env = unprotected_env
    operator = make_user("op-seed", "Operator", "Approver", password=PASSWORD)
    make_user("viewer-browser", "Viewer", password=PASSWORD)
    # A stuck run with locks, a draft release plan of it, a release waiting for an approver
    # (protected environment) and an upsert run that could be rolled back: every kind of
    # action the pages offer an operator or approver.
    make_run(env, 41)
    make_locks(env, 41, 12)
    make_locks(env, 41, 3, system=False)
    draft = release.release_plan_prepare(actor=operator, env=env, run_ids=[41], system_only=False)
    make_run(protected_env, 42)
    make_locks(protected_env, 42, 5)
    waiting_plan = release.release_plan_prepare(
        actor=operator, env=protected_env, run_ids=[42], system_only=False
    )
    waiting = release.release_request(actor=operator, plan_id=waiting_plan.pk, digest=waiting_plan.digest)
    assert waiting.status == JobStatus.AWAITING_APPROVAL
    run(env, write_csv(tmp_path, "INV-V,U-1,FEE,Meter fee,1,3.00\n"), run_id="viewer-run")

    k = env.key
    read_pages = {
        "overview": "/",
        "stuck-runs": f"/environments/{k}/stuck-runs/",
        "run-drilldown": f"/environments/{k}/runs/41/",
        "environment": f"/environments/{k}/",
        "reconciliation": f"/environments/{k}/reconciliation/",
        "rollback-preview-viewer": f"/environments/{k}/reconciliation/rollback/?run_id=viewer-run",
        "release-plan": f"/environments/{k}/releases/{draft.pk}/",
        "job-awaiting-approval": f"/jobs/{waiting.pk}/",
        "approvals-viewer": "/approvals/",
        "environment-audit": f"/environments/{k}/audit/",
        "audit-chain": "/audit/chain/",
        "cleanup-schedule": "/cleanup-schedule/",
        "alerts": "/alerts/",
        "lookup": "/lookup/?q=r41-s-mix1",
    }

    # The detector sees the operator's actions on the same pages: it is not blind.
    page = login(browser, site, "op-seed")
    for name in ("stuck-runs", "run-drilldown", "rollback-preview-viewer", "job-awaiting-approval"):
        page.goto(site + read_pages[name])
        assert action_controls(page), f"{name}: the operator's actions were not found"
    page.context.close()

    page = login(browser, site, "viewer-browser")
    # Browsing as a person would: overview -> the environment's stuck runs -> the run.
    page.click(f'[data-env="{k}"] h2 a')
    page.wait_for_url(f"{site}/environments/{k}/stuck-runs/")
    page.click(f'a[href="/environments/{k}/runs/41/"]')
    page.wait_for_url(f"{site}/environments/{k}/runs/41/")
    assert page.locator("[data-groups] tbody tr").count() > 0
    assert page.locator("[data-release-form], #release-form, input[name=runs]").count() == 0

    for name, path in read_pages.items():
        response = page.goto(site + path)
        assert response is not None and response.status == 200, (name, response and response.status)
        assert action_controls(page) == [], f"{name} offers a viewer an action"
        for label in ("Approve", "Refuse", "Cancel job", "Request the rollback", "Queue", "Release"):
            assert page.get_by_role("button", name=label).count() == 0, (name, label)
        if name in ("overview", "stuck-runs", "run-drilldown"):
            page.screenshot(path=str(ARTIFACTS / f"viewer-{name}.png"), full_page=True)

    # Typed into the address bar: each action page is refused (405 for the POST-only ones),
    # never a form and never a server error.
    get_actions = [
        f"/environments/{k}/reconciliation/upsert/",
        f"/environments/{k}/releases/preview/",
        f"/environments/{k}/releases/{draft.pk}/request/",
        f"/jobs/{waiting.pk}/approve/",
        f"/jobs/{waiting.pk}/refuse/",
        f"/jobs/{waiting.pk}/cancel/",
        "/jobs/environment-check/",
        f"/environments/{k}/reconciliation/backups/request/",
    ]
    for path in get_actions:
        status, controls = navigate(page.context, site + path)
        assert status in (403, 405), (path, status)
        assert controls == [], path
    response = page.goto(f"{site}/environments/{k}/reconciliation/upsert/")
    assert response.status == 403 and page.locator("input[type=file]").count() == 0

    # Submitted as forms, with the viewer's valid session and CSRF token: 403 each time (the
    # refusal page has the header's forms, so the next token comes from it).
    page.goto(site + "/alerts/")
    post_actions = {
        f"/environments/{k}/releases/preview/": {"scope": "selected", "runs": "41", "locks": "all"},
        f"/environments/{k}/releases/{draft.pk}/request/": {"digest": draft.digest},
        f"/environments/{k}/reconciliation/upsert/": {"run_id": "viewer-upsert", "batch_size": "10"},
        f"/environments/{k}/reconciliation/rollback/": {
            "run_id": "viewer-run",
            "digest": "0" * 64,
            "reason": "a viewer tries",
        },
        f"/jobs/{waiting.pk}/approve/": {"digest": waiting.params_digest, "comment": ""},
        f"/jobs/{waiting.pk}/refuse/": {"digest": waiting.params_digest, "comment": ""},
        f"/jobs/{waiting.pk}/cancel/": {},
        "/jobs/environment-check/": {"environment": k},
        f"/environments/{k}/reconciliation/backups/request/": {},
        f"/environments/{k}/reconciliation/duplicates/precheck/": {},
        "/audit/chain/verify/": {},
        "/cleanup-schedule/": {"what": "policies"},
    }
    # The way of posting works (a 403 for a bad CSRF token would prove nothing): the one form
    # a viewer has, the language switcher, goes through.
    response = browser_post(page, "/preferences/language/", {"language": "en", "next": "/alerts/"})
    assert response.status == 200 and page.url == f"{site}/alerts/"
    jobs_before = Job.objects.count()
    for path, fields in post_actions.items():
        response = browser_post(page, path, fields)
        assert response.status == 403, (path, response.status)
        # The role check refused it (our page), not the CSRF check (Django's).
        expect(page.locator("main h1")).to_have_text("Not allowed")
        assert "CSRF verification failed" not in page.content(), path
    assert Job.objects.count() == jobs_before
    waiting.refresh_from_db()
    assert waiting.status == JobStatus.AWAITING_APPROVAL and waiting.approved_by is None
    assert LockReleasePlan.objects.get(pk=draft.pk).status == "draft"
    assert query(env, "SELECT count(*) FROM lock.locks WHERE billing_id = 41") == [(15,)]
    page.context.close()

    # Signed out, the same addresses lead to the sign-in page.
    anonymous = browser.new_context().new_page()
    for path in ("/", f"/environments/{k}/reconciliation/upsert/", f"/jobs/{waiting.pk}/", "/approvals/"):
        anonymous.goto(site + path)
        assert anonymous.url.startswith(f"{site}/login/?next="), path
    anonymous.context.close()


# --- An operator's upsert: the bar reaches 100 %, the counts are the database's ---------------


def test_an_operator_uploads_a_csv_and_watches_the_upsert_reach_100_percent(
    browser, live_server, celery_worker, unprotected_env, clean_environments
) -> None:
    import psycopg
    from playwright.sync_api import expect

    site = live_server.url
    env = unprotected_env
    make_user("op-upload", "Operator", password=PASSWORD)
    # Two lines of the sample already there: one with another amount (updated), one the same
    # (unchanged); the file's 18 other lines are new.
    updated_id = existing_line(
        env, "INV-01900001", "UNIT-090001", "ENERGY", "Active energy consumption Jan 2025", "412.500", "70.00"
    )
    existing_line(env, "INV-01900001", "UNIT-090001", "FEE", "Meter service fee Jan 2025", "1.000", "2.50")

    page = login(browser, site, "op-upload")
    page.click(f'[data-env="{env.key}"] h2 a')  # the environment's stuck runs
    page.click(".subnav >> text=Reconciliation")
    page.click("text=Upload a CSV…")
    expect(page.locator("h1")).to_have_text("Upsert missing invoice lines")
    page.set_input_files("input[name=csv]", str(SAMPLE_CSV))
    page.fill("input[name=run_id]", "browser-fix-1")
    page.fill("input[name=batch_size]", "5")

    # Another session holds public.invoice_lines: the job starts, then waits inside its
    # transaction, so the page is certainly showing a job still running when it first
    # renders (whatever the speed of the worker) and has to refresh itself to see the end.
    blocker = psycopg.connect(_test_url(env.alias))
    try:
        blocker.execute("LOCK TABLE public.invoice_lines IN ACCESS EXCLUSIVE MODE")
        page.click("text=Queue the upsert")
        expect(page.locator("h1")).to_contain_text("Job #")
        job_url = page.url
        navigations: list[str] = []
        page.on(
            "framenavigated",
            lambda frame: navigations.append(frame.url) if frame is page.main_frame else None,
        )
        expect(page.locator("[data-status]")).to_have_attribute("data-status", "running", timeout=30_000)
        assert page.locator("[role=progressbar]").get_attribute("aria-valuenow") != "100"
    finally:
        blocker.rollback()
        blocker.close()

    expect(page.locator("[data-status]")).to_have_attribute("data-status", "succeeded", timeout=30_000)
    expect(page.locator("[role=progressbar]")).to_have_attribute("aria-valuenow", "100")
    assert navigations == [] and page.url == job_url  # the fragment refreshed itself
    page.screenshot(path=str(ARTIFACTS / "job-upsert-100.png"), full_page=True)

    shown = result_table(page)
    audit = dict(
        query(
            env,
            "SELECT new_data ->> 'operation', count(*) FROM audit_logs"
            " WHERE action = 'upsert_missing_lines' AND new_data ->> 'run_id' = 'browser-fix-1' GROUP BY 1",
        )
    )
    [(lines,)] = query(env, "SELECT count(*) FROM invoice_lines")
    assert (shown["Inserted"], shown["Updated"], shown["Unchanged"]) == ("18", "1", "1")
    assert (int(shown["Inserted"]), int(shown["Updated"])) == (audit.get("insert"), audit.get("update"))
    assert lines == 2 + int(shown["Inserted"])
    assert shown["Rows streamed"] == "20"
    assert query(env, "SELECT amount::text FROM invoice_lines WHERE id = %s", [updated_id]) == [("75.90",)]
    job = Job.objects.get(pk=int(job_url.rstrip("/").rsplit("/", 1)[1]))
    assert job.status == JobStatus.SUCCEEDED and (job.result["inserted"], job.result["updated"]) == (18, 1)
    page.context.close()


# --- A rollback: requested, approved in a second browser, notified -----------------------------


def test_a_rollback_is_requested_approved_in_another_browser_and_notified(
    browser, live_server, notifying_worker, receiver, unprotected_env, clean_environments, tmp_path
) -> None:
    from playwright.sync_api import expect

    site = live_server.url
    env = unprotected_env
    # The requester is an approver too: still no approving their own request.
    make_user("op-rollback", "Operator", "Approver", password=PASSWORD)
    make_user("approver-browser", "Approver", password=PASSWORD)
    kept = existing_line(env, "INV-A", "U-1", "ENERGY", "Energy Jan", "10", "5.00")
    csv = write_csv(tmp_path, "INV-A,U-1,ENERGY,Energy Jan,11,5.50\nINV-C,U-2,FEE,Meter fee,1,3.00\n")
    outcome = run(env, csv, run_id="browser-fix-2")
    assert (outcome.inserted, outcome.updated) == (1, 1)

    page = login(browser, site, "op-rollback")
    page.goto(f"{site}/environments/{env.key}/reconciliation/rollback/")
    page.fill("#id_lookup_run_id", "browser-fix-2")
    page.get_by_role("button", name="Preview", exact=True).click()
    expect(page.locator("h2").first).to_contain_text("Preview: rollback of run browser-fix-2")
    page.screenshot(path=str(ARTIFACTS / "rollback-preview.png"), full_page=True)
    page.fill("textarea[name=reason]", "the CSV was for the wrong month")
    page.get_by_role("button", name="Request the rollback").click()
    expect(page.locator("[data-status]")).to_have_attribute("data-status", "awaiting_approval")
    job_url = page.url
    job = Job.objects.get(pk=int(job_url.rstrip("/").rsplit("/", 1)[1]))
    # Their own request: no decision form, and a decision posted anyway is refused.
    assert page.locator(f'form[action="/jobs/{job.pk}/approve/"]').count() == 0
    assert page.get_by_role("button", name="Approve").count() == 0
    refused = browser_post(page, f"/jobs/{job.pk}/approve/", {"digest": job.params_digest, "comment": ""})
    assert refused.status == 403
    expect(page.locator("main")).to_contain_text("Nobody approves or refuses their own request.")
    job.refresh_from_db()
    assert job.status == JobStatus.AWAITING_APPROVAL
    page.goto(job_url)

    # The approver, in a second browser context (own cookies, own session).
    approver = login(browser, site, "approver-browser")
    approver.click("nav >> text=Approvals")
    approver.click(f'a[href="/jobs/{job.pk}/"]')
    expect(approver.locator("main")).to_contain_text("the CSV was for the wrong month")
    expect(approver.locator("main")).to_contain_text("still exactly the one requested")
    approver.screenshot(path=str(ARTIFACTS / "approval.png"), full_page=True)
    approver.fill("textarea[name=comment]", "checked with finance")
    approver.get_by_role("button", name="Approve").click()
    expect(approver.locator("[data-status]")).to_have_attribute("data-status", "succeeded", timeout=30_000)
    expect(approver.locator(".result")).to_contain_text("1 inserted lines deleted")

    # The requester's page, open all along, follows by itself.
    expect(page.locator("[data-status]")).to_have_attribute("data-status", "succeeded", timeout=30_000)
    assert page.url == job_url

    wait_for(lambda: receiver.requests, timeout_s=30, what="the ops channel's webhook")
    [posted] = receiver.requests
    assert posted["json"]["text"] == (
        "🔴 Rollback executed for run browser-fix-2. Reason: the CSV was for the wrong month"
    )
    wait_for(
        lambda: Notification.objects.filter(source=f"job:{job.pk}", status="sent").exists(),
        what="the notification marked sent",
    )
    assert query(env, "SELECT count(*) FROM invoice_lines WHERE invoice_id = 'INV-C'") == [(0,)]
    assert query(env, "SELECT amount::text FROM invoice_lines WHERE id = %s", [kept]) == [("5.00",)]

    approver.click("nav >> text=Audit")
    expect(approver.locator("main table")).to_contain_text("job.approved")
    approver.screenshot(path=str(ARTIFACTS / "audit-trail.png"), full_page=True)
    approver.goto(f"{site}/notifications/")
    expect(approver.locator("main table")).to_contain_text(
        f"Billing reconciliation rolled back: run browser-fix-2 ({env.label})"
    )
    expect(approver.locator(f'main table a[href="/jobs/{job.pk}/"]')).to_have_count(1)
    assert receiver.url.split("127.0.0.1", 1)[1] not in approver.content()  # the secret path
    approver.screenshot(path=str(ARTIFACTS / "notifications.png"), full_page=True)
    approver.context.close()
    page.context.close()
