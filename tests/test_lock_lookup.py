"""Who holds this lock? The search page, its selector and `find_lock`, on real databases."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from io import StringIO

import pytest
from django.core.cache import cache
from django.core.management import CommandError, call_command
from django.db import connections

from billing_ops.environments import all_environments, environment_connect
from locks.lookup import KeyFormat, key_format_from, lock_lookup, lock_lookup_in
from locks.models import LockReleasePlan
from tests.conftest import free_port_for_tests
from tests.factories import make_locks, make_run

# The lookup reads each environment on a connection of its own, which sees only committed
# rows: these tests commit their data (and clean_environments empties it again).
pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

METACHARACTERS = [
    "'; DROP TABLE lock.locks; --",
    "c7' OR '1'='1",
    "%",
    "_",
    "customers:%",
    "\\",
    '"; SELECT pg_sleep(10); --',
    "1620; DELETE FROM billing.billings",
]


@pytest.fixture(autouse=True)
def _no_learned_formats() -> None:
    cache.clear()  # each test's rows teach their own lock-key format


@pytest.fixture
def held(unprotected_env, clean_environments):
    """A stuck run (COMPLETED, stage DRAFT), a run that is legitimately running, and user
    locks without a run. Lock keys are `<entity type>:<entity id>`, ids like `c7`."""
    env = unprotected_env
    make_run(env, 1620, stage="DRAFT", number="BILLING202512220055")
    make_locks(env, 1620, 40, entity_type="customers", prefix="c")
    make_locks(env, 1620, 30, prefix="m")  # four entity types, system locks
    now = datetime.utcnow()
    make_run(
        env, 1901, status="IN_PROGRESS_ACCOUNTING", created=now, modified=now, number="BILLING202611210001"
    )
    make_locks(env, 1901, 5, entity_type="vat-rates", prefix="v")
    make_locks(env, None, 3, system=False, entity_type="customers", prefix="u")
    return env


def page(client, query: str) -> str:
    response = client.get("/lookup/", {"q": query})
    assert response.status_code == 200
    return response.content.decode()


def test_the_lock_key_format_is_learned_from_rows() -> None:
    assert key_format_from([("4711", "customers:4711"), ("12", "customers:12")]) == KeyFormat(
        "customers:", ""
    )
    assert key_format_from([("7", "LOCK/pod/7/v1"), ("8", "LOCK/pod/8/v1")]) == KeyFormat("LOCK/pod/", "/v1")
    assert key_format_from([("7", "a-7"), ("8", "b-8")]) is None  # rows disagree: no format
    assert key_format_from([("", "x")]) is None


def test_an_entity_id_finds_its_lock_through_the_lock_key_index(held) -> None:
    found = lock_lookup_in(held, "c7")
    assert [(lock.lock_key, lock.matched) for lock in found.locks] == [("customers:c7", "entity_id")]
    lock = found.locks[0]
    assert lock.run is not None and lock.run.billing_number == "BILLING202512220055"
    assert (lock.run.status, lock.run.process_stage) == ("COMPLETED", "DRAFT")
    assert lock.run.problem == "COMPLETED but still holds locks"
    assert found.formats is not None and found.formats.usable and not found.by_entity_id_scan
    assert found.formats.by_type["customers"] == KeyFormat("customers:", "")


def test_a_lock_key_matches_the_key_itself(held) -> None:
    found = lock_lookup_in(held, "vat-rates:v3")
    assert [(lock.entity_id, lock.matched) for lock in found.locks] == [("v3", "lock_key")]
    assert found.locks[0].run is not None and found.locks[0].run.problem == ""  # running, not stuck


@pytest.mark.parametrize(
    ("query", "matched"), [("BILLING202512220055", "billing_number"), ("1620", "run_id")]
)
def test_a_billing_number_or_run_id_summarises_the_runs_locks(held, query, matched) -> None:
    found = lock_lookup_in(held, query)
    assert found.locks == []  # a run's locks are counted, not listed
    (run,) = found.runs
    assert (run.run.id, run.matched, run.total, run.system, run.user) == (1620, matched, 70, 70, 0)
    by_type = {g.entity_type: g.count for g in run.groups}
    # make_locks cycles four entity types: 8 of the 30 mixed ones are customers
    assert by_type == {"customers": 48, "points-of-delivery": 7, "vat-rates": 8, "currencies": 7}
    assert run.run.problem == "COMPLETED but still holds locks"


def test_lock_rows_are_bounded_and_the_total_is_given(held, client_for, viewer, monkeypatch) -> None:
    monkeypatch.setattr("locks.lookup.LOCK_ROWS_LIMIT", 2)
    with connections[held.alias].cursor() as cursor:
        cursor.execute(
            "INSERT INTO lock.locks (id, lock_key, entity_type, entity_id, billing_id, system_lock)"
            " SELECT 'dup' || g, 'customers:c7', 'customers', 'c7', 1620, true FROM generate_series(1, 4) g"
        )
    found = lock_lookup_in(held, "c7")
    assert len(found.locks) == 2 and found.lock_total == 5
    assert "Showing 2 of 5 locks." in page(client_for(viewer), "c7")


def test_a_lock_without_a_run_shows_its_holder(held, client_for, viewer) -> None:
    text = page(client_for(viewer), "u2")
    assert "a user (no billing run)" in text and "billing_id is NULL" in text
    with connections[held.alias].cursor() as cursor:
        cursor.execute("ALTER TABLE lock.locks ADD COLUMN locked_by text")
        cursor.execute("UPDATE lock.locks SET locked_by = 'alice' WHERE billing_id IS NULL")
    try:
        found = lock_lookup_in(held, "u2")
        assert found.locks[0].holder == "alice" and found.locks[0].run is None
        assert "alice" in page(client_for(viewer), "u2")
    finally:
        with connections[held.alias].cursor() as cursor:
            cursor.execute("ALTER TABLE lock.locks DROP COLUMN locked_by")


def test_operators_get_the_release_flow_for_a_stuck_holder(held, client_for, operator) -> None:
    client = client_for(operator)
    text = page(client, "c7")
    assert "COMPLETED but still holds locks" in text
    assert 'data-release-form="1620"' in text and 'data-release-form="1901"' not in text
    # The form's own fields, posted where it points: the cleanup flow's preview, as on run_detail.
    response = client.post(
        f"/environments/{held.key}/releases/preview/",
        {"scope": "selected", "runs": "1620", "locks": "all", "back": "/lookup/?q=c7"},
    )
    plan = LockReleasePlan.objects.get()
    assert response["Location"] == f"/environments/{held.key}/releases/{plan.pk}/"
    assert plan.lock_count == 70 and plan.created_by == operator


def test_a_running_holder_offers_no_release(held, client_for, operator) -> None:
    text = page(client_for(operator), "v3")
    assert "data-release-form" not in text and "data-problem" not in text


def test_viewers_see_the_answer_but_no_release_action(held, client_for, viewer) -> None:
    client = client_for(viewer)
    for query in ("c7", "BILLING202512220055"):
        text = page(client, query)
        assert "COMPLETED but still holds locks" in text and "data-release-form" not in text
    response = client.post(f"/environments/{held.key}/releases/preview/", {"runs": "1620", "locks": "all"})
    assert response.status_code == 403 and not LockReleasePlan.objects.exists()


def test_every_environment_answers_and_an_unreachable_one_is_listed(
    held, client_for, viewer, extra_environment
) -> None:
    extra_environment(
        "down", f"postgresql://nobody:secret-pw@127.0.0.1:{free_port_for_tests()}/phoenix", label="Down"
    )
    response = client_for(viewer).get("/lookup/", {"q": "c7"})
    result = response.context["result"]
    assert [e.env.key for e in result.environments] == [*(e.key for e in all_environments())]
    by_key = {e.env.key: e for e in result.environments}
    assert not by_key["down"].reachable and "Connection refused" in by_key["down"].error
    assert by_key[held.key].reachable and by_key[held.key].lock_total == 1
    text = response.content.decode()
    assert 'data-env="down" data-reachable="false"' in text and "Unreachable" in text
    assert "secret-pw" not in text
    # Environments that answered with nothing are named on one line, not given a card each.
    empty = [e.env.key for e in result.environments if e.reachable and not e.found]
    assert empty and [e.env.key for e in result.empty] == empty
    nothing_line = text.split("data-nothing-found", 1)[1].split("</p>", 1)[0]
    assert "Nothing found in:" in nothing_line
    assert all(f'data-env="{key}"' in nothing_line for key in empty)
    assert f'<section class="card" data-env="{held.key}"' in text


def test_an_environment_that_does_not_answer_in_time_is_listed_as_timed_out(
    held, protected_env, client_for, viewer, settings
) -> None:
    settings.OVERVIEW_STATEMENT_TIMEOUT_MS = 500
    blocker = environment_connect(held)
    blocker.execute("LOCK TABLE lock.locks IN ACCESS EXCLUSIVE MODE")  # every read of it waits
    try:
        started = time.monotonic()
        response = client_for(viewer).get("/lookup/", {"q": "c7"})
        elapsed = time.monotonic() - started
    finally:
        blocker.rollback()
        blocker.close()
    by_key = {e.env.key: e for e in response.context["result"].environments}
    assert not by_key[held.key].reachable and by_key[held.key].timed_out
    assert "statement timeout" in by_key[held.key].error
    assert by_key[protected_env.key].reachable
    assert "Timed out" in response.content.decode()
    assert elapsed < 5, elapsed


def test_an_environment_without_a_learnable_format_is_scanned_by_entity_id(held, client_for, viewer) -> None:
    with connections[held.alias].cursor() as cursor:
        cursor.execute(
            "INSERT INTO lock.locks (id, lock_key, entity_type, entity_id, billing_id, system_lock)"
            " VALUES ('w1', md5('w1'), 'meters', 'w1', 1620, true),"
            " ('w2', md5('w2'), 'meters', 'w2', 1620, true)"
        )
    found = lock_lookup_in(held, "w2")
    assert found.by_entity_id_scan and found.formats is not None and found.formats.unformatted == ["meters"]
    assert [(lock.entity_id, lock.matched) for lock in found.locks] == [("w2", "entity_id")]
    assert lock_lookup_in(held, "c7").lock_total == 1  # the other types are still found
    assert "CREATE INDEX CONCURRENTLY locks_entity_id_idx" in page(client_for(viewer), "w2")


@pytest.mark.parametrize("query", METACHARACTERS)
def test_sql_metacharacters_find_nothing_and_break_nothing(held, client_for, viewer, query) -> None:
    result = lock_lookup(query, all_environments())
    assert all(e.reachable for e in result.environments), [e.error for e in result.environments]
    assert not result.found
    assert "No lock or billing run matches" in page(client_for(viewer), query)
    with connections[held.alias].cursor() as cursor:
        cursor.execute("SELECT (SELECT count(*) FROM lock.locks), (SELECT count(*) FROM billing.billings)")
        assert cursor.fetchone() == (78, 2)


def test_a_nul_character_is_no_query(held) -> None:
    assert lock_lookup_in(held, "c7\x00").locks == []


def test_the_search_box_is_on_every_page(client_for, viewer) -> None:
    text = client_for(viewer).get("/jobs/").content.decode()
    assert 'action="/lookup/"' in text and 'name="q"' in text


# --- find_lock ---------------------------------------------------------------------------------


def find_lock(*args: str) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    try:
        call_command("find_lock", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        return int(exc.code or 0), out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def test_find_lock_prints_a_table_and_exits_0(held) -> None:
    code, out, err = find_lock("c7", "--env", held.key)
    assert code == 0 and err == ""
    assert "customers:c7" in out and "#1620 BILLING202512220055" in out
    assert "COMPLETED but still holds locks" in out
    assert f"release_locks --env {held.key} --run 1620" in out


def test_find_lock_prints_json(held) -> None:
    code, out, _ = find_lock("BILLING202512220055", "--format", "json")
    report = json.loads(out)
    assert code == 0 and report["found"] is True
    env = next(e for e in report["environments"] if e["key"] == held.key)
    (run,) = env["runs"]
    assert (run["id"], run["matched"], run["lock_count"], run["stuck"]) == (1620, "billing_number", 70, True)
    assert env["locks"] == [] and env["reachable"] is True

    code, out, _ = find_lock("u1", "--env", held.key, "--format", "json")
    (lock,) = json.loads(out)["environments"][0]["locks"]
    assert lock["billing_id"] is None and lock["run"] is None and lock["system_lock"] is False


def test_find_lock_exits_1_when_nothing_is_found(held) -> None:
    code, out, _ = find_lock("no-such-entity")
    assert code == 1 and "nothing found" in out


def test_find_lock_exits_3_when_nothing_is_found_but_an_environment_did_not_answer(
    held, extra_environment
) -> None:
    extra_environment("down", f"postgresql://x:pw@127.0.0.1:{free_port_for_tests()}/phoenix", label="Down")
    code, out, err = find_lock("no-such-entity", "--env", "down", "--env", held.key)
    assert code == 3 and "down (Down) did not answer" in err and "unreachable" in out
    code, _, err = find_lock("c7", "--env", "down", "--env", held.key)
    assert code == 0 and "did not answer" in err


@pytest.mark.parametrize("args", [("c7", "--env", "nowhere"), ("  ",), ("x" * 201,)])
def test_find_lock_refuses_bad_usage_with_exit_2(clean_environments, args) -> None:
    with pytest.raises(CommandError) as raised:
        call_command("find_lock", *args, stdout=StringIO(), stderr=StringIO())
    assert raised.value.returncode == 2


def test_a_stale_run_is_stuck_and_says_why(unprotected_env, clean_environments) -> None:
    old = datetime.utcnow() - timedelta(days=3)
    make_run(unprotected_env, 1900, status="IN_PROGRESS_ACCOUNTING", created=old, modified=old)
    make_locks(unprotected_env, 1900, 4, entity_type="customers", prefix="s")
    (lock,) = lock_lookup_in(unprotected_env, "s2").locks
    assert lock.run is not None and "likely died" in lock.run.problem
