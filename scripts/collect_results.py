"""Collect the results.json of finished runs into a markdown table.

    python scripts/collect_results.py multirun/jang2017_vae_cat/2026-11-22/14-00-00 [more dirs ...]

Every results.json below the given directories is one row: estimator, seed, test metrics, training
steps and wall time. Directories without any finished run are an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = ("test/nll_iw", "test/nelbo")


def collect(dirs: list[Path]) -> list[dict]:
    rows = []
    for directory in dirs:
        found = sorted(directory.rglob("results.json"))
        if not found:
            raise SystemExit(f"no results.json under {directory}: no finished run there")
        rows += [json.loads(path.read_text()) for path in found]
    return rows


def markdown(rows: list[dict]) -> str:
    header = "| estimator | seed | " + " | ".join(METRICS) + " | steps | wall time (min) | output dir |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in sorted(rows, key=lambda r: (r["experiment"], r["estimator"], r["seed"])):
        values = " | ".join(f"{row['metrics'][m]:.2f}" if m in row["metrics"] else "-" for m in METRICS)
        lines.append(f"| {row['estimator']} | {row['seed']} | {values} | {row['global_step']} | "
                     f"{row['wall_time_s'] / 60:.1f} | `{row['output_dir']}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories")
    print(markdown(collect(parser.parse_args(argv).dirs)))


if __name__ == "__main__":
    sys.exit(main())
