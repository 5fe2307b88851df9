"""Sweeps that survive failures: every job records its status, and the sweep ends with a summary.

Each run writes ``status.json`` in its output directory: ``{"status": "running" | "finished" | "failed",
"error", "traceback", "overrides", "pid", "host", "process_start"}`` (and, for a resumed run, ``resumed_from`` and
``chain``, the run directories it continues, oldest first). A killed process cannot update its file, so a run whose
file says ``running`` but whose process is gone from this host is reported as ``interrupted`` (:func:`run_state`). In a multirun, ``train.py`` records a failed job and returns NaN to the
sweeper instead of raising, so the remaining jobs run; :class:`SweepSummary` (a Hydra callback) then writes
``sweep_summary.json`` in the sweep directory, logs which jobs failed and why, and makes the command exit
with status 1 if any did.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), so that a reused pid is not taken for the
    run's process; None where /proc is not there or the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_status(output_dir: Path, status: str, overrides: list[str], error: BaseException | None = None,
                 **extra: Any) -> None:
    """Writes status.json; ``extra`` adds entries (the resume chain). The file is replaced whole (written beside it,
    then renamed), so a reader (a campaign polling its parts) never sees it half-written, nor does a resume after a
    kill in the middle of the write."""
    record: dict[str, Any] = {"status": status, "overrides": overrides, "pid": os.getpid(),
                              "host": socket.gethostname(), "process_start": process_start(os.getpid()), **extra}
    if error is not None:
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = "".join(traceback.format_exception(error))
    output_dir.mkdir(parents=True, exist_ok=True)
    partial = output_dir / f".{STATUS_FILE}.{os.getpid()}.partial"
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, output_dir / STATUS_FILE)


def run_state(record: dict[str, Any] | None) -> str:
    """finished | failed | running | interrupted (status running, process gone from this host) | unknown (no file).
    A run recorded on another host, or without a pid (written before pids were recorded), stays ``running``."""
    if record is None:
        return "unknown"
    status = record["status"]
    if status != "running" or record.get("host") != socket.gethostname() or "pid" not in record:
        return status
    alive = process_start(record["pid"])
    return "running" if alive is not None and alive == record.get("process_start", alive) else "interrupted"


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
            "interrupted": sorted(name for name, r in records.items() if run_state(r) == "interrupted"),
            "running": sorted(name for name, r in records.items() if run_state(r) == "running"),
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
