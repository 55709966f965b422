"""The reconciliation CSV contract, and where a file breaks it.

A file of missing invoice lines is:

- UTF-8, with or without a byte-order mark; lines end in LF or CRLF;
- comma-separated, fields quoted with ``"`` where they hold commas, quotes or newlines
  (RFC 4180; a quote inside a quoted field is doubled);
- a header row naming exactly the columns ``invoice_id``, ``unit_id``, ``line_type``,
  ``description``, ``quantity`` and ``amount``, in any order (an unknown or repeated
  name is an error, by name);
- then one line per invoice line (an empty line is an error, at the end of the file too):
  the four text columns not blank and at most ``TEXT_LIMITS`` characters; ``quantity``
  and ``amount`` plain decimal numbers (``12.5``, ``-`` not allowed, no thousands
  separators or decimal commas) that fit ``numeric(18, 6)`` and ``numeric(18, 2)``; not
  negative (an exponent, ``1e3``, is read as PostgreSQL reads it).

The header is checked here, in Python, before anything touches a database. The rows are
checked by PostgreSQL while COPY streams them into a typed temporary table whose column
types and constraints are this contract (``STAGING_TABLE_SQL``): the first bad value
stops the COPY, and ``copy_error`` turns PostgreSQL's error into the line and column it
names. Nothing has been written to the environment at that point.

Line numbers are the file's lines, the header being line 1. PostgreSQL's COPY counts
records (a quoted field that spans lines is one), so the error path maps its record
number to the line where that record starts by reading the file up to it.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from billing_ops.formats import grouped

REQUIRED_COLUMNS = ("invoice_id", "unit_id", "line_type", "description", "quantity", "amount")
TEXT_LIMITS = {"invoice_id": 200, "unit_id": 200, "line_type": 100, "description": 2000}
# A header longer than this is not a header of this contract (a million columns, one huge field).
MAX_HEADER_BYTES = 64 * 1024

NORMALIZED_SQL = r"regexp_replace(lower(trim(description)), '\s+', ' ', 'g')"  # runbook §1.2, §3
STAGING_TABLE = "tmp_invoice_lines"  # the runbook's name (§5.2 looks for it in pg_stat_activity)
STAGING_TABLE_SQL = f"""
CREATE TEMPORARY TABLE {STAGING_TABLE} (
    record       bigint GENERATED ALWAYS AS IDENTITY,
    invoice_id   varchar({TEXT_LIMITS["invoice_id"]}) NOT NULL
                 CONSTRAINT invoice_id_empty CHECK (btrim(invoice_id) <> ''),
    unit_id      varchar({TEXT_LIMITS["unit_id"]}) NOT NULL
                 CONSTRAINT unit_id_empty CHECK (btrim(unit_id) <> ''),
    line_type    varchar({TEXT_LIMITS["line_type"]}) NOT NULL
                 CONSTRAINT line_type_empty CHECK (btrim(line_type) <> ''),
    description  varchar({TEXT_LIMITS["description"]}) NOT NULL
                 CONSTRAINT description_empty CHECK (btrim(description) <> ''),
    quantity     numeric(18, 6) NOT NULL CONSTRAINT quantity_negative CHECK (quantity >= 0)
                                 CONSTRAINT quantity_nan CHECK (quantity <> 'NaN'),
    amount       numeric(18, 2) NOT NULL CONSTRAINT amount_negative CHECK (amount >= 0)
                                 CONSTRAINT amount_nan CHECK (amount <> 'NaN'),
    -- The runbook's normalization (§1.2, §3), computed as COPY stores each row.
    nd           text GENERATED ALWAYS AS ({NORMALIZED_SQL}) STORED
) ON COMMIT DROP
"""

_MAGIC = {
    b"PK\x03\x04": "a ZIP archive",
    b"\x1f\x8b": "a gzip archive",
    b"\xff\xfe": "UTF-16 (little-endian) text",
    b"\xfe\xff": "UTF-16 (big-endian) text",
    b"%PDF": "a PDF document",
    b"\xd0\xcf\x11\xe0": "an old Excel/Office document",
}
UTF8_BOM = b"\xef\xbb\xbf"


class CsvError(ValueError):
    """What is wrong with the file, and where."""

    def __init__(self, message: str, *, file: str, line: int | None = None, column: str | None = None):
        self.file, self.line, self.column, self.problem = file, line, column, message
        where = file
        if line is not None:
            where += _(", line %(n)s") % {"n": line}
        if column is not None:
            where += _(", column %(name)s") % {"name": column}
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class CsvHeader:
    columns: tuple[str, ...]  # the contract's names, in the file's order
    data_offset: int  # the byte where the first data line starts (after BOM and header)


def read_header(path: Path, *, name: str | None = None, max_bytes: int | None = None) -> CsvHeader:
    """Check the file's size, kind, encoding and header; say exactly what is wrong."""
    name = name or path.name
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise CsvError(f"the file is {size:,} bytes; the limit is {max_bytes:,}", file=name)
    if size == 0:
        raise CsvError("the file is empty (a header row is required)", file=name)
    with path.open("rb") as f:
        head = f.read(MAX_HEADER_BYTES + 1)
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            raise CsvError(f"this is {kind}, not a UTF-8 CSV file", file=name, line=1)
    start = len(UTF8_BOM) if head.startswith(UTF8_BOM) else 0
    end = head.find(b"\n", start)
    if end < 0:
        if len(head) > MAX_HEADER_BYTES:
            raise CsvError(f"the header row is longer than {MAX_HEADER_BYTES:,} bytes", file=name, line=1)
        end = len(head)
    raw = head[start:end]
    if b"\x00" in raw:
        raise CsvError(
            "the header row contains NUL bytes (is this UTF-16 or a binary file?)", file=name, line=1
        )
    try:
        text = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise CsvError(
            f"the header row is not valid UTF-8 "
            f"(byte 0x{raw[exc.start]:02x} at byte {start + exc.start + 1})",
            file=name,
            line=1,
        ) from None
    if not text.strip():
        raise CsvError("the first line is empty; it must be the header row", file=name, line=1)
    try:
        rows = list(csv.reader(io.StringIO(text), strict=True))
    except csv.Error as exc:
        raise CsvError(f"the header row is not valid CSV ({exc})", file=name, line=1) from None
    if len(rows) != 1:
        raise CsvError("the header row is not valid CSV (an unterminated quote?)", file=name, line=1)
    names = [c.strip() for c in rows[0]]
    if len(names) == 1 and re.search(r"[;\t|]", names[0]):
        raise CsvError(
            f"the header has one column {names[0][:80]!r}: the delimiter must be a comma", file=name, line=1
        )
    seen: set[str] = set()
    for number, column in enumerate(names, start=1):
        if column in seen:
            raise CsvError(f"column {column!r} appears twice in the header", file=name, line=1, column=column)
        seen.add(column)
        if column not in REQUIRED_COLUMNS:
            shown = repr(column[:80]) if column else f"number {number} (empty name)"
            raise CsvError(
                f"unknown column {shown}; the columns are {', '.join(REQUIRED_COLUMNS)}",
                file=name,
                line=1,
                column=column or str(number),
            )
    missing = [c for c in REQUIRED_COLUMNS if c not in seen]
    if missing:
        raise CsvError(f"missing column(s): {', '.join(missing)}", file=name, line=1)
    return CsvHeader(columns=tuple(names), data_offset=end + 1)


_CONTEXT = re.compile(r"COPY \S+, line (?P<line>\d+)(?:, column (?P<column>\w+))?")
_CONSTRAINT_MESSAGES = {
    "invoice_id_empty": ("invoice_id", gettext_lazy("is empty")),
    "unit_id_empty": ("unit_id", gettext_lazy("is empty")),
    "line_type_empty": ("line_type", gettext_lazy("is empty")),
    "description_empty": ("description", gettext_lazy("is empty")),
    "quantity_negative": ("quantity", gettext_lazy("is negative")),
    "amount_negative": ("amount", gettext_lazy("is negative")),
    "quantity_nan": ("quantity", gettext_lazy("is not a number")),
    "amount_nan": ("amount", gettext_lazy("is not a number")),
}


def _records(path: Path, header: CsvHeader) -> Iterator[tuple[int, list[str]]]:
    """Each data record's first line, and its fields (undecodable bytes kept as surrogates).
    A quote left open runs to the end of the file: the last record starts where it opened."""
    with path.open("rb") as raw:
        raw.seek(header.data_offset)
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text)
        line = 2  # the first data line (the header is line 1)
        while True:
            try:
                fields = next(reader)
            except (StopIteration, csv.Error):
                return
            yield line, fields
            line = 2 + reader.line_num


def _record(path: Path, header: CsvHeader, record: int) -> tuple[int, list[str]]:
    """Data record ``record``'s first line and its fields (the last record's if the file ends first)."""
    found: tuple[int, list[str]] = (2, [])
    for number, found in enumerate(_records(path, header), start=1):  # noqa: B007 - the last one read
        if number == record:
            break
    return found


def _bad_byte_column(fields: list[str], header: CsvHeader) -> tuple[str | None, str | None]:
    """The first column holding a NUL or a byte that is not UTF-8, and what it holds."""
    for column, value in zip(header.columns, fields, strict=False):
        if "\x00" in value:
            return column, "nul"
        bad = next((c for c in value if "\udc80" <= c <= "\udcff"), None)
        if bad is not None:
            return column, f"0x{ord(bad) - 0xDC00:02x}"
    return None, None


def copy_error(exc: Exception, *, path: Path, header: CsvHeader, file: str) -> CsvError | None:
    """The CSV problem behind a PostgreSQL error raised while COPY read the data, if it is one.

    COPY got the data without the header; its "line N" is data record N.
    """
    import psycopg

    if not isinstance(exc, psycopg.Error) or exc.diag.context is None:
        return None
    match = _CONTEXT.search(exc.diag.context)
    if match is None:
        return None
    record = int(match["line"])
    message = (exc.diag.message_primary or str(exc)).strip()
    if message == "unterminated CSV quoted field":
        # COPY reads on to the end of the file looking for the closing quote: the quote
        # opens on the last record's line.
        line, _fields = _record(path, header, sys.maxsize)
        return CsvError(_("a quoted field opened on this line is never closed"), file=file, line=line)
    line, fields = _record(path, header, record)
    column = match["column"] or exc.diag.column_name
    constraint = exc.diag.constraint_name
    if constraint in _CONSTRAINT_MESSAGES:
        column, lazy_message = _CONSTRAINT_MESSAGES[constraint]
        message = str(lazy_message)
    elif isinstance(exc, psycopg.errors.NotNullViolation):
        message = _("is missing (empty)")
    elif isinstance(exc, psycopg.errors.StringDataRightTruncation) and column in TEXT_LIMITS:
        message = _("is longer than %(n)s characters") % {"n": grouped(TEXT_LIMITS[column])}
    elif isinstance(exc, psycopg.errors.NumericValueOutOfRange):
        message = _("is too large for the column (%(digits)s digits)") % {
            "digits": "18, 6" if column == "quantity" else "18, 2"
        }
    elif isinstance(exc, psycopg.errors.InvalidTextRepresentation):
        message = _("is not a plain decimal number (%(detail)s)") % {"detail": message}
    elif isinstance(exc, psycopg.errors.CharacterNotInRepertoire):
        # Raised before COPY splits the line into columns: find the column here.
        column, bad = _bad_byte_column(fields, header)
        if bad == "nul":
            message = _("contains a NUL byte")
        elif bad is not None:
            message = _("is not valid UTF-8 (byte %(byte)s; save the file as UTF-8)") % {"byte": bad}
        else:
            message = _("is not valid UTF-8 (%(detail)s)") % {"detail": message}
    elif message.startswith("missing data for column") and fields == []:
        message, column = _("the line is empty (remove empty lines, also at the end of the file)"), None
    elif message.startswith(("unquoted carriage return", "unquoted newline", "literal carriage return")):
        message = _(
            "its line ending differs from the first data line's (LF or CRLF: one kind throughout the file)"
        )
    return CsvError(message, file=file, line=line, column=column)
