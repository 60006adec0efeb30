"""``pairtune`` console script: ``pairtune runs`` compares an experiment's runs in the terminal.

``pairtune --help`` answers without importing mlflow or torch: each command imports what it needs.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pairtune.core import OBJECTIVE

if TYPE_CHECKING:
    from pairtune.tracking.runs import RunRow


def build_parser() -> argparse.ArgumentParser:
    """The ``pairtune`` parser and its ``runs`` command."""
    parser = argparse.ArgumentParser(prog="pairtune", description="pairtune's command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    runs = commands.add_parser(
        "runs", help="a table of an experiment's runs: differing params and final metrics"
    )
    runs.add_argument(
        "--experiment", default=None, help="experiment name (default: $MLFLOW_EXPERIMENT_NAME or pairtune)"
    )
    runs.add_argument(
        "--tracking-uri", default=None, help="store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)"
    )
    runs.add_argument(
        "--parent",
        metavar="RUN_ID",
        default=None,
        help="list the children of this sweep run ('latest': the newest sweep)",
    )
    runs.add_argument(
        "--sort", default=OBJECTIVE, help=f"metric to sort by, best first (default: {OBJECTIVE})"
    )
    runs.add_argument("--ascending", action="store_true", help="sort the smallest value first (for losses)")
    runs.add_argument("--limit", type=int, default=50)
    runs.add_argument("--model", default="pairtune", help="registered model whose aliases are shown (default: pairtune)")
    return parser


def show_runs(args: argparse.Namespace) -> int:
    """Print the runs table sorted by ``args.sort``; exit status 1 when there is nothing to show."""
    from pairtune.tracking.runs import (  # mlflow: only when runs are actually listed
        collect_runs,
        format_table,
    )

    rows = collect_runs(
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        parent_run_id=args.parent,
        limit=args.limit,
        registered_model=args.model,
    )
    if not rows:
        print("no runs found", file=sys.stderr)
        return 1

    def key(row: RunRow) -> float:
        value = row.metrics.get(args.sort)
        if value is None or math.isnan(value):
            return math.inf
        return value if args.ascending else -value

    print(format_table(sorted(rows, key=key), sort_metric=args.sort))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    args = build_parser().parse_args(argv)
    return show_runs(args)


if __name__ == "__main__":
    sys.exit(main())
