"""End to end in headless Chromium (Debian's, driven by Playwright): log in as an
operator, queue an environment check, watch it succeed without reloading the page, then
switch to Georgian (test-artifacts/overview-ka.png)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from django.utils import translation
from django.utils.translation import gettext

from billing_ops.models import Job
from tests.conftest import make_user

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
