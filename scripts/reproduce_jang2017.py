"""Reproduce Tables 1 and 2 of Jang, Gu & Poole (ICLR 2017) end to end, beside the paper's numbers.

For every row and column (estimator) of the table:

1. selection: one run (seed 0) per value of the row's grid, as in the paper: the learning rate for Table 1 (and
   for the Gumbel-Softmax columns of the VAE rows the temperature schedule (N, r) in {500, 1000} x {1e-5, 1e-4}),
   alpha for Table 2; the setting with the best validation metric (the row's checkpoint monitor for Table 1,
   validation accuracy for Table 2, at the best validation) is selected;
2. seeds: the selected setting re-trained with the other seeds (the selection run is reused as seed 0);
3. table: mean +- std over seeds of the test metrics (Table 1: SBN test/nll with m = 1000, VAE test/nll_iw with
   S = 1000; Table 2: ELBO = -test/nelbo and test accuracy), with the paper's numbers, the selected setting, the
   seeds and the wall time, as table<N>.md / table<N>.csv.

Every run is a ``python train.py -m ...`` multirun under ``--out``; the commands are printed and appended to
``commands.txt``. Finished runs are found again and not re-run, so an interrupted reproduction continues where
it stopped. ``--protocol cpu`` is the documented short protocol (conf/protocol/cpu.yaml, jang2017_m2_cpu).

    python scripts/reproduce_jang2017.py --table 1 --out runs/table1                    # the paper's protocol
    python scripts/reproduce_jang2017.py --table 1 --protocol cpu --rows vae_cat --n-jobs 2 --out runs/table1_cpu
    python scripts/reproduce_jang2017.py --table 1 --columns rloo,vimco,gumbel_rao ...   # modern columns
    python scripts/reproduce_jang2017.py --table 2 --protocol cpu --n-jobs 2 --out runs/table2_cpu
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from compare import Run, load_runs

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Metric:
    header: str
    key: str  # in results.json
    scale: float  # shown value = scale x the logged one (ELBO = -1 x test/nelbo, accuracy in %)


@dataclass(frozen=True)
class Row:
    label: str
    experiment: str
    column_key: str  # the override that picks a column: a conf/table1_column choice, or the estimator itself
    grid_key: str  # the hyperparameter selected on validation
    grids: dict[str, str]  # protocol -> the grid's values
    val_metric: str
    higher_is_better: bool
    metrics: tuple[Metric, ...]
    paper: dict[str, tuple[float, ...]]  # column -> the paper's values of the metrics
    temperature_schedule: bool = False  # the row anneals tau (VAE rows): the schedule is selected too
    binary: bool = False
    cpu_overrides: tuple[str, ...] = ()  # what the short CPU protocol fixes for this row
    cpu_experiment: str | None = None  # its own CPU experiment instead of protocol=cpu

    def overrides(self, protocol: str) -> list[str]:
        if protocol == "cpu" and self.cpu_experiment:
            return [f"experiment={self.cpu_experiment}", *self.cpu_overrides]
        return [f"experiment={self.experiment}", f"protocol={protocol}",
                *(self.cpu_overrides if protocol == "cpu" else ())]

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


# column (conf/table1_column/<column>.yaml, or the estimator of a Table 2 column) -> (the estimator name its runs
# record, the header)
COLUMNS = {
    "sf": ("reinforce_nvar", "SF"), "darn": ("darn", "DARN"), "muprop": ("muprop", "MuProp"), "st": ("st", "ST"),
    "annealed_st": ("slope_annealed_st", "Annealed ST"), "gumbel_softmax": ("gumbel_softmax", "Gumbel-S."),
    "st_gumbel_softmax": ("st_gumbel_softmax", "ST Gumbel-S."), "marginalization": ("exact", "Marginalization"),
    "rloo": ("rloo", "RLOO"), "vimco": ("vimco", "VIMCO"), "nvil": ("nvil", "NVIL"), "rebar": ("rebar", "REBAR"),
    "relax": ("relax", "RELAX"), "gumbel_rao": ("gumbel_rao", "Gumbel-Rao"), "gst": ("gst", "GST"),
    "reinmax": ("reinmax", "ReinMax"), "arm": ("arm", "ARM"), "disarm": ("disarm", "DisARM"),
    "carms": ("carms", "CARMS (S=4)"), "indecater": ("indecater", "IndeCateR"), "zgr": ("zgr", "ZGR"),
    "decoupled_st": ("decoupled_st", "Decoupled ST"), "double_cv": ("double_cv", "Double CV (S=4)"),
}
TABLE1_COLUMNS = ("sf", "darn", "muprop", "st", "annealed_st", "gumbel_softmax", "st_gumbel_softmax")
TABLE2_COLUMNS = ("marginalization", "gumbel_softmax", "st_gumbel_softmax")
BINARY_ONLY_COLUMNS = ("arm", "double_cv")  # disarm takes K > 2 too
TEMPERATURE_COLUMNS = ("gumbel_softmax", "st_gumbel_softmax")
SCHEDULE_GRID = ("schedule.every=500,1000", "schedule.rate=1e-5,1e-4")


def table1_row(label: str, experiment: str, model: str, paper: tuple[float, ...], binary: bool) -> Row:
    """A Table 1 row. The CPU protocol's learning rates: in 1,500 steps of SGD the smaller rates of the paper's grid
    fall far behind (docs/reproduction.md shows it measured); its fixed choices: the SBN's validation estimate with
    m = 10 samples (m = 100 would cost more than the training), the VAE's temperature schedule at N = 500,
    r = 1e-4 instead of a selection."""
    sbn = model == "sbn"
    return Row(label, experiment, "table1_column", "model.optimizer.lr",
               {"full": "3e-5,1e-5,3e-4,1e-4,3e-3,1e-3", "cpu": "1e-3,3e-3"},
               "val/nll" if sbn else "val/nelbo", False, (Metric("nats", "test/nll" if sbn else "test/nll_iw", 1.0),),
               {column: (value,) for column, value in zip(TABLE1_COLUMNS, paper)}, temperature_schedule=not sbn,
               binary=binary,
               cpu_overrides=("model.val_samples=10",) if sbn else ("schedule.every=500", "schedule.rate=1e-4"))


# Jang et al. (2017), Table 1 (nats, lower is better, in TABLE1_COLUMNS order) and Table 2 (ELBO, accuracy %)
ROWS = {
    "sbn_bern": table1_row("SBN (Bern.)", "jang2017_table1_sbn_bern", "sbn",
                           (72.0, 59.7, 58.9, 58.9, 58.7, 58.5, 59.3), binary=True),
    "sbn_cat": table1_row("SBN (Cat.)", "jang2017_table1_sbn_cat", "sbn",
                          (73.1, 67.9, 63.0, 61.8, 61.1, 59.0, 59.7), binary=False),
    "vae_bern": table1_row("VAE (Bern.)", "jang2017_table1_vae_bern", "vae",
                           (112.2, 110.9, 109.7, 116.0, 111.5, 105.0, 111.5), binary=True),
    "vae_cat": table1_row("VAE (Cat.)", "jang2017_table1_vae_cat", "vae",
                          (110.6, 128.8, 107.0, 110.9, 107.8, 101.5, 107.8), binary=False),
    "m2": Row("M2, 100 labels", "jang2017_m2", "estimator", "model.alpha",
              {"full": "0.1,0.2,0.3,0.8,1.0", "cpu": "0.1,0.3,1.0"}, "val/accuracy", True,
              (Metric("ELBO", "test/nelbo", -1.0), Metric("accuracy %", "test/accuracy", 100.0)),
              {"marginalization": (-106.8, 92.6), "gumbel_softmax": (-109.6, 92.4), "st_gumbel_softmax": (-110.7, 93.6)},
              cpu_experiment="jang2017_m2_cpu"),
}
TABLES = {1: (("sbn_bern", "sbn_cat", "vae_bern", "vae_cat"), TABLE1_COLUMNS), 2: (("m2",), TABLE2_COLUMNS)}


def column_of(run: Run) -> str:
    return next(column for column, (estimator, _) in COLUMNS.items() if estimator == run.estimator)


def setting_of(run: Run, row: Row) -> tuple[str, ...]:
    """The overrides that reproduce a selection run's setting: the grid's value (and temperature schedule)."""
    config = OmegaConf.load(run.directory / ".hydra" / "config.yaml")
    setting = (f"{row.grid_key}={OmegaConf.select(config, row.grid_key):g}",)
    if row.temperature_schedule and column_of(run) in TEMPERATURE_COLUMNS:
        setting += (f"schedule.every={config.schedule.every}", f"schedule.rate={config.schedule.rate:g}")
    return setting


def grid_value(run: Run, row: Row) -> float:
    return float(OmegaConf.select(OmegaConf.load(run.directory / ".hydra" / "config.yaml"), row.grid_key))


def fresh(directory: Path) -> Path:
    """``directory``, or a new subdirectory of it if it holds runs already: a multirun numbers its jobs from 0 and
    would overwrite them."""
    if not directory.exists():
        return directory
    count = sum(1 for p in directory.iterdir() if p.name.startswith("more"))
    return directory / f"more{count}"


def best_validation(run: Run, row: Row) -> float:
    """The best value of the row's validation metric over the run's validations (+-inf without any)."""
    values = [value for _, value in run.series(row.val_metric)]
    if row.higher_is_better:
        return max(values, default=-math.inf)
    return min(values, default=math.inf)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


class Reproduction:
    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def train(self, overrides: list[str], sweep_dir: Path) -> None:
        """One multirun of train.py; failures are reported by its sweep summary and the table, not fatal."""
        command = [sys.executable, "train.py", "-m", *overrides, "logger=csv", f"hydra.sweep.dir={sweep_dir}"]
        if self.args.n_jobs > 1:
            command += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={self.args.n_jobs}"]
        line = shlex.join(["python", *command[1:]])
        print(f"[reproduce] {line}", flush=True)
        with (self.out / "commands.txt").open("a") as handle:
            handle.write(line + "\n")
        if self.args.dry_run:
            return
        # one thread per job when jobs run side by side: the cores are shared out, not oversubscribed
        env = dict(os.environ, OMP_NUM_THREADS="1") if self.args.n_jobs > 1 else None
        result = subprocess.run(command, cwd=ROOT, env=env)
        if result.returncode != 0:
            print(f"[reproduce] some runs under {sweep_dir} failed (exit {result.returncode}); see its "
                  f"sweep_summary.json", flush=True)

    def finished(self, path: Path) -> list[Run]:
        if not path.exists():
            return []
        return [run for run in load_runs([path]) if run.status == "finished"]

    def base(self, row: Row) -> list[str]:
        return [*row.overrides(self.args.protocol), *self.args.overrides]

    def columns(self, row: Row) -> list[str]:
        return [c for c in self.args.columns if row.binary or c not in BINARY_ONLY_COLUMNS]

    def pick(self, row: Row, columns: list[str]) -> str:
        """The override choosing ``columns``: conf/table1_column choices, or the estimators themselves."""
        values = columns if row.column_key == "table1_column" else [COLUMNS[c][0] for c in columns]
        return f"{row.column_key}={','.join(values)}"

    def select(self, name: str) -> dict[str, Run]:
        """Selection runs (seed 0) for the grid values each column has not been run at (a grid extended later
        runs only its new values); returns the best run of each column on validation."""
        row, select_dir = ROWS[name], self.out / name / "select"
        grid = (self.args.grid or row.grids[self.args.protocol]).split(",")
        tried: dict[str, set[float]] = {}
        for run in self.finished(select_dir):
            tried.setdefault(column_of(run), set()).add(grid_value(run, row))
        schedule_grid = self.args.select_schedule and row.temperature_schedule
        for group, extra in (("temperature", SCHEDULE_GRID if schedule_grid else ()), ("other", ())):
            todo: dict[tuple[str, ...], list[str]] = {}  # missing grid values -> the columns missing them
            for column in self.columns(row):
                if (column in TEMPERATURE_COLUMNS) == (group == "temperature"):
                    missing = tuple(v for v in grid if float(v) not in tried.get(column, set()))
                    if missing:
                        todo.setdefault(missing, []).append(column)
            for missing, columns in todo.items():
                self.train([*self.base(row), self.pick(row, columns), f"{row.grid_key}={','.join(missing)}", *extra,
                            "seed=0"], fresh(select_dir / group))
        best: dict[str, Run] = {}
        for run in self.finished(select_dir):
            column = column_of(run)
            if column in self.columns(row) and (
                    column not in best or row.better(best_validation(run, row), best_validation(best[column], row))):
                best[column] = run
        return best

    def seeds(self, name: str, selected: dict[str, Run]) -> dict[str, list[Run]]:
        """The selected settings re-trained with the remaining seeds; the selection run is seed 0. Seed runs of
        another setting (selected before the grid was extended) are left aside."""
        row, runs = ROWS[name], {}
        for column, chosen in selected.items():
            seed_dir, setting = self.out / name / "seeds" / column, setting_of(chosen, row)
            matching = lambda: [r for r in self.finished(seed_dir) if setting_of(r, row) == setting]  # noqa: E731
            missing = [s for s in self.args.seeds if s != 0 and s not in {r.seed for r in matching()}]
            if missing:
                self.train([*self.base(row), self.pick(row, [column]), *setting,
                            f"seed={','.join(map(str, missing))}"], fresh(seed_dir))
            runs[column] = ([chosen] if 0 in self.args.seeds else []) + [
                r for r in matching() if r.seed in self.args.seeds]
        return runs

    def table(self, results: dict[str, dict[str, list[Run]]], selected: dict[str, dict[str, Run]]) -> None:
        """table<N>.md (paper / ours per cell and metric) and table<N>.csv (one line per cell and metric)."""
        columns = [c for c in self.args.columns if any(c in runs for runs in results.values())]
        lines = ["| row | metric | " + " | ".join(COLUMNS[c][1] for c in columns) + " |",
                 "|---|---|" + "---|" * len(columns)]
        records = []
        for name, runs in results.items():
            row = ROWS[name]
            for i, metric in enumerate(row.metrics):
                cells = []
                for column in columns:
                    values = [metric.scale * r.metrics[metric.key] for r in runs.get(column, [])]
                    paper = row.paper[column][i] if column in row.paper else None
                    if not values:
                        cells.append("-")
                        continue
                    mean, std = mean_std(values)
                    cells.append(f"{'' if paper is None else f'{paper:.1f} / '}**{mean:.1f}** +- {std:.1f}")
                    records.append({
                        "row": name, "column": column, "metric": metric.header, "paper": paper,
                        "mean": round(mean, 2), "std": round(std, 2), "seeds": len(values),
                        "setting": " ".join(setting_of(selected[name][column], row)),
                        "wall_time_min": round(sum(r.metrics.get("wall time (min)", 0.0) for r in runs[column]), 1)})
                lines.append(f"| {row.label} | {metric.header} | " + " | ".join(cells) + " |")
        note = (f"\nCells: paper / **ours** +- std over seeds {self.args.seeds} ({self.args.protocol} protocol).\n")
        (self.out / f"table{self.args.table}.md").write_text("\n".join(lines) + "\n" + note)
        if records:
            with (self.out / f"table{self.args.table}.csv").open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(records[0]))
                writer.writeheader()
                writer.writerows(records)
        print("\n".join(lines) + note)

    def run(self) -> None:
        results, selected = {}, {}
        for name in self.args.rows:
            selected[name] = self.select(name)
            results[name] = {} if self.args.dry_run else self.seeds(name, selected[name])
        if not self.args.dry_run:
            self.table(results, selected)


def grid_markdown(rows: list[dict[str, str]]) -> str:
    """Rows x columns of a table<N>.csv (or several concatenated): each cell the mean with one decimal, "-" where the
    column did not run in that row; rows in the table's order, columns in the CSV's."""
    columns = list(dict.fromkeys(row["column"] for row in rows))
    cells = {(row["row"], row["column"]): f"{float(row['mean']):.1f}" for row in rows}
    order = [name for name in ROWS if any(row["row"] == name for row in rows)]
    lines = ["| row | " + " | ".join(COLUMNS[c][1] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {ROWS[name].label} | " + " | ".join(cells.get((name, c), "-") for c in columns) + " |"
              for name in order]
    return "\n".join(lines) + "\n"


def short_override(override: str) -> str:
    """An override without its group prefix: 'model.optimizer.lr=0.003' -> 'lr=0.003'."""
    key, value = override.split("=", 1)
    return f"{key.rsplit('.', 1)[-1]}={value}"


def cells_markdown(rows: list[dict[str, str]]) -> str:
    """One line per cell (and metric, where the CSV has several) of a table<N>.csv, as the CSV holds it: the paper's
    value, mean +- std (ddof=1) over the seeds to two decimals, the number of seeds, the selected setting (its
    overrides without their group prefix) and the wall time summed over the cell's runs."""
    several = len({row["metric"] for row in rows}) > 1
    lines = ["| row | column | " + ("metric | " if several else "")
             + "paper | ours (mean +- std) | seeds | selected | wall time |",
             "|---|---|" + ("---|" if several else "") + "---|---|---|---|---|"]
    for row in rows:
        paper = f"{float(row['paper']):.1f}" if row["paper"] else "-"
        mean, std = float(row["mean"]), float(row["std"])
        ours = f"**{mean:.2f}**" + ("" if math.isnan(std) else f" +- {std:.2f}")
        setting = " ".join(short_override(override) for override in row["setting"].split())
        lines.append(f"| {ROWS[row['row']].label} | {COLUMNS[row['column']][1]} | "
                     + (f"{row['metric']} | " if several else "")
                     + f"{paper} | {ours} | {row['seeds']} | {setting} | {float(row['wall_time_min']):.1f} min |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory of all runs, commands.txt and table<N>.md/.csv")
    parser.add_argument("--campaign", type=Path, help="run Table 1 at full length (scripts/campaign.py) with its runs "
                                                      "under this directory; killed, it continues when run again")
    parser.add_argument("--records", type=Path, default=ROOT / "docs" / "reproduction" / "full",
                        help="where --campaign writes one JSON record per finished run")
    parser.add_argument("--launch-until", type=datetime.fromisoformat, metavar="TIME",
                        help="with --campaign: start no run after this time (ISO 8601, e.g. 2026-12-02T09:00+00:00), "
                             "let the running ones finish, then stop: for a machine that goes away at a known time")
    parser.add_argument("--table-from", type=Path, help="print full-length Table 1 from these records, run nothing")
    parser.add_argument("--page", type=Path, help="with --table-from: also write the table into this page, between its "
                                                  "<!-- full-table1 --> markers (docs/reproduction.md)")
    parser.add_argument("--table", type=int, choices=sorted(TABLES), default=1)
    parser.add_argument("--protocol", choices=("full", "cpu"), default="full")
    parser.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)} (default: the table's)")
    parser.add_argument("--columns", help=f"comma-separated subset of {','.join(COLUMNS)} (default: the paper's)")
    parser.add_argument("--grid", help="values of the selected hyperparameter, comma-separated (default: the "
                                       "row's; learning rates for Table 1, alpha for Table 2)")
    parser.add_argument("--select-schedule", action=argparse.BooleanOptionalAction, default=None,
                        help="select the VAE rows' temperature schedule (N, r) too (default: full protocol only)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n-jobs", type=int, default=1, help="jobs side by side (joblib launcher, 1 thread each)")
    parser.add_argument("--dry-run", action="store_true", help="print the selection commands, run nothing")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. trainer=gpu")
    args = parser.parse_args(argv)
    if not (args.out or args.campaign or args.table_from):
        parser.error("one of --out, --campaign, --table-from is required")
    rows, columns = TABLES[args.table]
    args.rows, args.columns = args.rows or ",".join(rows), args.columns or ",".join(columns)
    for key, allowed in (("rows", ROWS), ("columns", COLUMNS)):
        values = getattr(args, key).split(",")
        unknown = [v for v in values if v not in allowed]
        if unknown:
            parser.error(f"unknown {key} {unknown}; allowed: {', '.join(allowed)}")
        setattr(args, key, values)
    args.select_schedule = args.protocol == "full" if args.select_schedule is None else args.select_schedule
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.n_jobs < 1:
        parser.error(f"--n-jobs must be >= 1, got {args.n_jobs}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table_from or args.campaign:
        import campaign

        if args.table_from:
            table = campaign.table_markdown(campaign.load_records(args.table_from))
            print(table, end="")
            if args.page:
                campaign.write_table_into(args.page, table)
            return
        rows = [r for r in campaign.FULL_ROWS if r in args.rows]
        jobs = campaign.table1_jobs(rows, [c for c in TABLE1_COLUMNS if c in args.columns], args.seeds)
        until = args.launch_until.timestamp() if args.launch_until else None
        counts = campaign.Campaign(jobs, args.campaign, args.records, args.n_jobs, tuple(args.overrides),
                                   launch_until=until).run()
        print(f"[campaign] {len(jobs)} jobs: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
        if counts.get("failed"):
            raise SystemExit(1)
        return
    Reproduction(args).run()


if __name__ == "__main__":
    main()
