"""Table 1 of Jang et al. (2017) at the paper's length: a queue of full-protocol runs that survives being killed, one
JSON record per finished run, and the table built from the records alone.

- The queue (:func:`table1_jobs`): rows VAE (Cat.), VAE (Bern.), SBN (Bern.), SBN (Cat.), in that order; in each, seeds
  0, 1, 2 of the paper's 7 columns; each run ``experiment=<row> protocol=full table1_column=<column>
  model.optimizer.lr=<rate>`` with the rate the short CPU protocol selected for that cell
  (``docs/reproduction/table1_cpu.csv``); then the sensitivity runs (other rates, seed 0); then the protocol
  variants (a modern column again, seed 0, with the overrides its authors' method needs, ``VARIANTS``); then, one seed
  each, the modern columns the short protocol ran (``table1_cpu_modern.csv``, ``table1_cpu_modern_2021.csv``) at its
  rate.
- :class:`Campaign` runs it ``n_jobs`` at a time, one thread each. A job's runs live in
  ``<campaign>/<row>/<column>/<name>/part<i>``: each part is one process; a part that was killed (its status says
  running, its process is gone) is continued by a new part with ``resume=`` the newest part holding a checkpoint
  (catvae's exact resume), so nothing is restarted, nothing finished is re-run (a job with a record, or whose last
  part finished, is done) and no part writes into another's directory. A part that fails (an exception, recorded in
  its status.json) is retried once, from its newest checkpoint; a second failure is reported and the job left.
  Parts still running in processes of an earlier invocation (killed without its children) are waited for, not
  doubled.
- :func:`write_record` writes ``<records>/<row>/<column>/<name>.json`` once a job's last part has finished: the
  overrides, the rate, the commits its parts ran on, the global step, every test metric, the validation curve (one
  value per epoch, across parts) and the training loss's (its epoch means), the best validation value and its
  epoch, wall time, threads, the parts it was resumed through, and each part's commit, machine, start, wall time
  and the step it started from (``part_log``).
- :func:`table_markdown` builds the table from the records only: mean +- std (ddof=1) over seeds beside the paper's
  number, per-seed values, the rate and the wall time; the sensitivity runs (against seed 0 at the selected rate)
  and the modern columns in tables of their own.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from reproduce_jang2017 import COLUMNS, ROOT, ROWS, TABLE1_COLUMNS

sys.path.insert(0, str(ROOT / "src"))
from catvae.resume import checkpoint_step, resolve_resume  # noqa: E402
from catvae.sweep import process_start, read_status, run_state  # noqa: E402

FULL_ROWS = ("vae_cat", "vae_bern", "sbn_bern", "sbn_cat")  # the campaign's order
SEEDS = (0, 1, 2)
CPU_SELECTION = ROOT / "docs" / "reproduction" / "table1_cpu.csv"
# The modern columns the short protocol ran (one seed, no selection): run after the paper's, one seed each.
MODERN_RUNS = (ROOT / "docs" / "reproduction" / "table1_cpu_modern.csv",
               ROOT / "docs" / "reproduction" / "table1_cpu_modern_2021.csv")
# Does the short protocol's rate hold at full length? One seed each at another rate.
SENSITIVITY = (("vae_cat", "gumbel_softmax", 1e-3), ("vae_cat", "sf", 3e-4), ("sbn_bern", "gumbel_softmax", 1e-3))
# Protocol variants, (row, column, name, overrides): seed 0 of a modern column at the short protocol's rate, again with
# the overrides its authors' method needs where the row's protocol lies outside it. ReinMax: the VAE rows' schedule
# takes tau below 1 from step 1,000 on (0.5 from step 7,000), and its authors' implementation refuses tau < 1; the
# variant holds tau at estimator.tau = 1.
VARIANTS = tuple((row, "reinmax", "tau1", ("schedule=constant",)) for row in ("vae_cat", "vae_bern"))
MAX_FAILURES = 2  # a failed part is retried once


@dataclass(frozen=True)
class Job:
    row: str
    column: str
    seed: int
    lr: float
    name: str  # seed<k> for the table's runs, lr<rate>_seed<k> for the sensitivity runs, <variant>_seed<k>
    extra: tuple[str, ...] = ()  # a protocol variant's overrides

    @property
    def key(self) -> str:
        return f"{self.row}/{self.column}/{self.name}"

    def overrides(self) -> list[str]:
        return [f"experiment={ROWS[self.row].experiment}", "protocol=full", f"table1_column={self.column}",
                f"model.optimizer.lr={self.lr:g}", f"seed={self.seed}", "logger=csv", *self.extra]


def selected_learning_rates(path: Path = CPU_SELECTION) -> dict[tuple[str, str], float]:
    """(row, column) -> the learning rate the short CPU protocol selected on validation (or ran at), in the CSV's
    order."""
    with path.open() as handle:
        return {(r["row"], r["column"]): float(next(s for s in r["setting"].split() if s.startswith(
            "model.optimizer.lr=")).split("=")[1]) for r in csv.DictReader(handle)}


def table1_jobs(rows=FULL_ROWS, columns=TABLE1_COLUMNS, seeds=SEEDS, sensitivity=SENSITIVITY, variants=VARIANTS,
                modern=MODERN_RUNS) -> list[Job]:
    """The paper's columns x seeds row by row, the sensitivity runs, the protocol variants (at the rate of the first
    ``modern`` CSV that ran their column), then seed 0 of every (row, column) of the ``modern`` CSVs, rows in the
    campaign's order."""
    rates = selected_learning_rates()
    jobs = [Job(row, column, seed, rates[row, column], f"seed{seed}") for row in rows for seed in seeds
            for column in columns]
    jobs += [Job(row, column, 0, lr, f"lr{lr:g}_seed0") for row, column, lr in sensitivity
             if row in rows and column in columns]
    modern_rates = [selected_learning_rates(path) for path in modern]
    first_rate = {cell: rate for rates in reversed(modern_rates) for cell, rate in rates.items()}  # first CSV wins
    for row, column, name, extra in variants:
        if row in rows and (row, column) not in first_rate:
            raise ValueError(f"protocol variant {name!r} of ({row}, {column}): no modern CSV ran that cell, so it has "
                             f"no rate; cells with one: {sorted(first_rate)}")
    jobs += [Job(row, column, 0, first_rate[row, column], f"{name}_seed0", tuple(extra))
             for row, column, name, extra in variants if row in rows]
    for rates_of_csv in modern_rates:
        jobs += [Job(row, column, 0, rates_of_csv[row, column], "seed0") for row in rows
                 for (rate_row, column) in rates_of_csv if rate_row == row]
    return jobs


def commit_of(code: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=code, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=code, capture_output=True,
                           text=True).stdout.strip()
    return done.stdout.strip() + ("+uncommitted" if dirty else "") if done.returncode == 0 else "unknown"


def device_description() -> str:
    """This machine as a record names it: 'cpu (<model>, <n> cores)'."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), model)
    return f"cpu ({model}, {os.cpu_count()} cores)"


def parts_of(job_dir: Path) -> list[Path]:
    return sorted(job_dir.glob("part*"), key=lambda p: int(p.name[4:]))


def part_state(part: Path) -> str:
    """finished | failed | running | interrupted (killed; before it wrote its status, its launch record tells)."""
    if (part / "results.json").is_file():
        return "finished"
    record = read_status(part)
    if record is None:  # the launch record names the process as status.json would
        launch = json.loads((part / "campaign.json").read_text()) if (part / "campaign.json").is_file() else {}
        record = {"status": "running", "host": socket.gethostname(),
                  **{k: launch[k] for k in ("pid", "host", "process_start") if k in launch}}
    state = run_state(record)
    return "interrupted" if state == "running" and "pid" not in record else state


def newest_checkpoint(parts: list[Path]) -> Path | None:
    """The checkpoint to continue from: the newest readable one of the latest part that holds any."""
    for part in reversed(parts):
        if any((part / "checkpoints").glob("*.ckpt")):
            return resolve_resume(str(part))
    return None


class Campaign:
    """Runs ``jobs`` under ``directory``, ``n_jobs`` at a time, and writes each finished job's record (module
    docstring). ``overrides`` are appended to every run's (tests shrink the runs with them)."""

    def __init__(self, jobs: list[Job], directory: Path, records: Path, n_jobs: int = 2,
                 overrides: tuple[str, ...] = (), code: Path = ROOT, poll_s: float = 10.0,
                 launch_until: float | None = None):
        self.jobs, self.directory, self.records, self.n_jobs = jobs, directory, records, n_jobs
        self.overrides, self.code, self.poll_s = tuple(overrides), code, poll_s
        self.launch_until = launch_until  # a time (epoch s) after which no part starts; running ones finish
        self.commit = commit_of(code)
        self.processes: dict[str, subprocess.Popen] = {}
        self.reported: set[str] = set()

    def record_path(self, job: Job) -> Path:
        return self.records / job.row / job.column / f"{job.name}.json"

    def state(self, job: Job) -> str:
        """done (recorded) | finished (not yet recorded) | running | failed (twice) | todo."""
        if self.record_path(job).is_file():
            return "done"
        parts = parts_of(self.directory / job.key)
        states = [part_state(p) for p in parts]
        if states and states[-1] in ("finished", "running"):
            return states[-1]
        return "failed" if states.count("failed") >= MAX_FAILURES else "todo"

    def launch(self, job: Job) -> None:
        job_dir = self.directory / job.key
        parts = parts_of(job_dir)
        part = job_dir / f"part{len(parts)}"
        resume = newest_checkpoint(parts)
        command = [sys.executable, str(self.code / "train.py"), *job.overrides(), *self.overrides,
                   f"hydra.run.dir={part}", *([f"resume={resume}"] if resume else [])]
        part.mkdir(parents=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        started = time.time()
        with (part / "train.log").open("w") as log:
            process = subprocess.Popen(command, cwd=self.code, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes[job.key] = process
        (part / "campaign.json").write_text(json.dumps(
            {"commit": self.commit, "started": started, "command": command, "threads": 1, "pid": process.pid,
             "device": device_description(), "start_step": checkpoint_step(resume) if resume else 0,
             "host": socket.gethostname(), "process_start": process_start(process.pid)}, indent=2) + "\n")
        print(f"[campaign] {job.key}: started {part.name}" + (f", resuming {resume}" if resume else ""), flush=True)

    def step(self) -> bool:
        """Records what finished, starts what fits; False once nothing is left to run or wait for."""
        for key, process in list(self.processes.items()):
            if process.poll() is not None:
                del self.processes[key]
        states = {job.key: self.state(job) for job in self.jobs}
        for job in self.jobs:
            if states[job.key] == "finished":
                write_record(job, self.directory / job.key, self.record_path(job))
                states[job.key] = "done"
                print(f"[campaign] {job.key}: recorded {self.record_path(job)}", flush=True)
            elif states[job.key] == "failed" and job.key not in self.reported:
                self.reported.add(job.key)
                print(f"[campaign] {job.key}: FAILED twice, left (see its parts' status.json)", flush=True)
        running = sum(state == "running" for state in states.values())
        for job in self.jobs:
            if running >= self.n_jobs or (self.launch_until is not None and time.time() >= self.launch_until):
                break
            if states[job.key] == "todo":
                self.launch(job)
                running += 1
        return running > 0 or bool(self.processes)

    def run(self) -> dict[str, int]:
        """Until every job is done or failed (or, past ``launch_until``, until the running parts end); returns the
        count of jobs per state."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / ".lock").open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SystemExit(f"another campaign is running in {self.directory}") from None
            while self.step():
                time.sleep(self.poll_s)
        states = [self.state(job) for job in self.jobs]
        return {state: states.count(state) for state in sorted(set(states))}


def metrics_rows(parts: list[Path]) -> list[dict]:
    """Every metrics row the parts logged, part by part. A resumed part logs again, with the same values, what its
    predecessor logged after the checkpoint it resumed, so callers key the rows (by epoch, by step) and let a later
    row replace an earlier one."""
    rows = []
    for part in parts:
        path = part / "csv" / "metrics.csv"
        if path.is_file():
            with path.open() as handle:
                rows += list(csv.DictReader(handle))
    return rows


def validation_curve(rows: list[dict], monitor: str) -> dict[int, float]:
    """epoch -> the monitored validation value, from the parts' metrics rows (a later part's row wins)."""
    curve = {int(r["epoch"]): float(r[monitor]) for r in rows if r.get(monitor)}
    return dict(sorted(curve.items()))


def training_loss_curve(rows: list[dict]) -> dict[int, float]:
    """epoch -> the mean of the one-sample training losses logged in it (one every ``log_every_n_steps``), each step
    once (a later part's row wins)."""
    by_step = {int(r["step"]): (int(r["epoch"]), float(r["train/loss"])) for r in rows if r.get("train/loss")}
    by_epoch: dict[int, list[float]] = {}
    for epoch, loss in by_step.values():
        by_epoch.setdefault(epoch, []).append(loss)
    return {epoch: statistics.fmean(losses) for epoch, losses in sorted(by_epoch.items())}


def part_wall_time(part: Path) -> float:
    """Seconds from the part's start to its last write (results.json for a finished part)."""
    started = json.loads((part / "campaign.json").read_text())["started"]
    last = max(p.stat().st_mtime for p in part.rglob("*") if p.is_file())
    return max(0.0, last - started)


def part_summary(part: Path, launch: dict) -> dict:
    """One part as it ran: its commit, machine, start (UTC), wall time and the global step it started from (its
    launch's ``start_step``; for a launch that predates the field, 0 if it resumed nothing, else unknown: None)."""
    resumed = any(o.startswith("resume=") for o in launch["command"])
    step = launch.get("start_step", None if resumed else 0)
    return {"part": part.name, "commit": launch["commit"], "device": launch.get("device"),
            "started": datetime.fromtimestamp(launch["started"], timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(part_wall_time(part), 1), "start_step": step}


def write_record(job: Job, job_dir: Path, path: Path) -> dict:
    parts = parts_of(job_dir)
    results = json.loads((parts[-1] / "results.json").read_text())
    row = ROWS[job.row]
    rows = metrics_rows(parts)
    curve = validation_curve(rows, row.val_metric)
    best_epoch = min(curve, key=curve.get) if curve else None
    launches = [json.loads((p / "campaign.json").read_text()) for p in parts]
    this_device = device_description()
    record = {
        "row": job.row, "column": job.column, "seed": job.seed, "lr": job.lr, "variant": list(job.extra),
        "estimator": results["estimator"], "global_step": results["global_step"],
        "overrides": [o for o in launches[-1]["command"][2:] if not o.startswith(("hydra.run.dir=", "resume="))],
        "commits": sorted({launch["commit"] for launch in launches}),
        "test": results["metrics"], "metric": row.metrics[0].key,
        "best_validation": {"metric": row.val_metric, "value": curve.get(best_epoch), "epoch": best_epoch},
        "validation_curve": [curve[e] for e in sorted(curve)],
        "training_loss_curve": list(training_loss_curve(rows).values()),
        "tested_checkpoint": Path(results["tested_checkpoint"]).name if results.get("tested_checkpoint") else None,
        "wall_time_s": round(sum(part_wall_time(p) for p in parts), 1), "threads": launches[-1]["threads"],
        # each part's machine (launch records before this field: this machine's)
        "device": "; ".join(sorted({launch.get("device") or this_device for launch in launches})),
        "parts": len(parts), "resumed": len(parts) > 1,
        "resumed_from": [str(Path(p).relative_to(job_dir.parent.parent.parent)) for p in results.get("chain", [])]
        if results.get("chain") else [],
        "part_log": [part_summary(p, launch) for p, launch in zip(parts, launches)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


PAGE_MARKERS = ("<!-- full-table1 -->\n", "<!-- /full-table1 -->")


def write_table_into(page: Path, table: str) -> None:
    """Replaces the text between the page's full-table1 markers with ``table``."""
    text = page.read_text()
    start, end = text.index(PAGE_MARKERS[0]) + len(PAGE_MARKERS[0]), text.index(PAGE_MARKERS[1])
    page.write_text(text[:start] + table + text[end:])


def load_records(records: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(records.glob("*/*/*.json"))]


def is_sensitivity_run(record: dict) -> bool:
    """A sensitivity run: seed 0 of a cell at the other rate ``SENSITIVITY`` names for it."""
    return (record["row"], record["column"], record["lr"]) in SENSITIVITY


def cell(values: list[float]) -> tuple[float, float | None]:
    """mean and standard deviation (ddof=1; None for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def format_mean(values: list[float]) -> str:
    mean, std = cell(values)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def resumed_how(record: dict) -> str:
    """"2 parts", with the steps the later parts resumed at where the record has them ("2 parts, at step 14,000")."""
    steps = [p["start_step"] for p in record.get("part_log", [])[1:]]
    at = f", at step {' and '.join(f'{s:,}' for s in steps)}" if steps and None not in steps else ""
    return f"{record['parts']} parts{at}"


def best_validation(record: dict) -> str:
    return f"{record['best_validation']['value']:.2f} ({record['best_validation']['epoch']})"


def table_markdown(records: list[dict]) -> str:
    """Table 1 from the records: the grid (ours mean ± std over seeds, the paper's number), then one line per cell;
    the sensitivity runs in a table of their own, the modern columns and the protocol variants (records with a
    ``variant``; records before that field have none) in another."""
    checks = [r for r in records if is_sensitivity_run(r)]
    records = [r for r in records if not is_sensitivity_run(r)]
    variants = [r for r in records if r.get("variant")]
    records = [r for r in records if not r.get("variant")]
    by_cell: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        by_cell.setdefault((record["row"], record["column"]), []).append(record)
    header = "| row | " + " | ".join(COLUMNS[c][1] for c in TABLE1_COLUMNS) + " |"
    lines = ["Test NLL (nats; SBN m = 1000, VAE S = 1000), ours mean ± std over seeds (paper):", "", header,
             "|---|" + "---|" * len(TABLE1_COLUMNS)]
    for row in FULL_ROWS:
        cells = []
        for column in TABLE1_COLUMNS:
            found = sorted(by_cell.get((row, column), []), key=lambda r: r["seed"])
            paper = ROWS[row].paper[column][0]
            cells.append(f"{format_mean([r['test'][r['metric']] for r in found])} ({paper})" if found
                         else f"- ({paper})")
        lines.append(f"| {ROWS[row].label} | " + " | ".join(cells) + " |")
    lines += ["", "| row | column | paper | mean ± std | seeds: value (best val. epoch) | lr | global step | "
                  "wall time per run | resumed |", "|---|---|---|---|---|---|---|---|---|"]
    for row in FULL_ROWS:
        for column in TABLE1_COLUMNS:
            found = sorted(by_cell.get((row, column), []), key=lambda r: r["seed"])
            if not found:
                continue
            values = [r["test"][r["metric"]] for r in found]
            seeds = ", ".join(f"{r['seed']}: {r['test'][r['metric']]:.2f} ({r['best_validation']['epoch']})"
                              for r in found)
            rates = ", ".join(sorted({f"{r['lr']:g}" for r in found}))
            steps = ", ".join(sorted({str(r["global_step"]) for r in found}))
            minutes = statistics.fmean(r["wall_time_s"] for r in found) / 60
            resumed = ", ".join(f"seed {r['seed']} ({resumed_how(r)})" for r in found if r["resumed"]) or "-"
            lines.append(f"| {ROWS[row].label} | {COLUMNS[column][1]} | {ROWS[row].paper[column][0]} | "
                         f"{format_mean(values)} | {seeds} | {rates} | {steps} | {minutes:.1f} min | {resumed} |")
    if checks:
        lines += ["", "Sensitivity: seed 0 at another rate against seed 0 at the selected one. The selection holds "
                      "where the selected rate's best validation value (the selection criterion, lower is better) is "
                      "the lower:", "",
                  "| row | column | lr | test | best val. (epoch) | selected lr | test | best val. (epoch) | "
                  "selection holds | wall time | resumed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(checks, key=lambda r: (FULL_ROWS.index(r["row"]), TABLE1_COLUMNS.index(r["column"]))):
            base = next((b for b in by_cell.get((r["row"], r["column"]), []) if b["seed"] == r["seed"]), None)
            holds = base is not None and base["best_validation"]["value"] < r["best_validation"]["value"]
            other = [f"{base['lr']:g}", f"{base['test'][base['metric']]:.2f}", best_validation(base),
                     "yes" if holds else "no"] if base else ["-"] * 4
            lines.append(f"| {ROWS[r['row']].label} | {COLUMNS[r['column']][1]} | {r['lr']:g} | "
                         f"{r['test'][r['metric']]:.2f} | {best_validation(r)} | " + " | ".join(other) +
                         f" | {r['wall_time_s'] / 60:.1f} min | {resumed_how(r) if r['resumed'] else '-'} |")
    modern = [r for r in records if r["column"] not in TABLE1_COLUMNS] + variants
    if modern:
        lines += ["", "Columns the paper did not have and protocol variants, at full length (one seed, the "
                      "short protocol's rate; \"variant\": the overrides a variant adds to the row's protocol):", "",
                  "| row | column | variant | test NLL (seed) | best val. epoch | lr | global step | wall time | "
                  "resumed |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(modern, key=lambda r: (FULL_ROWS.index(r["row"]), r["column"], bool(r.get("variant")))):
            resumed = resumed_how(r) if r["resumed"] else "-"
            lines.append(f"| {ROWS[r['row']].label} | {COLUMNS[r['column']][1]} | "
                         f"{' '.join(r.get('variant', [])) or '-'} | {r['test'][r['metric']]:.2f} "
                         f"({r['seed']}) | {r['best_validation']['epoch']} | {r['lr']:g} | {r['global_step']} | "
                         f"{r['wall_time_s'] / 60:.1f} min | {resumed} |")
    return "\n".join(lines) + "\n"
