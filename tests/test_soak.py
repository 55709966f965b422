"""The soak's own arithmetic and input (`make soak`, tests/bench/load.py): its figures are
only as good as its percentile, and its upsert only runs if the product accepts its CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from reconciliation.csvfile import read_header
from tests.bench.load import percentile, write_csv


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 100 .. 1, unsorted on purpose
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 100) == 100.0
    assert percentile([0.25], 95) == 0.25
    assert percentile([1.0, 2.0], 95) == 2.0


def test_soak_csv_mixes_existing_lines_in_other_spellings_with_new_ones(tmp_path: Path) -> None:
    existing = [
        ("INV-01000000", "UNIT-000001", "ENERGY", "Active energy consumption Jan 2025", "12.500", "2.30"),
        ("INV-01000000", "UNIT-000001", "FEE", "Meter service fee Jan 2025", "1.000", "2.50"),
    ]
    path = tmp_path / "soak.csv"

    matched = write_csv(path, 40, existing)

    header = read_header(path)  # the product's own header check accepts it
    assert header.columns == ("invoice_id", "unit_id", "line_type", "description", "quantity", "amount")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    assert matched == 2 and len(rows) == 40
    # Line 0: the first existing line, its description in another spelling, same values.
    assert rows[0][:3] == list(existing[0][:3]) and rows[0][4:] == list(existing[0][4:])
    assert rows[0][3] != existing[0][3]
    assert " ".join(rows[0][3].split()).lower() == existing[0][3].lower()
    # Line 10: the second existing line with a new amount.
    assert rows[10][:5] == list(existing[1][:5]) and rows[10][5] == "3.50"
    # The rest are new: no other line has an existing invoice id, and no key repeats.
    assert not {r[0] for i, r in enumerate(rows) if i not in (0, 10)} & {e[0] for e in existing}
    assert len({(r[0], r[1], r[2]) for r in rows}) == 40
