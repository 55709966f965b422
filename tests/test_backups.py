"""Database backups (runbook §1.1): pg_dump, verified with pg_restore --list, kept, listed."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connections

from billing_ops import services
from billing_ops.models import Job, JobStatus
from reconciliation import backups
from reconciliation.backups import BackupError, PgTool, pg_dump_choose, version_major
from tests.conftest import make_user

pytestmark = [
    pytest.mark.django_db(databases="__all__", transaction=True),
    pytest.mark.usefixtures("inline_jobs"),
]


def add_lines(env, count: int) -> None:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "INSERT INTO public.invoice_lines"
            " (invoice_id, unit_id, line_type, description, normalized_description)"
            " SELECT 'INV-' || lpad(g::text, 8, '0'), 'UNIT-000001', 'ENERGY', 'Energy', 'energy'"
            " FROM generate_series(1, %s) g",
            [count],
        )


def folder_names(env) -> list[str]:
    folder = Path(settings.BACKUP_DIR) / env.key
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.fixture
def run_backup():
    """Request a backup and run it in this process (inline_jobs: no worker takes it first)."""

    def run(user, env) -> Job:
        job = backups.backup_request(actor=user, env=env)
        services.job_execute(job_id=job.pk, worker="test")
        return Job.objects.get(pk=job.pk)

    return run


def test_it_dumps_verifies_and_keeps_the_backup(
    run_backup, operator, unprotected_env, clean_environments
) -> None:
    env = unprotected_env
    add_lines(env, 25)
    job = run_backup(operator, env)
    assert job.status == JobStatus.SUCCEEDED, job.error
    result = job.result
    name = result["file"]
    assert backups.BACKUP_NAME_RE.match(name) and name.startswith(f"backup_{env.key}_")
    path = backups.backup_path(env, name)
    assert folder_names(env) == [name, name + ".json"]  # no temporary file left
    data = path.read_bytes()
    assert data.startswith(b"PGDMP") and result["size_bytes"] == len(data) > 0
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert result["verified"] is True and result["toc_entries"] > 0
    assert "public.invoice_lines" in result["tables_with_data"] and "lock.locks" in result["tables"]
    assert result["toc_counts"]["TABLE"] >= 4 and result["toc_counts"]["INDEX"] >= 2
    assert version_major(result["pg_dump_version"]) >= version_major(result["server_version"])
    assert result["duration_ms"] >= result["pg_dump_ms"] >= 0
    # The archive really holds the rows: pg_restore turns it back into the 25 lines.
    restored = subprocess.run(
        [
            str(Path(_tool_path(result)).with_name("pg_restore")),
            "--data-only",
            "--table=invoice_lines",
            "-f",
            "-",
            path,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert restored.count("INV-0000") == 25
    [listed] = backups.backups_list(env)
    assert (listed.name, listed.size_bytes, listed.verified, listed.sha256) == (
        name,
        len(data),
        True,
        result["sha256"],
    )
    assert backups.backup_manifest(env, name)["sha256"] == result["sha256"]
    assert any("verified and kept" in line.message for line in job.log_lines.all())


def _tool_path(result: dict[str, Any]) -> str:
    tool = next(t for t in backups.pg_dump_candidates() if t.version == result["pg_dump_version"])
    return tool.path


def test_the_password_goes_in_a_private_passfile_never_on_the_command_line(
    run_backup, operator, unprotected_env, clean_environments, extra_environment, monkeypatch
) -> None:
    """Where the dashboard puts the password: a 0600 passfile, gone afterwards. A role of the
    test's own carries the odd password, so that it is really used where the server asks for
    one (the private test server does; the machine's may trust local connections)."""
    password = "s3cret-Pw:with\\odd"
    role = "billing_ops_pwtest"
    db = connections[unprotected_env.alias].settings_dict
    with connections[unprotected_env.alias].cursor() as cursor:
        cursor.execute(f"DROP ROLE IF EXISTS {role}")
        cursor.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD %s", [password])
    try:
        host = f"{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
        url = f"postgresql://{role}:s3cret-Pw%3Awith%5Codd@{host}/{db['NAME']}"
        env = extra_environment("pwtest", url)
        seen: list[dict[str, Any]] = []
        real_popen = subprocess.Popen

        def spy(argv, **kwargs):
            if "--format=custom" not in argv:  # `pg_dump --version`, pg_restore: no connection
                return real_popen(argv, **kwargs)
            passfile = kwargs["env"].get("PGPASSFILE")
            seen.append(
                {
                    "argv": list(argv),
                    "env": dict(kwargs["env"]),
                    "mode": stat.S_IMODE(os.stat(passfile).st_mode) if passfile else None,
                    "content": Path(passfile).read_text() if passfile else "",
                }
            )
            return real_popen(argv, **kwargs)

        monkeypatch.setattr(backups.subprocess, "Popen", spy)
        job = run_backup(operator, env)
        assert job.status == JobStatus.SUCCEEDED, job.error
        [call] = seen
        assert not any(password in arg or "s3cret" in arg for arg in call["argv"])
        assert "PGPASSWORD" not in call["env"] and call["env"]["PGDATABASE"] == db["NAME"]
        assert call["mode"] == 0o600 and call["content"] == "*:*:*:*:s3cret-Pw\\:with\\\\odd\n"
        assert not Path(call["env"]["PGPASSFILE"]).exists()
        everything = f"{job.result} {job.error} {[line.message for line in job.log_lines.all()]}"
        assert "s3cret" not in everything and url not in everything
    finally:
        with connections[unprotected_env.alias].cursor() as cursor:
            cursor.execute(f"DROP ROLE IF EXISTS {role}")


def test_an_unwritable_folder_fails_clearly_and_leaves_nothing(
    run_backup, operator, unprotected_env, clean_environments, tmp_path, settings
) -> None:
    # A read-only folder stops a normal user; root ignores the mode bits, so then the
    # backup folder's parent is a regular file instead, which stops everyone.
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    settings.BACKUP_DIR = readonly if not os.access(readonly, os.W_OK) else blocker / "backups"
    try:
        job = run_backup(operator, unprotected_env)
    finally:
        readonly.chmod(0o700)
    assert job.status == JobStatus.FAILED and job.result is None
    assert "backup folder" in job.error and str(settings.BACKUP_DIR) in job.error
    assert "Permission denied" in job.error or "Not a directory" in job.error
    assert os.listdir(readonly) == [] and blocker.read_text() == "not a folder"
    if readonly != settings.BACKUP_DIR:  # the page says what is wrong instead of failing
        with pytest.raises(BackupError, match="Not a directory"):
            backups.backups_list(unprotected_env)


def test_a_folder_name_taken_by_a_file_is_reported(
    run_backup, operator, unprotected_env, clean_environments
) -> None:
    Path(settings.BACKUP_DIR).mkdir(parents=True)
    (Path(settings.BACKUP_DIR) / unprotected_env.key).write_text("in the way")
    job = run_backup(operator, unprotected_env)
    assert job.status == JobStatus.FAILED and "a file of that name is in the way" in job.error


@pytest.fixture
def platform_table(unprotected_env):
    """A table of the platform's that is not in the data contract (pg_dump dumps it, the
    row counts leave it out): something a migration can hold while pg_dump waits for it."""
    with connections[unprotected_env.alias].cursor() as cursor:
        cursor.execute("CREATE TABLE public.platform_extra (id int)")
    yield "public.platform_extra"
    with connections[unprotected_env.alias].cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS public.platform_extra")


def test_a_failing_pg_dump_leaves_no_file_under_a_final_name(
    run_backup, operator, unprotected_env, clean_environments, monkeypatch, platform_table
) -> None:
    """pg_dump cannot get its lock (a migration holds a table): it fails, and neither
    the half-written dump nor its temporary file stays."""
    monkeypatch.setattr(backups, "LOCK_WAIT_TIMEOUT_MS", 300)
    env = unprotected_env
    add_lines(env, 5)
    holder = _environment_connection(env)
    holder.execute("BEGIN")
    holder.execute(f"LOCK TABLE {platform_table} IN ACCESS EXCLUSIVE MODE")
    try:
        job = run_backup(operator, env)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert job.status == JobStatus.FAILED
    assert job.error.startswith("BackupError: pg_dump failed (exit 1); nothing was kept.")
    assert "lock" in job.error.lower()
    assert folder_names(env) == [] and backups.backups_list(env) == []


def _environment_connection(env):
    from billing_ops.environments import environment_connect

    return environment_connect(env, autocommit=True)


def test_a_contract_table_held_by_another_session_fails_the_count_clearly(
    run_backup, operator, unprotected_env, clean_environments, monkeypatch
) -> None:
    """The rows are counted under ACCESS SHARE locks taken before the snapshot; a table
    held exclusively (a migration) fails the backup with that reason, before pg_dump runs."""
    monkeypatch.setattr(backups, "LOCK_WAIT_TIMEOUT_MS", 300)
    env = unprotected_env
    holder = _environment_connection(env)
    holder.execute("BEGIN")
    holder.execute("LOCK TABLE lock.locks IN ACCESS EXCLUSIVE MODE")
    try:
        job = run_backup(operator, env)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert job.status == JobStatus.FAILED
    assert job.error == (
        "BackupError: Could not lock the contract tables to count their rows: another session holds a "
        "conflicting lock (waited 300 ms). Nothing was kept."
    )
    assert folder_names(env) == []


def test_the_manifest_records_the_rows_the_dump_holds(
    run_backup, operator, unprotected_env, clean_environments
) -> None:
    env = unprotected_env
    add_lines(env, 12)
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "INSERT INTO billing.billings (id, billing_number) VALUES (1, 'BILLING1'), (2, 'BILLING2')"
        )
        cursor.execute(
            "INSERT INTO lock.locks (id, lock_key, entity_type, entity_id, billing_id)"
            " SELECT 'L' || g, 'customers' || g, 'customers', g::text, 1 FROM generate_series(1, 7) g"
        )
    job = run_backup(operator, env)
    assert job.status == JobStatus.SUCCEEDED, job.error
    expected = {
        "billing.billings": 2,
        "lock.locks": 7,
        "public.invoice_lines": 12,
        "public.audit_logs": 0,
    }
    assert job.result["row_counts"] == expected
    name = job.result["file"]
    assert backups.backup_manifest(env, name)["row_counts"] == expected
    [listed] = backups.backups_list(env)
    assert listed.row_counts == expected
    pg_restore = str(Path(_tool_path(job.result)).with_name("pg_restore"))
    assert backups.archive_row_counts(pg_restore, backups.backup_path(env, name)) == expected
    assert any("Rows in the snapshot pg_dump will dump" in line.message for line in job.log_lines.all())


def test_rows_written_between_the_count_and_pg_dump_are_neither_counted_nor_dumped(
    run_backup, operator, unprotected_env, clean_environments, monkeypatch
) -> None:
    """Counts and dump share one snapshot: lines committed after the rows were counted,
    just before pg_dump starts (any other writer), are in neither. pg_dump with a snapshot
    of its own would dump them."""
    env = unprotected_env
    add_lines(env, 10)
    real_pg_dump_run = backups._pg_dump_run

    def writer_first(*args: Any, **kwargs: Any) -> None:
        with _environment_connection(env) as writer:
            writer.execute(
                "INSERT INTO public.invoice_lines"
                " (invoice_id, unit_id, line_type, description, normalized_description)"
                " SELECT 'LATE-' || g, 'UNIT-000002', 'ENERGY', 'Energy', 'energy'"
                " FROM generate_series(1, 7) g"
            )
        real_pg_dump_run(*args, **kwargs)

    monkeypatch.setattr(backups, "_pg_dump_run", writer_first)
    job = run_backup(operator, env)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.result["row_counts"]["public.invoice_lines"] == 10
    pg_restore = str(Path(_tool_path(job.result)).with_name("pg_restore"))
    in_archive = backups.archive_row_counts(pg_restore, backups.backup_path(env, job.result["file"]))
    assert in_archive["public.invoice_lines"] == 10
    with connections[env.alias].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM public.invoice_lines")
        assert cursor.fetchone()[0] == 17


def test_a_cancel_stops_pg_dump_and_keeps_nothing(
    operator, unprotected_env, clean_environments, platform_table
) -> None:
    """A cancel while pg_dump waits (here: for a lock) stops it; nothing is kept."""
    env = unprotected_env
    holder = _environment_connection(env)
    holder.execute("BEGIN")
    holder.execute(f"LOCK TABLE {platform_table} IN ACCESS EXCLUSIVE MODE")
    job = backups.backup_request(actor=operator, env=env)

    def cancel_soon() -> None:
        def started() -> bool:
            return any(name.startswith(".") for name in folder_names(env))

        from tests.conftest import wait_for

        wait_for(started, timeout_s=20, what="pg_dump to start")
        Job.objects.filter(pk=job.pk).update(cancel_requested=True)

    thread = threading.Thread(target=cancel_soon)
    thread.start()
    try:
        status = services.job_execute(job_id=job.pk, worker="test")
    finally:
        thread.join()
        holder.execute("ROLLBACK")
        holder.close()
    assert status == JobStatus.CANCELLED
    assert folder_names(env) == []


def test_a_temporary_file_left_by_a_dead_worker_goes_with_the_next_backup(
    run_backup, operator, unprotected_env, clean_environments
) -> None:
    folder = Path(settings.BACKUP_DIR) / unprotected_env.key
    folder.mkdir(parents=True)
    leftover = folder / f".backup_{unprotected_env.key}_20200101_000000.dump.partial-job999999"
    leftover.write_bytes(b"PGDMP half")
    job = run_backup(operator, unprotected_env)
    assert job.status == JobStatus.SUCCEEDED
    assert not leftover.exists() and folder_names(unprotected_env) == [
        job.result["file"],
        job.result["file"] + ".json",
    ]
    assert any("unfinished backup" in line.message for line in job.log_lines.all())


def test_a_second_backup_of_the_environment_is_refused_while_one_is_active(operator, unprotected_env) -> None:
    first = backups.backup_request(actor=operator, env=unprotected_env)
    with pytest.raises(services.JobConflict) as refused:
        backups.backup_request(actor=operator, env=unprotected_env)
    assert refused.value.holder.pk == first.pk and Job.objects.count() == 1


def test_backup_path_accepts_only_this_environments_backup_names(unprotected_env, protected_env) -> None:
    folder = Path(settings.BACKUP_DIR) / unprotected_env.key
    folder.mkdir(parents=True)
    good = f"backup_{unprotected_env.key}_20260208_140000.dump"
    (folder / good).write_bytes(b"PGDMP")
    (Path(settings.BACKUP_DIR) / "secret.dump").write_bytes(b"x")
    os.symlink(
        Path(settings.BACKUP_DIR) / "secret.dump",
        folder / f"backup_{unprotected_env.key}_20260208_150000.dump",
    )
    assert backups.backup_path(unprotected_env, good) == folder / good
    for name in (
        "../secret.dump",
        f"../{unprotected_env.key}/{good}",
        f"backup_{unprotected_env.key}_20260208_140000.dump/..",
        f"backup_{protected_env.key}_20260208_140000.dump",
        f"backup_{unprotected_env.key}_20260208_150000.dump",  # a symlink out of the folder
        f"backup_{unprotected_env.key}_20260208_160000.dump",  # no such file
        "",
    ):
        with pytest.raises(BackupError):
            backups.backup_path(unprotected_env, name)
    # The listing shows the real file (not verified by us: no manifest), not the symlink.
    [listed] = backups.backups_list(unprotected_env)
    assert listed.name == good and listed.verified is False


def test_pg_dump_is_chosen_by_the_servers_major_version() -> None:
    on_path = PgTool(path="/usr/bin/pg_dump", version="15.20", source="PATH")
    wheel = PgTool(path="/wheel/pginstall/bin/pg_dump", version="16.2", source="pgserver")
    assert pg_dump_choose("15.4", [on_path, wheel]) == on_path
    assert pg_dump_choose("16.1 (Debian 16.1-1)", [on_path, wheel]) == wheel
    assert pg_dump_choose("9.6.24", [on_path]) == on_path
    with pytest.raises(BackupError) as too_old:
        pg_dump_choose("17.0", [on_path, wheel])
    message = str(too_old.value)
    assert "17.0" in message and "15.20" in message and "16.2" in message and "pg_dump 17 or newer" in message
    with pytest.raises(BackupError, match="No pg_dump found"):
        pg_dump_choose("16.2", [])
    assert version_major("9.6.24") == (9, 6) and version_major("16.2") == (16,) > (9, 6)


def test_the_candidates_are_real_pg_dumps_with_their_versions() -> None:
    candidates = backups.pg_dump_candidates()
    assert candidates, "no pg_dump on PATH or in the pgserver wheel"
    for tool in candidates:
        out = subprocess.run([tool.path, "--version"], capture_output=True, text=True, check=True).stdout
        assert tool.version in out and tool.source in ("PATH", "pgserver")
    wheel = backups.pgserver_bin_dir()
    if wheel is not None:
        assert any(t.path == str(wheel / "pg_dump") for t in candidates) or any(
            os.path.realpath(t.path) == os.path.realpath(wheel / "pg_dump") for t in candidates
        )


def test_the_toc_is_summarised_by_entry_type() -> None:
    listing = """;
; Archive created at 2026-11-21 10:00:00 UTC
;     Dumped from database version: 15.20
;
215; 1259 16390 TABLE public invoice_lines postgres
216; 1259 16391 TABLE public audit_logs postgres
3350; 0 16390 TABLE DATA public invoice_lines postgres
3351; 2606 16400 CONSTRAINT public invoice_lines invoice_lines_pkey postgres
3352; 1259 16401 INDEX public idx_invoice_lines_dedup postgres
3353; 1255 16402 PROCEDURE billing_run make_billing_run_real(bigint) postgres
3354; 0 0 SEQUENCE SET public audit_logs_id_seq postgres
"""
    toc = backups.toc_parse(listing)
    assert toc["entries"] == 7 and toc["dumped_from"] == "15.20"
    assert toc["counts"] == {
        "CONSTRAINT": 1,
        "INDEX": 1,
        "PROCEDURE": 1,
        "SEQUENCE SET": 1,
        "TABLE": 2,
        "TABLE DATA": 1,
    }
    assert toc["tables"] == ["public.audit_logs", "public.invoice_lines"]
    assert toc["tables_with_data"] == ["public.invoice_lines"]


def test_the_backups_page_lists_them_and_only_operators_get_the_button(
    client_for, viewer, unprotected_env
) -> None:
    folder = Path(settings.BACKUP_DIR) / unprotected_env.key
    folder.mkdir(parents=True)
    name = f"backup_{unprotected_env.key}_20260208_140000.dump"
    (folder / name).write_bytes(b"PGDMP" + b"x" * 2043)
    page = (
        client_for(viewer)
        .get(f"/environments/{unprotected_env.key}/reconciliation/backups/")
        .content.decode()
    )
    assert name in page and "2.0\xa0KB" in page and "not verified by the dashboard" in page
    assert "Back up" not in page
    home = client_for(viewer).get(f"/environments/{unprotected_env.key}/reconciliation/").content.decode()
    assert name in home and "Back up" not in home
    operator = make_user("op2", "Operator")
    assert (
        "Back up"
        in client_for(operator).get(f"/environments/{unprotected_env.key}/reconciliation/").content.decode()
    )


def test_an_operator_queues_a_backup_from_the_page(
    client_for, operator, unprotected_env, clean_environments, django_capture_on_commit_callbacks
) -> None:
    client = client_for(operator)
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post(f"/environments/{unprotected_env.key}/reconciliation/backups/request/")
    job = Job.objects.get()
    assert response["Location"] == f"/jobs/{job.pk}/" and job.kind == "database_backup"
    with django_capture_on_commit_callbacks(execute=False):
        again = client.post(
            f"/environments/{unprotected_env.key}/reconciliation/backups/request/", follow=True
        )
    assert f"Job #{job.pk}" in again.content.decode() and Job.objects.count() == 1
    services.job_execute(job_id=job.pk, worker="test")
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert 'data-verified="yes"' in page and Job.objects.get(pk=job.pk).result["file"] in page
