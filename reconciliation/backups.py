"""Database backups (runbook §1.1): ``pg_dump --format=custom`` of an environment, verified
with ``pg_restore --list`` before it is kept.

Where: ``BILLING_OPS_BACKUP_DIR/<env key>/backup_<env key>_<YYYYmmdd_HHMMSS>.dump`` (the
stamp in UTC), mode 0600, with a manifest ``<name>.json`` beside it (size, sha256, tool
versions, what the archive's table of contents holds). The dump is written under a hidden
temporary name (``.<name>.partial-job<id>``) and renamed to its final name only after
pg_restore has listed it: a file under a final name is a complete, readable archive, and a
failure (pg_dump's, a full disk, a folder we may not write) leaves nothing under one. A
temporary file left by a worker that died is removed by the environment's next backup.

Which pg_dump: one whose major version is at least the server's (an older pg_dump refuses a
newer server) — the one on PATH if it fits, else the one the pgserver wheel ships, else
the job fails naming every version involved. pg_restore comes from the same folder as
the chosen pg_dump. The password reaches pg_dump through a temporary passfile (0600,
removed afterwards), every other connection parameter through libpq's environment
variables: the URL is never on a command line, in a log or in a result.

Row counts that agree with the dump: before pg_dump starts, a REPEATABLE READ transaction
takes ACCESS SHARE locks on the contract tables (``billing.billings``, ``lock.locks``,
``public.invoice_lines``, ``public.audit_logs``: nobody can TRUNCATE or drop them until the
dump is done), exports its snapshot (``pg_export_snapshot()``) and counts their rows; pg_dump
then runs with ``--snapshot`` set to it, so it dumps exactly the rows that were counted,
whatever is written meanwhile. The counts go into the manifest; a restore compares them with
what it restored (``reconciliation.restore``). For an archive without them (made before the
dashboard recorded counts) ``archive_row_counts`` counts the rows in the archive itself.

A later full restore (runbook §6.1) chooses with ``backups_list`` and opens the file with
``backup_path``, which accepts only a backup name of this environment's folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from django.conf import settings
from django.db import connections
from django.utils.translation import gettext as _

from billing_ops.environments import Environment, environment_connect
from billing_ops.formats import grouped
from billing_ops.models import ACTIVE_STATUSES, Job
from billing_ops.services import Actor, JobCancelled, JobContext, job_request
from reconciliation.services import file_digest

BACKUP_NAME_RE = re.compile(r"^backup_(?P<env>[a-z][a-z0-9_]{0,30})_(?P<stamp>\d{8}_\d{6})\.dump$")
PARTIAL_RE = re.compile(r"^\.(?P<name>backup_[a-z0-9_]+\.dump)\.partial-job(?P<job>\d+)(\.json)?$")
STAMP_FORMAT = "%Y%m%d_%H%M%S"
MANIFEST_SUFFIX = ".json"
# pg_dump gives up on a table lock after this long (say, behind a migration holding ACCESS
# EXCLUSIVE) instead of hanging the job and queueing every later lock behind its own.
LOCK_WAIT_TIMEOUT_MS = 60_000
TOOL_VERSION_TIMEOUT_S = 10
# pg_restore --list reads only the archive's table of contents.
RESTORE_LIST_TIMEOUT_S = 600
POLL_INTERVAL_S = 0.5
STDERR_TAIL_LINES = 8
TOC_TABLES_KEPT = 500
# The data contract's tables (BRIEF.md §3) whose rows a backup counts and a restore checks.
COUNTED_TABLES = (
    ("billing", "billings"),
    ("lock", "locks"),
    ("public", "invoice_lines"),
    ("public", "audit_logs"),
)
# count(*) of tens of millions of audit rows takes a while; the session default (30 s) is
# for pages, not for this.
COUNT_STATEMENT_TIMEOUT_MS = 1_800_000
# Reading an archive's rows to count them: check for a cancel every so many lines.
ARCHIVE_COUNT_CANCEL_CHECK_LINES = 100_000

_PROBLEM_LINE_RE = re.compile(r"\b(error|fatal|detail|hint):", re.IGNORECASE)
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")

# libpq connection keywords and the environment variables that carry them to pg_dump.
_LIBPQ_ENV = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "application_name": "PGAPPNAME",
    "client_encoding": "PGCLIENTENCODING",
    "sslmode": "PGSSLMODE",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "sslsni": "PGSSLSNI",
    "sslcompression": "PGSSLCOMPRESSION",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "requirepeer": "PGREQUIREPEER",
    "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME",
    "channel_binding": "PGCHANNELBINDING",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "load_balance_hosts": "PGLOADBALANCEHOSTS",
    "passfile": "PGPASSFILE",
    "service": "PGSERVICE",
}
# Session settings (our statement_timeout) are not for pg_dump: it sets its own.
_LIBPQ_IGNORED = {"options", "password"}

# What `pg_restore --list` can name as an entry's type, longest first for prefix matching.
_TOC_DESCS = sorted(
    [
        "ACCESS METHOD", "ACL", "AGGREGATE", "BLOB", "BLOB DATA", "BLOBS", "CAST", "CHECK CONSTRAINT",
        "COLLATION", "COMMENT", "CONSTRAINT", "CONVERSION", "DATABASE", "DATABASE PROPERTIES", "DEFAULT",
        "DEFAULT ACL", "DOMAIN", "ENCODING", "EVENT TRIGGER", "EXTENSION", "FK CONSTRAINT",
        "FOREIGN DATA WRAPPER", "FOREIGN SERVER", "FOREIGN TABLE", "FUNCTION", "INDEX", "INDEX ATTACH",
        "LARGE OBJECT", "MATERIALIZED VIEW", "MATERIALIZED VIEW DATA", "OPERATOR", "OPERATOR CLASS",
        "OPERATOR FAMILY", "POLICY", "PROCEDURAL LANGUAGE", "PROCEDURE", "PUBLICATION",
        "PUBLICATION TABLE", "PUBLICATION TABLES IN SCHEMA", "ROW SECURITY", "RULE", "SCHEMA",
        "SEARCHPATH", "SECURITY LABEL", "SEQUENCE", "SEQUENCE OWNED BY", "SEQUENCE SET", "SERVER",
        "SHELL TYPE", "STATISTICS", "STDSTRINGS", "SUBSCRIPTION", "TABLE", "TABLE ATTACH", "TABLE DATA",
        "TEXT SEARCH CONFIGURATION", "TEXT SEARCH DICTIONARY", "TEXT SEARCH PARSER",
        "TEXT SEARCH TEMPLATE", "TRANSFORM", "TRIGGER", "TYPE", "USER MAPPING", "VIEW",
    ],
    key=len,
    reverse=True,
)  # fmt: skip
_TOC_ENTRY_RE = re.compile(r"^\d+;\s+\d+\s+\d+\s+(?P<rest>.*)$")


class BackupError(Exception):
    """A backup could not be made, verified or found; the message says why (never the URL)."""


# --- Listing and finding backups ---------------------------------------------------------------


@dataclass(frozen=True)
class Backup:
    name: str
    size_bytes: int
    modified_at: datetime
    # A manifest written by the dashboard after pg_restore listed the archive, for this size.
    verified: bool
    sha256: str = ""
    # Rows per contract table in the dump's snapshot ("schema.table" -> count, None for a
    # table that did not exist); None for a backup whose manifest has no counts.
    row_counts: dict[str, int | None] | None = None

    @property
    def row_counts_summary(self) -> str:
        return row_counts_text(self.row_counts) if self.row_counts is not None else ""


def backup_folder(env: Environment) -> Path:
    return Path(settings.BACKUP_DIR) / env.key


def backups_list(env: Environment) -> list[Backup]:
    """The environment's backups in its folder, newest first; none if there is no folder."""
    folder = backup_folder(env)
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise BackupError(_("Cannot read the backup folder %(path)s: %(why)s") % _why(folder, exc)) from None
    backups = [
        _backup(folder / entry.name, entry.stat(follow_symlinks=False))[0]
        for entry in entries
        if BACKUP_NAME_RE.match(entry.name) and entry.is_file(follow_symlinks=False)
    ]
    return sorted(backups, key=lambda b: (b.modified_at, b.name), reverse=True)


def backup_get(env: Environment, name: str) -> tuple[Backup, dict[str, Any] | None]:
    """One backup of the environment, as ``backups_list`` shows it, and its manifest (None
    for a file the dashboard did not make); BackupError for a name that is not one."""
    path = backup_path(env, name)
    return _backup(path, path.stat())


def _backup(path: Path, stat: os.stat_result) -> tuple[Backup, dict[str, Any] | None]:
    manifest = _manifest_read(path)
    verified = bool(manifest and manifest.get("verified") and manifest.get("size_bytes") == stat.st_size)
    backup = Backup(
        name=path.name,
        size_bytes=stat.st_size,
        modified_at=datetime.fromtimestamp(stat.st_mtime, tz=UTC),
        verified=verified,
        sha256=str(manifest.get("sha256", "")) if manifest else "",
        row_counts=manifest_row_counts(manifest),
    )
    return backup, manifest


def backup_path(env: Environment, name: str) -> Path:
    """The path of the environment's backup called ``name``. Only a backup file name of this
    environment is accepted (no separators, no other folder); BackupError otherwise."""
    match = BACKUP_NAME_RE.match(name)
    if not match or match["env"] != env.key:
        raise BackupError(
            _("%(name)r is not the name of a backup of %(env)s.") % {"name": name, "env": env.label}
        )
    folder = backup_folder(env)
    path = folder / name
    # The name cannot leave the folder, but a symlink placed there could: refuse it.
    if path.is_symlink() or not path.is_file() or path.resolve().parent != folder.resolve():
        raise BackupError(_("There is no backup %(name)s of %(env)s.") % {"name": name, "env": env.label})
    return path


def backup_manifest(env: Environment, name: str) -> dict[str, Any] | None:
    """What the dashboard recorded when it verified the backup (None for a file it did not make)."""
    return _manifest_read(backup_path(env, name))


def manifest_row_counts(manifest: dict[str, Any] | None) -> dict[str, int | None] | None:
    """The row counts a manifest recorded, or None (no manifest, or one written before the
    dashboard counted rows, or one whose counts are not what this code writes)."""
    counts = (manifest or {}).get("row_counts")
    if not isinstance(counts, dict) or set(counts) != set(counted_table_names()):
        return None
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in counts.values()):
        return None
    return {name: counts[name] for name in counted_table_names()}


def _manifest_read(dump: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(dump.with_name(dump.name + MANIFEST_SUFFIX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- Choosing pg_dump --------------------------------------------------------------------------


@dataclass(frozen=True)
class PgTool:
    path: str
    version: str  # as the tool prints it, e.g. "16.2"
    source: str  # "PATH" or "pgserver"

    @property
    def major(self) -> tuple[int, ...]:
        return version_major(self.version)


def version_major(version: str) -> tuple[int, ...]:
    """(16,) for "16.2"; (9, 6) for "9.6.24" (before 10 the major version had two parts)."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]] or [0]
    return (parts[0],) if parts[0] >= 10 else tuple(parts[:2])


def tool_version(path: str) -> str | None:
    """The PostgreSQL version a client program reports (``pg_dump --version``), or None."""
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=TOOL_VERSION_TIMEOUT_S, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION_RE.search(out)
    if not match:
        return None
    return match[1] + (f".{match[2]}" if match[2] else "")


def pgserver_bin_dir() -> Path | None:
    """The pgserver wheel's PostgreSQL binaries (``<package>/pginstall/bin``), found without
    importing the package (its import has side effects)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent / "pginstall" / "bin"
    return folder if folder.is_dir() else None


def pg_dump_candidates() -> list[PgTool]:
    """pg_dump on PATH, then the pgserver wheel's, each with the version it reports."""
    found: list[PgTool] = []
    seen: set[str] = set()
    wheel = pgserver_bin_dir()
    for path, source in (
        (shutil.which("pg_dump"), "PATH"),
        (str(wheel / "pg_dump") if wheel else None, "pgserver"),
    ):
        if not path or not os.access(path, os.X_OK) or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        version = tool_version(path)
        if version:
            found.append(PgTool(path=path, version=version, source=source))
    return found


def pg_dump_choose(server_version: str, candidates: list[PgTool]) -> PgTool:
    """The first candidate at least as new as the server; BackupError naming every version."""
    need = version_major(server_version)
    for tool in candidates:
        if tool.major >= need:
            return tool
    wanted = ".".join(str(p) for p in need)
    if not candidates:
        raise BackupError(
            _(
                "No pg_dump found (none on PATH, and the pgserver wheel is not installed); "
                "the server is PostgreSQL %(server)s: install pg_dump %(wanted)s or newer."
            )
            % {"server": server_version, "wanted": wanted}
        )
    found = "; ".join(
        _("pg_dump %(version)s from %(source)s (%(path)s)")
        % {"version": t.version, "source": t.source, "path": t.path}
        for t in candidates
    )
    raise BackupError(
        _(
            "No pg_dump is new enough for PostgreSQL %(server)s (found: %(found)s). pg_dump must be at "
            "least the server's major version: install pg_dump %(wanted)s or newer on the worker's PATH."
        )
        % {"server": server_version, "found": found, "wanted": wanted}
    )


# --- Making one ---------------------------------------------------------------------------------


def backup_request(*, actor: Actor, env: Environment) -> Job:
    """Queue a backup of the environment (operators). One at a time per environment: a
    second request while one is active raises JobConflict naming it."""
    return job_request(
        actor=actor, kind="database_backup", environment=env.key, claims=[f"database_backup:{env.key}"]
    )


def backup_create(ctx: JobContext) -> dict[str, Any]:
    """The ``database_backup`` job: dump, verify, keep. Raises BackupError (nothing kept)."""
    env = ctx.env
    assert env is not None
    started = time.monotonic()
    ctx.progress(0, 5, _("Asking the server for its version"))
    server_version = environment_server_version(env)
    tool = pg_dump_choose(server_version, pg_dump_candidates())
    restore = Path(tool.path).with_name("pg_restore")
    if not os.access(restore, os.X_OK):
        raise BackupError(_("No pg_restore beside %(path)s to verify the backup with.") % {"path": tool.path})
    ctx.log(
        _("PostgreSQL %(server)s: using pg_dump %(version)s from %(source)s.")
        % {"server": server_version, "version": tool.version, "source": tool.source}
    )

    folder = backup_folder(env)
    _folder_prepare(folder)
    removed = _partials_remove_stale(folder)
    if removed:
        ctx.log(_("Removed %(n)s unfinished backup file(s) left by an earlier job.") % {"n": removed})
    name = f"backup_{env.key}_{datetime.now(UTC).strftime(STAMP_FORMAT)}.dump"
    final = folder / name
    if final.exists():
        raise BackupError(_("%(name)s exists already; try again in a second.") % {"name": name})
    partial = folder / f".{name}.partial-job{ctx.job_id}"
    kept = False
    try:
        _file_create_private(partial)
        ctx.progress(1, 5, _("Counting the contract tables' rows in the dump's snapshot"))
        with dump_snapshot(env) as snapshot:
            ctx.log(
                _("Rows in the snapshot pg_dump will dump: %(counts)s.")
                % {"counts": row_counts_text(snapshot.row_counts)}
            )
            ctx.progress(2, 5, _("pg_dump is writing %(name)s") % {"name": name})
            dump_started = time.monotonic()
            _pg_dump_run(ctx, env, tool, partial, snapshot_id=snapshot.snapshot_id)
            dump_ms = round((time.monotonic() - dump_started) * 1000)
        size = partial.stat().st_size
        if size == 0:
            raise BackupError(_("pg_dump wrote an empty file; nothing was kept."))
        ctx.log(
            _("pg_dump finished: %(size)s bytes in %(ms)s ms.")
            % {"size": grouped(size), "ms": grouped(dump_ms)}
        )

        ctx.progress(3, 5, _("Verifying with pg_restore --list"))
        toc = _restore_list(str(restore), partial)
        if toc["entries"] == 0:
            raise BackupError(_("pg_restore --list shows no entries in the archive; nothing was kept."))
        restore_version = tool_version(str(restore)) or ""
        ctx.log(
            _("pg_restore --list: %(entries)s entries, %(tables)s tables with data.")
            % {"entries": toc["entries"], "tables": len(toc["tables_with_data"])}
        )
        ctx.progress(4, 5, _("Computing the checksum"))
        sha256, _size = file_digest(partial)
        result = {
            "file": name,
            "environment": env.key,
            "size_bytes": size,
            "sha256": sha256,
            "duration_ms": round((time.monotonic() - started) * 1000),
            "pg_dump_ms": dump_ms,
            "pg_dump_version": tool.version,
            "pg_dump_source": tool.source,
            "pg_restore_version": restore_version,
            "server_version": server_version,
            "verified": True,
            "toc_entries": toc["entries"],
            "toc_counts": toc["counts"],
            "tables": toc["tables"],
            "tables_with_data": toc["tables_with_data"],
            "dumped_from": toc["dumped_from"],
            "row_counts": snapshot.row_counts,
            "row_counts_at": snapshot.taken_at.isoformat(timespec="seconds"),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "job_id": ctx.job_id,
        }
        _backup_keep(partial, final, result)
        kept = True
    except OSError as exc:
        raise BackupError(
            _("The backup failed in %(path)s: %(why)s. Nothing was kept.") % _why(folder, exc)
        ) from None
    finally:
        if not kept:
            with contextlib.suppress(OSError):
                partial.unlink()
    ctx.progress(5, 5, _("Backup verified"))
    ctx.log(_("Backup %(name)s verified and kept (sha256 %(sha)s).") % {"name": name, "sha": sha256})
    return result


# --- Row counts ------------------------------------------------------------------------------


def counted_table_names() -> list[str]:
    return [f"{schema}.{table}" for schema, table in COUNTED_TABLES]


def row_counts_text(counts: dict[str, int | None]) -> str:
    """ "billing.billings 300, lock.locks 1,378, ..." for logs and messages."""
    absent = _("absent")
    return ", ".join(f"{name} {absent if n is None else grouped(n)}" for name, n in counts.items())


def _tables_present(conn: Any) -> list[tuple[str, str]]:
    """The counted tables that exist (asked in autocommit, before the counting transaction
    starts: any SELECT in it would fix its snapshot before its locks are taken)."""
    names = counted_table_names()
    rows = conn.execute("SELECT n FROM unnest(%s::text[]) AS n WHERE to_regclass(n) IS NOT NULL", [names])
    present = {row[0] for row in rows.fetchall()}
    return [(schema, table) for schema, table in COUNTED_TABLES if f"{schema}.{table}" in present]


def _count(conn: Any, present: list[tuple[str, str]]) -> dict[str, int | None]:
    counts: dict[str, int | None] = dict.fromkeys(counted_table_names())
    for schema, table in present:
        query = psycopg.sql.SQL("SELECT count(*) FROM {}.{}").format(
            psycopg.sql.Identifier(schema), psycopg.sql.Identifier(table)
        )
        counts[f"{schema}.{table}"] = int(conn.execute(query).fetchone()[0])
    return counts


def _counting_transaction(conn: Any, *, lock_timeout_ms: int) -> None:
    """Start a read-only REPEATABLE READ transaction with the counting timeouts. SET LOCAL
    (a utility statement) does not take the snapshot; the first SELECT does."""
    conn.autocommit = False
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    conn.execute(f"SET LOCAL statement_timeout = {int(COUNT_STATEMENT_TIMEOUT_MS)}")
    conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
    # The transaction stays idle while pg_dump works in its snapshot.
    conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")


def _counting_error(exc: psycopg.Error, *, waited_ms: int) -> str:
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return _(
            "Could not lock the contract tables to count their rows: another session holds a "
            "conflicting lock (waited %(ms)s ms)."
        ) % {"ms": waited_ms}
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return _("Counting the contract tables' rows took longer than %(s)s s.") % {
            "s": COUNT_STATEMENT_TIMEOUT_MS // 1000
        }
    return _("Counting the contract tables' rows failed: %(error)s") % {
        "error": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    }


@dataclass(frozen=True)
class DumpSnapshot:
    snapshot_id: str
    row_counts: dict[str, int | None]
    taken_at: datetime


@contextlib.contextmanager
def dump_snapshot(env: Environment) -> Iterator[DumpSnapshot]:
    """Lock the contract tables (ACCESS SHARE), export a snapshot and count their rows in
    it; the transaction stays open (and the locks held) until the block ends, so that a
    pg_dump started inside with ``--snapshot`` dumps exactly the counted rows. BackupError
    if a table cannot be locked within LOCK_WAIT_TIMEOUT_MS (say, behind a migration)."""
    with environment_connect(env, autocommit=True) as conn:
        present = _tables_present(conn)
        try:
            _counting_transaction(conn, lock_timeout_ms=LOCK_WAIT_TIMEOUT_MS)
            if present:
                conn.execute(
                    psycopg.sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(
                        psycopg.sql.SQL(", ").join(
                            psycopg.sql.Identifier(schema, table) for schema, table in present
                        )
                    )
                )
            snapshot_id, taken_at = conn.execute("SELECT pg_export_snapshot(), clock_timestamp()").fetchone()
            counts = _count(conn, present)
        except psycopg.Error as exc:
            conn.rollback()
            raise BackupError(
                _counting_error(exc, waited_ms=LOCK_WAIT_TIMEOUT_MS) + " " + _("Nothing was kept.")
            ) from None
        try:
            yield DumpSnapshot(snapshot_id=str(snapshot_id), row_counts=counts, taken_at=taken_at)
        finally:
            conn.rollback()


def environment_row_counts(env: Environment, *, lock_timeout_ms: int) -> dict[str, int | None]:
    """The contract tables' rows now, all counted in one snapshot. BackupError if a table
    stays locked for ``lock_timeout_ms`` or the counting fails."""
    with environment_connect(env, autocommit=True) as conn:
        present = _tables_present(conn)
        try:
            _counting_transaction(conn, lock_timeout_ms=lock_timeout_ms)
            counts = _count(conn, present)
        except psycopg.Error as exc:
            raise BackupError(_counting_error(exc, waited_ms=lock_timeout_ms)) from None
        finally:
            conn.rollback()
    return counts


def archive_row_counts(
    pg_restore: str, archive: Path, *, check: Callable[[], None] | None = None
) -> dict[str, int | None]:
    """Count the contract tables' rows in an archive: ``pg_restore --data-only`` of just
    those tables to stdout, counting the lines of each ``COPY ... FROM stdin`` block (COPY's
    text format escapes newlines inside values, so one line is one row). None for a table
    the archive has no data for. ``check`` is called every so many lines (a job's cancel)."""
    argv = [pg_restore, "--data-only", "--file=-"]
    for schema in dict.fromkeys(schema for schema, _table in COUNTED_TABLES):
        argv.append(f"--schema={schema}")
    for _schema, table in COUNTED_TABLES:
        argv.append(f"--table={table}")
    argv.append(str(archive))
    counts: dict[str, int | None] = dict.fromkeys(counted_table_names())
    with tempfile.TemporaryFile(mode="w+b") as stderr:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
        )
        assert proc.stdout is not None
        try:
            current: str | None = None
            rows = 0
            for n, line in enumerate(proc.stdout, start=1):
                if check is not None and n % ARCHIVE_COUNT_CANCEL_CHECK_LINES == 0:
                    check()
                if current is None:
                    if line.startswith(b"COPY ") and line.rstrip().endswith(b" FROM stdin;"):
                        current = line[5:].split(b" ", 1)[0].decode("utf-8", "replace").replace('"', "")
                        rows = 0
                elif line in (b"\\.\n", b"\\.\r\n"):
                    if current in counts:
                        counts[current] = rows
                    current = None
                else:
                    rows += 1
        finally:
            proc.stdout.close()
            if proc.poll() is None:
                proc.terminate()
            proc.wait()
        if proc.returncode != 0:
            raise BackupError(
                _("pg_restore cannot read the archive's rows (exit %(code)s). %(tail)s")
                % {"code": proc.returncode, "tail": stderr_tail(stderr)}
            )
    return counts


def _why(path: Path, exc: OSError) -> dict[str, str]:
    return {"path": str(path), "why": exc.strerror or type(exc).__name__}


def environment_server_version(env: Environment) -> str:
    with environment_connect(env, autocommit=True) as conn:
        return str(conn.execute("SELECT current_setting('server_version')").fetchone()[0])


def _folder_prepare(folder: Path) -> None:
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise BackupError(
            _("Cannot use the backup folder %(path)s: a file of that name is in the way.")
            % {"path": str(folder)}
        ) from None
    except OSError as exc:
        raise BackupError(
            _("Cannot create the backup folder %(path)s: %(why)s.") % _why(folder, exc)
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BackupError(
            _("Cannot write in the backup folder %(path)s: permission denied.") % {"path": str(folder)}
        )


def _file_create_private(path: Path) -> None:
    """Create the temporary file ourselves, 0600: pg_dump then writes into it (keeping the
    mode), and an unwritable folder fails here, before pg_dump runs."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)


def _partials_remove_stale(folder: Path) -> int:
    """Delete temporary files whose job is no longer active (their worker died)."""
    stale: list[tuple[Path, int]] = []
    for entry in os.scandir(folder):
        match = PARTIAL_RE.match(entry.name)
        if match:
            stale.append((folder / entry.name, int(match["job"])))
    active = set(
        Job.objects.filter(pk__in=[job for _p, job in stale], status__in=ACTIVE_STATUSES).values_list(
            "pk", flat=True
        )
    )
    removed = 0
    for path, job in stale:
        if job not in active:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


@contextlib.contextmanager
def libpq_environ(env: Environment) -> Iterator[dict[str, str]]:
    """The child's environment: the worker's, minus any PG* variable of its own, plus the
    environment's connection parameters; the password in a 0600 passfile removed on exit."""
    params = connections[env.alias].get_connection_params()
    child = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    for key, value in params.items():
        if key in _LIBPQ_IGNORED or not isinstance(value, str | int) or value == "":
            continue
        var = _LIBPQ_ENV.get(key)
        if var is None:
            if key in {"cursor_factory", "context", "prepare_threshold", "server_side_binding"}:
                continue
            raise BackupError(_("The connection option %(key)s cannot be passed to pg_dump.") % {"key": key})
        child[var] = str(value)
    child["PGAPPNAME"] = f"billing-ops backup env={env.key}"
    password = params.get("password")
    if not password:
        yield child
        return
    fd, passfile = tempfile.mkstemp(prefix="billing-ops-pgpass-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            escaped = str(password).replace("\\", "\\\\").replace(":", "\\:")
            handle.write(f"*:*:*:*:{escaped}\n")
        child["PGPASSFILE"] = passfile
        yield child
    finally:
        with contextlib.suppress(OSError):
            os.unlink(passfile)


def _pg_dump_run(ctx: JobContext, env: Environment, tool: PgTool, target: Path, *, snapshot_id: str) -> None:
    """Run pg_dump into ``target`` in the exported snapshot, polling for a cancel;
    BackupError on any failure."""
    argv = [
        tool.path,
        "--format=custom",
        f"--file={target}",
        "--verbose",
        "--no-password",
        f"--lock-wait-timeout={LOCK_WAIT_TIMEOUT_MS}",
        f"--snapshot={snapshot_id}",
    ]
    with libpq_environ(env) as child_env, tempfile.TemporaryFile(mode="w+b") as stderr:
        proc = subprocess.Popen(
            argv, env=child_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
        try:
            watch_process(proc, stderr, ctx, step=1, steps=4)
        except JobCancelled:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            ctx.log(_("pg_dump stopped on request; nothing was kept."), level="warning")
            raise
        if proc.returncode != 0:
            tail = stderr_tail(stderr)
            raise BackupError(
                _("pg_dump failed (exit %(code)s); nothing was kept. %(tail)s")
                % {"code": proc.returncode, "tail": tail}
            )


def watch_process(
    proc: subprocess.Popen[bytes],
    stderr: Any,
    ctx: JobContext,
    *,
    step: int,
    steps: int,
    tick: Callable[[], bool] | None = None,
) -> None:
    """Wait for a pg_dump or pg_restore: every ``POLL_INTERVAL_S`` check for a cancel
    (JobCancelled), run ``tick`` (which returns True to stop waiting), and show the tool's
    latest ``--verbose`` line as the job's progress."""
    last_message = ""
    while True:
        try:
            proc.wait(timeout=POLL_INTERVAL_S)
            return
        except subprocess.TimeoutExpired:
            pass
        ctx.check_cancel()
        if tick is not None and tick():
            return
        message = last_line(stderr)
        if message and message != last_message:
            ctx.progress(step, steps, message[:200])
            last_message = message


def last_line(stream: Any) -> str:
    stream.seek(0, os.SEEK_END)
    size = stream.tell()
    stream.seek(max(0, size - 4096))
    lines = stream.read().decode("utf-8", "replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


def stderr_tail(stream: Any) -> str:
    stream.seek(0, os.SEEK_END)
    size = stream.tell()
    stream.seek(max(0, size - 16384))
    lines = stream.read().decode("utf-8", "replace").strip().splitlines()
    # pg_dump --verbose narrates every step; the problem is in its error lines.
    errors = [line for line in lines if _PROBLEM_LINE_RE.search(line)]
    return " ".join((errors or lines)[-STDERR_TAIL_LINES:])


def _restore_list(pg_restore: str, archive: Path) -> dict[str, Any]:
    """Read the archive's table of contents with ``pg_restore --list``; BackupError if it
    cannot. Counts entries by type and names the tables (and those with data)."""
    try:
        done = subprocess.run(
            [pg_restore, "--list", str(archive)],
            capture_output=True,
            text=True,
            timeout=RESTORE_LIST_TIMEOUT_S,
            check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
        )
    except subprocess.TimeoutExpired:
        raise BackupError(_("pg_restore --list did not finish; nothing was kept.")) from None
    if done.returncode != 0:
        raise BackupError(
            _("pg_restore --list cannot read the archive (exit %(code)s); nothing was kept. %(err)s")
            % {
                "code": done.returncode,
                "err": " ".join(done.stderr.strip().splitlines()[-STDERR_TAIL_LINES:]),
            }
        )
    return toc_parse(done.stdout)


def toc_parse(listing: str) -> dict[str, Any]:
    """Summarise ``pg_restore --list`` output: entries per type, tables, tables with data."""
    counts: Counter[str] = Counter()
    tables: list[str] = []
    with_data: list[str] = []
    dumped_from = ""
    for line in listing.splitlines():
        if line.startswith(";"):
            if "Dumped from database version:" in line:
                dumped_from = line.split(":", 1)[1].strip()
            continue
        match = _TOC_ENTRY_RE.match(line.strip())
        if not match:
            continue
        rest = match["rest"]
        desc = next((d for d in _TOC_DESCS if rest.startswith(d + " ")), rest.split(" ", 1)[0])
        counts[desc] += 1
        if desc in ("TABLE", "TABLE DATA"):
            words = rest[len(desc) :].split()
            # "<schema> <name> <owner>"; a name with spaces keeps its middle words
            qualified = f"{words[0]}.{' '.join(words[1:-1])}" if len(words) >= 3 else " ".join(words)
            (tables if desc == "TABLE" else with_data).append(qualified)
    return {
        "entries": sum(counts.values()),
        "counts": dict(sorted(counts.items())),
        "tables": sorted(tables)[:TOC_TABLES_KEPT],
        "tables_with_data": sorted(with_data)[:TOC_TABLES_KEPT],
        "dumped_from": dumped_from,
    }


def _backup_keep(partial: Path, final: Path, result: dict[str, Any]) -> None:
    """Write the manifest, then give the verified dump its final name (and make both durable)."""
    manifest = final.with_name(final.name + MANIFEST_SUFFIX)
    manifest_partial = partial.with_name(partial.name + MANIFEST_SUFFIX)
    try:
        fd = os.open(manifest_partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        with open(partial, "rb") as dump:
            os.fsync(dump.fileno())
        os.rename(manifest_partial, manifest)
        os.rename(partial, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        for leftover in (manifest_partial, manifest if not final.exists() else None):
            if leftover is not None:
                with contextlib.suppress(OSError):
                    leftover.unlink()
        raise
