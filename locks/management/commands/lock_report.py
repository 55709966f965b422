"""Write the stuck-lock report (the seed analysis, from live data) as markdown, CSV or JSON.

    manage.py lock_report [--env KEY ...] [--format markdown|csv|json] [--output PATH]

The report is built by ``locks.reports``; this command only picks the environments and
the format and writes the result. An unknown ``--env`` key is an error before anything is
queried. An unreachable environment is not: the report is still written (that environment
appears in it as unreachable, with its error) and the command exits 0, with a warning on
stderr naming it. A monitoring script that must fail on it reads ``reachable`` from the
JSON; failing here would throw away the other environments' findings.

``--output`` replaces the file atomically (a temporary file in the same directory, then a
rename), so a script reading the previous report never sees half of the new one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from billing_ops.environments import UnknownEnvironment, environments_named
from locks.reports import lock_report, render_csv, render_json, render_markdown

FORMATS = ("markdown", "csv", "json")
DEFAULT_FORMAT = "markdown"


class Command(BaseCommand):
    help = "Report COMPLETED billing runs that still hold locks, per environment (markdown, CSV or JSON)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--env",
            action="append",
            dest="env_keys",
            metavar="KEY",
            help="Report only this environment (repeatable). Default: all of them.",
        )
        parser.add_argument("--format", choices=FORMATS, default=DEFAULT_FORMAT, dest="output_format")
        parser.add_argument("--output", metavar="PATH", help="Write to this file instead of stdout.")

    def handle(
        self, *args: Any, env_keys: list[str] | None, output_format: str, output: str | None, **options: Any
    ) -> None:
        try:
            envs = environments_named(env_keys)
        except UnknownEnvironment as exc:
            raise CommandError(str(exc)) from None
        report = lock_report(envs)
        if output_format == "json":
            text = render_json(report)
        elif output_format == "csv":
            text = render_csv(report)
        else:
            text = render_markdown(report, generated_at=timezone.localtime())

        unreachable = [env for env in report["environments"] if not env["reachable"]]
        for env in unreachable:
            self.stderr.write(f"warning: {env['key']} ({env['label']}) was unreachable: {env['error']}")
        if output:
            _write_atomically(Path(output), text)
            self.stdout.write(
                f"wrote the {output_format} report on {len(envs)} environment(s) to {output}"
                + (f" ({len(unreachable)} unreachable)" if unreachable else "")
            )
        else:
            self.stdout.write(text, ending="")


def _write_atomically(path: Path, text: str) -> None:
    if not path.parent.is_dir():
        raise CommandError(f"cannot write {path}: no directory {path.parent}")
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # newline="": the CSV writer already ends its rows with CRLF; write the text as it is.
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
