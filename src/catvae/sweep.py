"""Sweeps that survive failures: every job records its status, and the sweep ends with a summary.

Each run writes ``status.json`` in its output directory: ``{"status": "running" | "finished" | "failed",
"error", "traceback", "overrides"}``. In a multirun, ``train.py`` records a failed job and returns NaN to the
sweeper instead of raising, so the remaining jobs run; :class:`SweepSummary` (a Hydra callback) then writes
``sweep_summary.json`` in the sweep directory, logs which jobs failed and why, and makes the command exit
with status 1 if any did.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"


def write_status(output_dir: Path, status: str, overrides: list[str], error: BaseException | None = None) -> None:
    record: dict[str, Any] = {"status": status, "overrides": overrides}
    if error is not None:
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = "".join(traceback.format_exception(error))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / STATUS_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_status(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class SweepSummary(Callback):
    """Hydra callback: after a multirun, summarise the jobs' statuses (see the module docstring)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sorted((p.parent for p in sweep_dir.glob(f"*/{STATUS_FILE}")), key=lambda p: (len(p.name), p.name))
        records = {job.name: read_status(job) for job in jobs}
        summary = {
            "jobs": len(records),
            "finished": sorted(name for name, r in records.items() if r["status"] == "finished"),
            "failed": {name: {"error": r.get("error"), "overrides": r["overrides"]}
                       for name, r in records.items() if r["status"] == "failed"},
            "unfinished": sorted(name for name, r in records.items() if r["status"] == "running"),
        }
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("sweep %s: %d jobs, %d finished, %d failed", sweep_dir, len(records), len(summary["finished"]),
                 len(summary["failed"]))
        if summary["failed"]:
            lines = [f"  job {name} ({' '.join(f['overrides'])}): {' '.join(f['error'].split())}"
                     for name, f in summary["failed"].items()]
            message = (f"{len(summary['failed'])} of {len(records)} jobs failed (details in "
                       f"{sweep_dir / 'sweep_summary.json'} and each job's {STATUS_FILE}):\n" + "\n".join(lines))
            log.error(message)
            raise SystemExit(message)  # Hydra turns exceptions from callbacks into warnings; this one must end the run
