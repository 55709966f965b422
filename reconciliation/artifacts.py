"""Reconciliation run folders and their validation (runbook §1.3, ``validate-artifacts.sh``).

The runbook's script is not available; this module is the contract it checks. A run folder
is ``BILLING_OPS_RECONCILIATIONS_DIR/<RUN_ID>/`` and holds:

``missing_lines.csv`` (required)
    The lines to upsert, in the upsert's CSV contract: UTF-8 with or without a byte-order
    mark; LF or CRLF line ends; RFC 4180 quoting (a quoted field may hold commas, doubled
    quotes and newlines). The first record is the header and names exactly the columns
    ``invoice_id``, ``unit_id``, ``line_type``, ``description``, ``quantity``, ``amount``,
    in any order: a missing column, an unknown one (names are exact: ``Amount`` is not
    ``amount``) or a column named twice is a problem. Every data record has one field per
    header column; ``invoice_id``, ``unit_id``, ``line_type`` and ``description`` are not
    empty; ``quantity`` and ``amount`` are plain decimal numbers (``-12.5``: no thousands
    separator, no exponent, no NaN) that fit their columns, numeric(18,6) and
    numeric(18,2). An empty line is a problem; a field longer than 131,072 characters
    stops the reading.
``summary.json`` (required)
    A JSON object (UTF-8, with or without a byte-order mark) with at least ``run_id``, a
    string equal to the folder's name, and ``missing_lines_count``, a non-negative integer
    equal to the number of data records in missing_lines.csv as a CSV parser counts them
    (a newline inside a quoted field does not start a record). Other keys are kept as
    they are.

Anything else in the folder (logs, reports) is listed with its size and not checked.
Symbolic links are never followed: the required files must be regular files of the folder.

Validation is read-only, reads each file once, streaming (a CSV of millions of lines in
constant memory), and reports every problem with its file, line and column where they
apply (lines are the file's physical lines, 1 being the header; a record's line is the one
it starts on). Only the first ``MAX_PROBLEMS_LISTED`` problems are listed; the total is
always given. On success the job says ``Artifact validation passed`` and
``missing_lines_count: N``, as the runbook expects.

The operator picks a run folder from the list ``run_folders_list`` returns; a name is only
ever resolved by ``run_folder_path``, which accepts one plain folder name of the directory.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, BinaryIO

from django.conf import settings
from django.utils.translation import gettext as _

from billing_ops.environments import Environment
from billing_ops.formats import grouped
from billing_ops.models import Job
from billing_ops.services import Actor, JobContext, job_request
from reconciliation.csvfile import REQUIRED_COLUMNS, TEXT_LIMITS

CSV_FILE = "missing_lines.csv"
SUMMARY_FILE = "summary.json"
REQUIRED_FILES = (CSV_FILE, SUMMARY_FILE)
# The contract the upsert enforces (reconciliation.csvfile); here every problem is listed.
CSV_COLUMNS = REQUIRED_COLUMNS
CSV_TEXT_COLUMNS = tuple(TEXT_LIMITS)
# (precision, scale) of the numeric columns in public.invoice_lines.
CSV_NUMERIC_COLUMNS = {"quantity": (18, 6), "amount": (18, 2)}
# A run id is also a folder name: one path component, no leading dot.
RUN_FOLDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
MAX_PROBLEMS_LISTED = 1_000
MAX_FILES_LISTED = 1_000
SUMMARY_MAX_BYTES = 1 << 20
PROGRESS_EVERY_RECORDS = 50_000
# What PostgreSQL's numeric input takes (the upsert's COPY reads the same text): no NaN or
# Infinity, no thousands separators or decimal commas; an exponent (1e3) is a number.
_DECIMAL_RE = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")
UTF8_BOM = b"\xef\xbb\xbf"


class ArtifactError(Exception):
    """A run folder cannot be used (unknown name, gone, not a folder)."""


# --- The folders -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFolder:
    name: str
    modified_at: datetime
    files: int


def reconciliations_dir() -> Path:
    return Path(settings.RECONCILIATIONS_DIR)


def run_folders_list() -> list[RunFolder]:
    """The directory's run folders (plain subfolders with a run-id name), newest first."""
    base = reconciliations_dir()
    try:
        entries = list(os.scandir(base))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise ArtifactError(
            _("Cannot read %(path)s: %(why)s")
            % {"path": str(base), "why": exc.strerror or type(exc).__name__}
        ) from None
    folders = []
    for entry in entries:
        if not RUN_FOLDER_RE.match(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            files = sum(1 for _f in os.scandir(entry.path))
        except OSError:
            files = 0
        modified = datetime.fromtimestamp(entry.stat(follow_symlinks=False).st_mtime, tz=UTC)
        folders.append(RunFolder(name=entry.name, modified_at=modified, files=files))
    return sorted(folders, key=lambda f: (f.modified_at, f.name), reverse=True)


def run_folder_path(name: str) -> Path:
    """The run folder called ``name``; ArtifactError for anything but a plain folder name of
    the reconciliations directory (separators, ``..``, symlinks, missing folders)."""
    if not isinstance(name, str) or not RUN_FOLDER_RE.match(name):
        raise ArtifactError(_("%(name)r is not a run folder name.") % {"name": name})
    base = reconciliations_dir()
    path = base / name
    if path.is_symlink() or not path.is_dir() or path.resolve().parent != base.resolve():
        raise ArtifactError(
            _("There is no run folder %(name)s in %(base)s.") % {"name": name, "base": str(base)}
        )
    return path


# --- Validation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    file: str
    message: str
    line: int | None = None
    column: str | None = None


@dataclass
class Problems:
    listed: list[Problem] = field(default_factory=list)
    total: int = 0

    def add(self, file: str, message: str, *, line: int | None = None, column: str | None = None) -> None:
        self.total += 1
        if len(self.listed) < MAX_PROBLEMS_LISTED:
            self.listed.append(Problem(file=file, message=message, line=line, column=column))


@dataclass
class CsvReport:
    present: bool = False
    size_bytes: int = 0
    bom: bool = False
    line_endings: str = ""
    header: list[str] = field(default_factory=list)
    missing_columns: list[str] = field(default_factory=list)
    unknown_columns: list[str] = field(default_factory=list)
    duplicate_columns: list[str] = field(default_factory=list)
    data_rows: int = 0
    physical_lines: int = 0
    # False when reading stopped early (bad encoding, unparseable quoting): counts are partial.
    complete: bool = False


Progress = Callable[[int, int], None]


def artifacts_validate(folder: Path, *, progress: Progress | None = None) -> dict[str, Any]:
    """Check a run folder against the contract above; a JSON-serialisable report."""
    problems = Problems()
    files = _files_list(folder)
    kinds = {f["name"]: f["kind"] for f in files}
    for required in REQUIRED_FILES:
        if required not in kinds:
            problems.add(required, _("Required file is missing."))
        elif kinds[required] != "file":
            problems.add(
                required,
                _("Is a %(kind)s, not a regular file of the run folder; it is not read.")
                % {"kind": kinds[required]},
            )
    csv_report = CsvReport()
    if kinds.get(CSV_FILE) == "file":
        csv_report = csv_check(folder / CSV_FILE, problems, progress=progress)
    summary: dict[str, Any] = {"present": False}
    if kinds.get(SUMMARY_FILE) == "file":
        summary = _summary_check(folder / SUMMARY_FILE, folder.name, problems)
    count = summary.get("missing_lines_count")
    # Compared only with a count read to the end (a stopped read has its own problem).
    comparable = isinstance(count, int) and not isinstance(count, bool) and csv_report.complete
    if comparable and count != csv_report.data_rows:
        problems.add(
            SUMMARY_FILE,
            _("missing_lines_count is %(count)s but %(csv)s has %(rows)s data rows.")
            % {"count": count, "csv": CSV_FILE, "rows": csv_report.data_rows},
            column="missing_lines_count",
        )
    passed = problems.total == 0
    return {
        "run_folder": folder.name,
        "passed": passed,
        "message": (
            "Artifact validation passed"
            if passed
            else _("Artifact validation failed: %(n)s problem(s)") % {"n": problems.total}
        ),
        "files": files[:MAX_FILES_LISTED],
        "files_total": len(files),
        "csv": asdict(csv_report),
        "summary": summary,
        "missing_lines_count": count,
        "problems": [asdict(p) for p in problems.listed],
        "problems_total": problems.total,
    }


def _files_list(folder: Path) -> list[dict[str, Any]]:
    files = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_symlink():
            kind, size = "symbolic link", None
        elif entry.is_dir(follow_symlinks=False):
            kind, size = "folder", None
        elif entry.is_file(follow_symlinks=False):
            kind, size = "file", entry.stat(follow_symlinks=False).st_size
        else:
            kind, size = "special file", None
        files.append(
            {"name": entry.name, "kind": kind, "size_bytes": size, "required": entry.name in REQUIRED_FILES}
        )
    return files


class _Lines:
    """The file's physical lines, decoded one by one as UTF-8 (a BOM at the start dropped):
    a bad byte is reported on its own line, and memory stays flat whatever the file's size."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.number = 0
        self.bom = False
        self.crlf = 0
        self.lf = 0
        self.bytes_read = 0
        self.decode_error: tuple[int, str] | None = None

    def __iter__(self) -> Iterator[str]:
        for raw in self.handle:
            self.number += 1
            self.bytes_read += len(raw)
            if self.number == 1 and raw.startswith(UTF8_BOM):
                self.bom = True
                raw = raw[len(UTF8_BOM) :]
            if raw.endswith(b"\r\n"):
                self.crlf += 1
            elif raw.endswith(b"\n"):
                self.lf += 1
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.decode_error = (
                    self.number,
                    _("Not valid UTF-8 (byte 0x%(byte)02x at byte %(pos)s of the line); reading stopped.")
                    % {"byte": raw[exc.start], "pos": exc.start + 1},
                )
                return

    @property
    def endings(self) -> str:
        if self.crlf and self.lf:
            return "mixed"
        return "CRLF" if self.crlf else "LF"


def csv_check(path: Path, problems: Problems, *, progress: Progress | None = None) -> CsvReport:
    """Stream the CSV once: header, field counts, values, data rows (records, not lines)."""
    name = path.name
    report = CsvReport(present=True, size_bytes=path.stat().st_size)
    with open(path, "rb") as handle:
        lines = _Lines(handle)
        reader = csv.reader(lines, strict=True)
        columns: list[str] = []
        last_line = 0
        try:
            for record in reader:
                start, last_line = last_line + 1, reader.line_num
                if not columns and not report.header:
                    report.header = record
                    columns = _header_check(record, name, problems, report)
                    if not columns:
                        break
                    continue
                report.data_rows += 1
                _record_check(record, columns, name, start, problems)
                if progress and report.data_rows % PROGRESS_EVERY_RECORDS == 0:
                    progress(lines.bytes_read, report.size_bytes)
            else:
                report.complete = lines.decode_error is None
        except csv.Error as exc:
            if lines.decode_error is None:  # else the bad byte cut a record short: one problem
                problems.add(
                    name, _("Unreadable CSV: %(why)s; reading stopped.") % {"why": exc}, line=reader.line_num
                )
        if lines.decode_error:
            problems.add(name, lines.decode_error[1], line=lines.decode_error[0])
        report.bom, report.line_endings, report.physical_lines = lines.bom, lines.endings, lines.number
        if not report.header and lines.decode_error is None and report.complete:
            problems.add(name, _("The file is empty: no header row."), line=1)
            report.complete = False
    if progress:
        progress(report.size_bytes, report.size_bytes)
    return report


def _header_check(header: list[str], name: str, problems: Problems, report: CsvReport) -> list[str]:
    """The header's columns if it is usable, else [] (each problem recorded)."""
    if header == [] or header == [""]:
        problems.add(name, _("The header row is empty."), line=1)
        return []
    seen: set[str] = set()
    for column in header:
        if column in seen and column not in report.duplicate_columns:
            report.duplicate_columns.append(column)
            problems.add(name, _("Column named more than once in the header."), line=1, column=column)
        seen.add(column)
        if column not in CSV_COLUMNS:
            report.unknown_columns.append(column)
            hint = next((c for c in CSV_COLUMNS if c == column.strip().lower()), None)
            message = _("Unknown column.") + (
                " " + _("Did you mean %(name)s? Names are exact.") % {"name": hint} if hint else ""
            )
            problems.add(name, message, line=1, column=column)
    for column in CSV_COLUMNS:
        if column not in seen:
            report.missing_columns.append(column)
            problems.add(name, _("Required column is missing from the header."), line=1, column=column)
    return header


def _record_check(record: list[str], columns: list[str], name: str, line: int, problems: Problems) -> None:
    if not record:
        problems.add(name, _("Empty line."), line=line)
        return
    if len(record) != len(columns):
        problems.add(
            name,
            _("%(got)s fields where the header has %(want)s.") % {"got": len(record), "want": len(columns)},
            line=line,
        )
        return
    for column, value in zip(columns, record, strict=True):
        if "\x00" in value:
            problems.add(name, _("Contains a NUL character."), line=line, column=column)
        elif column in CSV_TEXT_COLUMNS and not value.strip():
            problems.add(name, _("Empty; a value is required."), line=line, column=column)
        elif column in CSV_TEXT_COLUMNS and len(value) > TEXT_LIMITS[column]:
            problems.add(
                name,
                _("Longer than %(n)s characters.") % {"n": grouped(TEXT_LIMITS[column])},
                line=line,
                column=column,
            )
        elif column in CSV_NUMERIC_COLUMNS:
            why = _numeric_problem(value, *CSV_NUMERIC_COLUMNS[column])
            if why:
                problems.add(name, why, line=line, column=column)


def _numeric_problem(value: str, precision: int, scale: int) -> str:
    if not _DECIMAL_RE.match(value):
        shown = value if len(value) <= 40 else value[:40] + "…"
        return _("%(value)r is not a decimal number.") % {"value": shown}
    try:
        rounded = Decimal(value.strip()).quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)
    except InvalidOperation:
        return _("%(value)r is too long a number.") % {"value": value[:40]}
    if rounded < 0:
        return _("%(value)s is negative.") % {"value": value.strip()}
    if abs(rounded) >= Decimal(10) ** (precision - scale):
        return _("%(value)s does not fit numeric(%(p)s,%(s)s).") % {
            "value": value.strip(),
            "p": precision,
            "s": scale,
        }
    return ""


def _summary_check(path: Path, folder_name: str, problems: Problems) -> dict[str, Any]:
    name = path.name
    summary: dict[str, Any] = {"present": True, "size_bytes": path.stat().st_size}
    if summary["size_bytes"] > SUMMARY_MAX_BYTES:
        problems.add(name, _("Larger than %(n)s bytes; not read.") % {"n": SUMMARY_MAX_BYTES})
        return summary
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        problems.add(name, _("Not valid UTF-8."), line=line)
        return summary
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.add(
            name,
            _("Not valid JSON: %(why)s (character %(col)s of the line).")
            % {"why": exc.msg, "col": exc.colno},
            line=exc.lineno,
        )
        return summary
    if not isinstance(data, dict):
        problems.add(name, _("Must be a JSON object."), line=1)
        return summary
    summary["keys"] = sorted(str(k) for k in data)
    run_id = data.get("run_id")
    if "run_id" not in data:
        problems.add(name, _("Required key is missing."), column="run_id")
    elif not isinstance(run_id, str) or not run_id.strip():
        problems.add(name, _("Must be a non-empty string."), column="run_id")
    else:
        summary["run_id"] = run_id
        if run_id != folder_name:
            problems.add(
                name,
                _("run_id %(run_id)r is not the folder's name %(folder)r.")
                % {"run_id": run_id, "folder": folder_name},
                column="run_id",
            )
    count = data.get("missing_lines_count")
    if "missing_lines_count" not in data:
        problems.add(name, _("Required key is missing."), column="missing_lines_count")
    elif not isinstance(count, int) or isinstance(count, bool) or count < 0:
        problems.add(
            name,
            _("Must be a non-negative integer, not %(value)s.") % {"value": json.dumps(count)[:40]},
            column="missing_lines_count",
        )
    else:
        summary["missing_lines_count"] = count
    return summary


# --- The job -----------------------------------------------------------------------------------


def artifact_validate_request(*, actor: Actor, env: Environment, run_folder: str) -> Job:
    """Queue the validation of a run folder (operators). The folder must be one of the
    directory's run folders now; the job checks again when it runs."""
    run_folder_path(run_folder)
    return job_request(
        actor=actor, kind="artifact_validate", environment=env.key, params={"run_folder": run_folder}
    )


def artifact_validate(ctx: JobContext) -> dict[str, Any]:
    """The ``artifact_validate`` job: validate the chosen run folder (reads files only)."""
    folder = run_folder_path(str(ctx.params.get("run_folder", "")))
    ctx.log(_("Validating %(folder)s.") % {"folder": folder.name})

    def progress(done: int, total: int) -> None:
        ctx.check_cancel()
        ctx.progress(done, total, _("Reading %(file)s") % {"file": CSV_FILE})

    report = artifacts_validate(folder, progress=progress)
    if report["passed"]:
        ctx.log("Artifact validation passed")
        ctx.log(f"missing_lines_count: {report['missing_lines_count']}")
    else:
        for problem in report["problems"][:20]:
            ctx.log(problem_text(problem), level="error")
        if report["problems_total"] > 20:
            ctx.log(
                _("… and %(n)s more (see the result).") % {"n": report["problems_total"] - 20}, level="error"
            )
        ctx.log(report["message"], level="error")
    return report


def problem_text(problem: dict[str, Any]) -> str:
    where = problem["file"]
    if problem.get("line"):
        where += f":{problem['line']}"
    if problem.get("column"):
        where += f" [{problem['column']}]"
    return f"{where}: {problem['message']}"
