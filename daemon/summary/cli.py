"""``trainingd summary``: the command-line face of the daily summary (write it now, print the
two paths).  Parsing and printing only; the summary itself is :mod:`daemon.summary`."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from daemon.settings import Settings


def add_summary_parser(subparsers: Any, common_parent: argparse.ArgumentParser
                       ) -> argparse.ArgumentParser:
    """Add ``summary`` to the ``trainingd`` sub-commands and return its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "summary", parents=[common_parent], help="write today's daily summary now",
        description="Write the daily summary (JSON, Markdown, PNG plots) into the summaries "
                    "folder and print their paths.")
    return p


def cmd_summary(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.store.db import StateStore
    from daemon.summary import write_daily_summary

    store = StateStore(settings.state_db)
    try:
        json_path, md_path = write_daily_summary(settings, store, datetime.now(UTC))
    finally:
        store.close()
    print(json_path)
    print(md_path)
    return 0
