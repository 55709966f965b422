"""Reading the audit trails: the dashboard's entries (filters, CSV export), verifying a
hash chain, the dashboard's own or an environment's ``public.audit_logs``, and the
verifications done so far (jobs of ``audit.verification``).

Verification streams the rows in ``created_at`` order through a server-side cursor (in a
transaction, so PostgreSQL streams it instead of materialising a held cursor), so memory
stays constant however long the chain is. Each row is checked twice:

* **content**: its hash is recomputed with ``audit.chain`` (every dashboard entry; an
  environment's rows only when they carry our ``hash_scheme``, other writers' formula
  being unknown);
* **linkage**: its ``previous_hash`` should be the ``hash`` of the row before it.

Telling *what* happened from a broken link needs more than the previous row, so the walk
keeps a window of the last ``LINK_WINDOW_ROWS`` rows and judges a row only when it leaves
the window, once the rows around it have been seen. Where ``previous_hash`` points tells
the story:

* to the row just before: intact;
* to a row further back: the rows in between are *skipped over*. A skipped row that no
  genuine row links to (nothing, or only other intruders: two forgeries in a row) is
  **row inserted**. A skipped row that a genuine row links to is out of place: see next;
* to a row that comes *later* in ``created_at`` order: the link runs backwards in time, and
  both ends are **rows swapped** (for a row moved further, its neighbours on the chain are
  reported too: the order around it contradicts their links);
* to no row in the window: looked up in the whole table where ``hash`` and
  ``previous_hash`` are indexed (the dashboard's; an environment's are not, so there the
  window is the limit). Found far away: **rows swapped**; found nowhere: **row deleted**,
  reported at the row after the gap. A row before it that was rewritten *and* re-hashed
  leaves the same evidence, which the detail says;
* empty, though rows come before it: those rows are intruders if nothing links to them
  (forged ahead of the first entry), otherwise **link broken**.

A row whose hash does not recompute is **content changed**. Recomputing with another
``previous_hash`` refines what the links seem to say, so one altered column is reported
once, at its row:

* the row recomputes with the previous row's hash as ``previous_hash``: only that column
  was altered; the link is taken as right (no insertion or deletion is reported);
* the previous row recomputes to the hash this row links to: only the previous row's
  ``hash`` column was altered; the link is taken as right;
* the row recomputes with its predecessor's own ``previous_hash``: it was relinked to a
  forged predecessor, which is reported as **row inserted**.

What a chain without a secret cannot show: a forger who rewrites a row and re-hashes every
row after it, or who appends at the end, or who deletes the newest rows, leaves a valid
chain. Keep the reported head (id and hash) somewhere else and compare it later.
"""

from __future__ import annotations

import csv
import io
import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from django.db import connection, connections, transaction
from django.db.models import QuerySet, TextField, Value
from django.db.models.functions import Coalesce
from django.utils.translation import gettext as _

from audit.chain import HASH_SCHEME, chain_hash, content_hash, format_created_at
from audit.models import AuditEntry
from audit.services import CHAIN_DATESTYLE, audit_entry_fields
from billing_ops.environments import Environment
from billing_ops.exports import csv_cell
from billing_ops.job_kinds import CHAIN_VERIFY
from billing_ops.models import ACTIVE_STATUSES, Job, JobStatus

# Rows kept around the one being judged; a row moved further than this is told apart from a
# deleted one only where the hash column is indexed (the dashboard's).
LINK_WINDOW_ROWS = 64
# Rows fetched per round trip of the server-side cursor.
VERIFY_CHUNK_ROWS = 2_000
# Damaged rows listed in a report; beyond this only counted.
MAX_REPORTED_DAMAGES = 1_000
# A verification tells its caller (a job's progress, its cancel check) this often.
VERIFY_PROGRESS_ROWS = 50_000
HASH_SHOWN_CHARS = 12

# --- Browsing and export -------------------------------------------------------------------


def audit_entries(
    *,
    action: str = "",
    action_prefix: str = "",
    actor_name: str = "",
    environment: str = "",
    object_type: str = "",
    object_id: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[AuditEntry]:
    """The dashboard's audit entries, newest first; blank filters are ignored.

    ``action_prefix`` ("job.") selects a family of actions; ``since`` is inclusive and
    ``until`` exclusive. No ``select_related``: tables show ``actor_name``, which outlives
    the user.
    """
    entries = AuditEntry.objects.all()
    if action:
        entries = entries.filter(action=action)
    if action_prefix:
        entries = entries.filter(action__startswith=action_prefix)
    if actor_name:
        entries = entries.filter(actor_name=actor_name)
    if environment:
        entries = entries.filter(environment=environment)
    if object_type:
        entries = entries.filter(object_type=object_type)
    if object_id:
        entries = entries.filter(object_id=object_id)
    if since is not None:
        entries = entries.filter(created_at__gte=since)
    if until is not None:
        entries = entries.filter(created_at__lt=until)
    return entries.order_by("-created_at")


def audit_actions() -> list[str]:
    """Every action the trail holds, sorted (the filter's choices). A loose index scan on
    ``audit_entry_action_idx``: one index probe per distinct action, not a pass over every
    entry."""
    table = connection.ops.quote_name(AuditEntry._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            WITH RECURSIVE actions(action) AS (
                (SELECT action FROM {table} ORDER BY action LIMIT 1)
                UNION ALL
                SELECT (SELECT e.action FROM {table} e WHERE e.action > a.action ORDER BY e.action LIMIT 1)
                  FROM actions a WHERE a.action IS NOT NULL
            )
            SELECT action FROM actions WHERE action IS NOT NULL
            """
        )
        return [row[0] for row in cursor.fetchall()]


def chain_verifications(env: Environment | None) -> QuerySet[Job]:
    """The verification jobs of one chain (an environment's, or the dashboard's with
    ``env`` None), newest first."""
    return (
        Job.objects.filter(kind=CHAIN_VERIFY.name, environment=env.key if env is not None else "")
        .select_related("requested_by")
        .order_by("-id")
    )


def chain_verification_last(env: Environment | None) -> Job | None:
    """The chain's last verification that read it to the end (intact or not)."""
    return chain_verifications(env).filter(status=JobStatus.SUCCEEDED).order_by("-finished_at").first()


def chain_verification_active(env: Environment | None) -> Job | None:
    return chain_verifications(env).filter(status__in=ACTIVE_STATUSES).first()


AUDIT_CSV_COLUMNS = (
    "id",
    "created_at",
    "actor",
    "action",
    "environment",
    "object_type",
    "object_id",
    "params",
    "outcome",
    "hash",
    "previous_hash",
)


def audit_csv_rows(entries: Iterable[AuditEntry]) -> Iterator[list[str]]:
    """The header, then one row per entry, for ``csv.writer`` (stream it: pass
    ``audit_entries(...).iterator()``). ``created_at`` is written as the chain hashes it
    (UTC, microseconds), params and outcome as sorted JSON; cells a spreadsheet would run as
    a formula get a leading ``'``."""
    yield list(AUDIT_CSV_COLUMNS)
    for entry in entries:
        yield [
            csv_cell(value)
            for value in (
                entry.pk,
                format_created_at(entry.created_at),
                entry.actor_name,
                entry.action,
                entry.environment,
                entry.object_type,
                entry.object_id,
                json.dumps(entry.params, sort_keys=True, ensure_ascii=False),
                json.dumps(entry.outcome, sort_keys=True, ensure_ascii=False),
                entry.hash,
                entry.previous_hash,
            )
        ]


def audit_csv(entries: Iterable[AuditEntry]) -> str:
    """The whole export as text (small exports and tests; stream big ones row by row)."""
    buffer = io.StringIO()
    csv.writer(buffer).writerows(audit_csv_rows(entries))
    return buffer.getvalue()


# --- Verification ---------------------------------------------------------------------------


class DamageKind(StrEnum):
    CONTENT_CHANGED = "content changed"
    ROW_DELETED = "row deleted"
    ROW_INSERTED = "row inserted"
    ROWS_SWAPPED = "rows swapped"
    LINK_BROKEN = "link broken"


@dataclass(frozen=True)
class Damage:
    entry_id: int
    kind: DamageKind
    detail: str


@dataclass(frozen=True)
class ChainPoint:
    entry_id: int
    hash: str


@dataclass
class ChainReport:
    """What a verification found. ``verified_head`` is the last entry of the intact
    beginning of the chain (the chain's head when nothing is damaged)."""

    chain: str
    entries: int = 0
    recomputed: int = 0
    damaged_entries: int = 0
    damages: list[Damage] = field(default_factory=list)
    # Every damage found per kind, listed or not (damages stops at MAX_REPORTED_DAMAGES).
    kind_counts: dict[DamageKind, int] = field(default_factory=dict)
    first_broken: ChainPoint | None = None
    verified_head: ChainPoint | None = None
    head: ChainPoint | None = None

    @property
    def intact(self) -> bool:
        return self.damaged_entries == 0

    @property
    def linkage_only(self) -> int:
        return self.entries - self.recomputed


# Called with the number of rows read so far, every VERIFY_PROGRESS_ROWS rows; it may raise
# to stop the verification (a cancelled job).
ProgressCallback = Callable[[int], None]


def dashboard_chain_verify(
    *, chunk_rows: int = VERIFY_CHUNK_ROWS, progress: ProgressCallback | None = None
) -> ChainReport:
    """Verify the dashboard's own audit chain (``default``), in constant memory."""
    walk = _ChainWalk(ChainReport(chain="dashboard"), index=_DashboardIndex(), progress=progress)
    with transaction.atomic():
        _read_times_as_django_does(connection)
        # created_at is unique: its index gives the order without a sort.
        for entry in AuditEntry.objects.order_by("created_at").iterator(chunk_size=chunk_rows):
            walk.feed(
                entry_id=entry.pk,
                hash=entry.hash,
                previous_hash=entry.previous_hash,
                rehash=_rehasher(audit_entry_fields(entry)),
            )
    return walk.finish()


# The verification's read of an environment's audit_logs. Only rows with our hash_scheme
# need their content (to recompute the hash); other writers' rows come as id and links
# alone, so that a chain of mostly foreign rows is not slowed by decoding their JSON and
# times. ``new_data ->> 'hash_scheme'`` is what ``audit.chain.is_ours`` tests: null for a
# non-object or a missing key.
ENVIRONMENT_CHAIN_SQL = """
    SELECT id, hash, previous_hash, ours,
           CASE WHEN ours THEN action END, CASE WHEN ours THEN record_id END,
           CASE WHEN ours THEN old_data END, CASE WHEN ours THEN new_data END,
           CASE WHEN ours THEN created_at END
      FROM (SELECT *, coalesce(new_data ->> 'hash_scheme' = %s, false) AS ours FROM public.audit_logs) AS rows
     ORDER BY created_at, id
"""


def environment_chain_verify(
    *, env: Environment, chunk_rows: int = VERIFY_CHUNK_ROWS, progress: ProgressCallback | None = None
) -> ChainReport:
    """Verify an environment's ``public.audit_logs`` (runbook §5.4, over every row): linkage
    of all rows, and the hash of the rows we wrote (``hash_scheme``), in constant memory.
    Its ``hash`` and ``previous_hash`` have no index: the walk searches its window only.

    Read with raw SQL on the environment's own connection (``AuditLog`` mirrors the
    columns; ``ENVIRONMENT_CHAIN_SQL`` says why not all of them for every row), through a
    server-side cursor. That connection returns jsonb as text, as Django's JSONField reads
    it, hence the ``json.loads``."""
    walk = _ChainWalk(ChainReport(chain=f"environment {env.key}"), index=None, progress=progress)
    db = connections[env.alias]
    with transaction.atomic(using=env.alias):
        _read_times_as_django_does(db)
        with db.chunked_cursor() as cursor:
            cursor.execute(ENVIRONMENT_CHAIN_SQL, [HASH_SCHEME])
            while rows := cursor.fetchmany(chunk_rows):
                for entry_id, digest, previous_hash, ours, action, record_id, old_data, new_data, at in rows:
                    rehash = None
                    if ours:
                        fields = {
                            "action": action,
                            "record_id": record_id,
                            "old_data": _json_value(old_data),
                            "new_data": _json_value(new_data),
                            "created_at": at,
                        }
                        rehash = _rehasher(fields)
                    walk.feed(entry_id=entry_id, hash=digest, previous_hash=previous_hash, rehash=rehash)
    return walk.finish()


def _json_value(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def _read_times_as_django_does(db: Any) -> None:
    """Whatever the session's TimeZone and DateStyle, read times right (see CHAIN_DATESTYLE)."""
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT set_config('TimeZone', %s, true), set_config('DateStyle', %s, true)",
            [db.timezone_name, CHAIN_DATESTYLE],
        )


def _rehasher(fields: dict[str, Any]) -> Callable[[str | None], str]:
    """The row's hash as it would be with another ``previous_hash``."""

    fields = {k: v for k, v in fields.items() if k != "previous_hash"}
    content = content_hash(**fields)

    def rehash(previous_hash: str | None) -> str:
        return chain_hash(previous_hash, content)

    return rehash


class _DashboardIndex:
    """Point lookups beyond the window, on the dashboard table's unique indexes."""

    def entry_with_hash(self, digest: str) -> int | None:
        return AuditEntry.objects.filter(hash=digest).values_list("id", flat=True).first()

    def entry_linking_to(self, digest: str) -> int | None:
        # The expression of the audit_entry_one_successor index, so that it is used.
        return (
            AuditEntry.objects.annotate(
                linked_to=Coalesce("previous_hash", Value(""), output_field=TextField())
            )
            .filter(linked_to=digest)
            .values_list("id", flat=True)
            .first()
        )


def _short(digest: str | None) -> str:
    return "(empty)" if digest is None else digest[:HASH_SHOWN_CHARS] + "…"


# How a row's previous_hash was resolved while it is in the window.
LINK_OK = "ok"  # the row before it (possibly after repairing an altered column), or empty for the first
LINK_BACK = "back"  # a row further back: the ones in between are skipped over
LINK_LATER = "later"  # a row that came after it: the link runs backwards in time
LINK_PENDING = "pending"  # not seen (yet)
LINK_EMPTY = "empty"  # empty, though rows come before it


@dataclass(eq=False)
class _Slot:
    position: int
    entry_id: int
    hash: str
    previous_hash: str | None
    computed_hash: str | None  # recomputed from the row; None for another writer's row
    link: str = LINK_OK
    linked_from: list[_Slot] = field(default_factory=list)  # rows whose previous_hash is its hash
    skipped: bool = False
    relinked_by: int | None = None  # a later row was relinked over this (forged) one
    inserted: bool | None = None  # the verdict, once judged
    findings: dict[DamageKind, str] = field(default_factory=dict)

    @property
    def content_ok(self) -> bool | None:
        return None if self.computed_hash is None else self.computed_hash == self.hash


class _ChainWalk:
    """The classification described in the module docstring, one row at a time. Memory:
    the window, and the damages listed (at most MAX_REPORTED_DAMAGES)."""

    def __init__(
        self,
        report: ChainReport,
        *,
        index: _DashboardIndex | None,
        window_rows: int = LINK_WINDOW_ROWS,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.report = report
        self.index = index
        self.progress = progress
        self.window_rows = window_rows
        self.window: deque[_Slot] = deque()
        self.by_hash: dict[str, _Slot] = {}
        self.waiting: dict[str, list[_Slot]] = {}  # previous_hash -> rows waiting for that row
        self.position = 0
        # The last row judged, and the last one of the intact beginning (the report's head
        # and verified head, made when the walk finishes rather than once per row).
        self.last_judged: _Slot | None = None
        self.last_verified: _Slot | None = None

    def feed(
        self,
        *,
        entry_id: int,
        hash: str,
        previous_hash: str | None,
        rehash: Callable[[str | None], str] | None,
    ) -> None:
        computed = None if rehash is None else rehash(previous_hash)
        slot = _Slot(self.position, entry_id, hash, previous_hash, computed)
        self.position += 1
        self.report.entries += 1
        self.report.recomputed += rehash is not None
        if self.progress is not None and self.position % VERIFY_PROGRESS_ROWS == 0:
            self.progress(self.position)

        # Rows that came earlier and link to this one: their links run backwards in time.
        for earlier in self.waiting.pop(hash, ()) if self.waiting else ():
            earlier.link = LINK_LATER
            slot.linked_from.append(earlier)
            for one in (earlier, slot):
                one.findings[DamageKind.ROWS_SWAPPED] = _(
                    "#%(id)s links to #%(later)s, which comes after it in created_at order"
                ) % {"id": earlier.entry_id, "later": slot.entry_id}

        last = self.window[-1] if self.window else None
        expected = last.hash if last else None
        predecessor: _Slot | None = None
        if previous_hash == expected:
            predecessor = last
        elif rehash is not None and rehash(expected) == hash:
            # Only its previous_hash was altered: the row really follows `last`.
            slot.findings[DamageKind.CONTENT_CHANGED] = _(
                "its previous_hash was changed from %(old)s to %(new)s"
            ) % {"old": _short(expected), "new": _short(previous_hash)}
            predecessor = last
        elif last is not None and last.content_ok is False and last.computed_hash == previous_hash:
            # The row before recomputes to what this one links to: only its hash column was altered.
            last.findings[DamageKind.CONTENT_CHANGED] = _(
                "its hash column was changed; the row itself still recomputes to %(hash)s, "
                "which #%(id)s links to"
            ) % {"hash": _short(previous_hash), "id": entry_id}
            predecessor = last
        elif previous_hash is None:
            self._link_empty(slot)
        elif (found := self.by_hash.get(previous_hash)) is not None:
            slot.link = LINK_BACK
            predecessor = found
            for between in reversed(self.window):
                if between.position <= found.position:
                    break
                between.skipped = True
        else:
            slot.link = LINK_PENDING
            self.waiting.setdefault(previous_hash, []).append(slot)

        if predecessor is not None:
            predecessor.linked_from.append(slot)
            if (
                rehash is not None
                and slot.content_ok is False
                and DamageKind.CONTENT_CHANGED not in slot.findings
                and rehash(predecessor.previous_hash) == hash
            ):
                # It was written after the predecessor's predecessor and relinked since.
                predecessor.relinked_by = slot.entry_id
                slot.findings[DamageKind.CONTENT_CHANGED] = _(
                    "its previous_hash was changed to link to #%(id)s"
                ) % {"id": predecessor.entry_id}

        self.window.append(slot)
        self.by_hash.setdefault(hash, slot)
        if len(self.window) > self.window_rows:
            self._judge(self.window.popleft())

    def _link_empty(self, slot: _Slot) -> None:
        """An empty previous_hash after other rows: either they were forged ahead of the
        real first entry (nothing links to any of them), or the link is broken."""
        if not self.window:
            return
        at_start = self.window[0].position == 0
        if at_start and not any(row.linked_from for row in self.window):
            for row in self.window:
                row.skipped = True
        else:
            slot.link = LINK_EMPTY

    def finish(self) -> ChainReport:
        while self.window:
            self._judge(self.window.popleft())
        for name, slot in (("head", self.last_judged), ("verified_head", self.last_verified)):
            if slot is not None:
                setattr(self.report, name, ChainPoint(slot.entry_id, slot.hash))
        return self.report

    def _intruder(self, slot: _Slot, seen: set[int]) -> bool:
        """Inserted: relinked over, or skipped over with nothing but intruders linking to it
        (two forged rows in a row: the second links to the first)."""
        if slot.inserted is not None:
            return slot.inserted
        if slot.relinked_by is not None:
            return True
        if not slot.skipped or slot.position in seen:
            return False
        seen.add(slot.position)
        if not slot.linked_from and self.index is not None:
            # Something far away may link to it: then it is out of place, not forged.
            return self.index.entry_linking_to(slot.hash) is None
        return all(self._intruder(row, seen) for row in slot.linked_from)

    def _judge(self, slot: _Slot) -> None:
        if self.by_hash.get(slot.hash) is slot:
            del self.by_hash[slot.hash]
        if slot.link == LINK_PENDING:
            assert slot.previous_hash is not None
            waiting = self.waiting.get(slot.previous_hash, [])
            if slot in waiting:
                waiting.remove(slot)
            if not waiting:
                self.waiting.pop(slot.previous_hash, None)

        findings = slot.findings
        slot.inserted = self._intruder(slot, set())
        if slot.inserted:
            findings = {DamageKind.ROW_INSERTED: self._inserted_detail(slot)}
        else:
            if slot.content_ok is False and DamageKind.CONTENT_CHANGED not in findings:
                findings[DamageKind.CONTENT_CHANGED] = _("its hash does not recompute from the row")
            if slot.link == LINK_PENDING:
                kind, detail = self._missing_predecessor(slot)
                findings.setdefault(kind, detail)
            elif slot.link == LINK_EMPTY:
                findings[DamageKind.LINK_BROKEN] = _("its previous_hash is empty, but entries come before it")
        slot.linked_from = []  # judged: let go of the rows around it
        self._record(slot, findings)

    def _inserted_detail(self, slot: _Slot) -> str:
        if slot.relinked_by is not None:
            return _("no entry linked to it until #%(id)s was relinked to it") % {"id": slot.relinked_by}
        if slot.content_ok is False:
            return _(
                "no genuine entry links to it; the entry after it links past it "
                "(and its hash does not recompute)"
            )
        return _("no genuine entry links to it; the entry after it links past it")

    def _missing_predecessor(self, slot: _Slot) -> tuple[DamageKind, str]:
        assert slot.previous_hash is not None
        found = self.index.entry_with_hash(slot.previous_hash) if self.index else None
        if found is not None:
            return (
                DamageKind.ROWS_SWAPPED,
                _("it links to #%(id)s, which is far from it in created_at order") % {"id": found},
            )
        short = _short(slot.previous_hash)
        if self.index is None:  # the window was all we could search
            values = {"hash": short, "n": self.window_rows}
            missing = _("it links to %(hash)s, which none of the %(n)s entries around it has") % values
            causes = _("deleted, rewritten and re-hashed, or moved more than %(n)s entries away") % values
        else:
            missing = _("it links to %(hash)s, which no entry has") % {"hash": short}
            causes = _("deleted, or rewritten and re-hashed")
        if slot.position == 0:
            return DamageKind.ROW_DELETED, _("entries before the first one were deleted: %(missing)s") % {
                "missing": missing
            }
        return DamageKind.ROW_DELETED, _("the entry before it is missing (%(causes)s): %(missing)s") % {
            "causes": causes,
            "missing": missing,
        }

    def _record(self, slot: _Slot, findings: dict[DamageKind, str]) -> None:
        report = self.report
        self.last_judged = slot
        if not findings:
            if report.first_broken is None:
                self.last_verified = slot
            return
        report.damaged_entries += 1
        if report.first_broken is None:
            report.first_broken = ChainPoint(slot.entry_id, slot.hash)
        for kind in DamageKind:
            if kind not in findings:
                continue
            report.kind_counts[kind] = report.kind_counts.get(kind, 0) + 1
            if len(report.damages) < MAX_REPORTED_DAMAGES:
                report.damages.append(Damage(slot.entry_id, kind, findings[kind]))
