"""Compare training runs from their local files (no W&B needed).

    python scripts/compare.py RUN_OR_MULTIRUN_DIR [...] [--out DIR]

A run directory holds ``.hydra/config.yaml`` (and, once finished, ``results.json`` and ``csv/metrics.csv``);
a multirun directory holds run directories. Writes to ``--out`` (default: the first directory's
``comparison/``):

- ``summary.md`` / ``summary.csv``: per estimator and tau, the number of seeds and mean +- std over seeds of
  test/nll_iw, test/nelbo, the best val/nelbo, the last logged gradient variance, training steps and wall time;
- ``runs.csv``: one row per run, failed (with the error from its status.json) and unfinished runs included;
- ``val_nelbo.png`` (validation -ELBO against steps, one panel per estimator, a line per tau (an annealed run: its
  schedule and final tau), band = min..max over seeds), ``nll_vs_tau.png`` (test/nll_iw against tau, error bars =
  std over seeds where there are several; estimators without a temperature as horizontal lines), ``grad_variance.png`` (the run's estimator's gradient variance against
  steps, from callbacks=grad_diagnostics), ``grad_panel.png`` (per run with a diagnostics panel: the gradient
  variance of every estimator measured at that run's parameters, and the reference's);
- ``panel.csv`` / ``panel.md`` (runs with callbacks=grad_diagnostics): per run, diagnostic step and measured
  estimator, its objective evaluations per estimate and var, var_x_evals (the equal-work variance), snr, cos, bias,
  bias_se of the encoder's gradient; panel.md shows each run's last diagnostic, lowest var_x_evals first.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from catvae.sweep import run_state  # noqa: E402

SUMMARY_METRICS = ("test/nll_iw", "test/nelbo", "best val/nelbo", "grad var", "steps", "wall time (min)")


@dataclass
class Run:
    directory: Path
    estimator: str
    tau: float | None
    seed: int
    # finished | failed (status.json says why) | interrupted (killed: status.json says running, its process is gone)
    # | running (its process is alive, or on another host) | unfinished (no results and no status to tell why)
    status: str
    schedule: str = "constant"  # the temperature schedule's name: a run's tau is its last value under it
    metrics: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) for every CSV row where ``key`` was logged."""
        return [(int(float(row["step"])), float(row[key])) for row in self.rows if row.get(key) not in (None, "")]

    @property
    def group(self) -> tuple[str, float | None]:
        return self.estimator, self.tau


def find_run_dirs(path: Path) -> list[Path]:
    if (path / ".hydra" / "config.yaml").is_file():
        return [path]
    return sorted((p.parent.parent for p in path.rglob(".hydra/config.yaml")), key=lambda p: str(p))


def load_run(directory: Path) -> Run:
    config = OmegaConf.load(directory / ".hydra" / "config.yaml")
    results_file, metrics_file = directory / "results.json", directory / "csv" / "metrics.csv"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    rows = []
    if metrics_file.is_file():
        with metrics_file.open() as handle:
            rows = list(csv.DictReader(handle))
    estimator = results.get("estimator") or OmegaConf.select(config, "estimator.name") or "?"
    # the final temperature of a finished run, the configured one of an unfinished run
    tau = results.get("tau") if results else OmegaConf.select(config, "estimator.tau")
    status_file = directory / "status.json"
    recorded = json.loads(status_file.read_text()) if status_file.is_file() else None
    state = run_state(recorded)
    status = "finished" if results else (state if state in ("failed", "interrupted", "running") else "unfinished")
    recorded = recorded or {}
    schedule = OmegaConf.select(config, "schedule.name") or "constant"
    error = " ".join(recorded["error"].split()) if recorded.get("error") else None
    run = Run(directory, estimator, tau, int(config.seed), status, schedule, dict(results.get("metrics", {})), rows,
              error)
    if results:
        run.metrics["steps"] = results["global_step"]
        run.metrics["wall time (min)"] = results["wall_time_s"] / 60
    val = run.series("val/nelbo")
    if val:
        run.metrics["best val/nelbo"] = min(v for _, v in val)
    grad = run.series(f"grad/{estimator}/var")
    if grad:
        run.metrics["grad var"] = grad[-1][1]
    return run


def load_runs(paths: list[Path]) -> list[Run]:
    directories = [d for path in paths for d in find_run_dirs(path)]
    if not directories:
        raise SystemExit(f"no runs found under {', '.join(map(str, paths))}: a run directory holds "
                         f".hydra/config.yaml, a multirun directory holds run directories")
    return [load_run(d) for d in directories]


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarise(runs: list[Run]) -> list[dict]:
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        if run.status == "finished":
            groups[run.group].append(run)
    rows = []
    for (estimator, tau), members in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        row = {"estimator": estimator, "tau": tau, "seeds": len(members)}
        for key in SUMMARY_METRICS:
            row[key] = mean_std([r.metrics[key] for r in members if key in r.metrics])
        rows.append(row)
    return rows


def format_cell(value: tuple[float, float]) -> str:
    mean, std = value
    if math.isnan(mean):
        return "-"
    if float(mean).is_integer() and math.isnan(std):
        text = f"{int(mean)}"
    elif abs(mean) < 1e-2 or abs(mean) >= 1e4:
        text = f"{mean:.4g}"
    else:
        text = f"{mean:.2f}"
    return text if math.isnan(std) else f"{text} +- {std:.2g}"


def summary_markdown(runs: list[Run], summary: list[dict]) -> str:
    """summary.md: the table of :func:`summarise` and the list of unfinished or failed runs."""
    lines = ["| estimator | tau | seeds | " + " | ".join(SUMMARY_METRICS) + " |",
             "|---|---|---|" + "---|" * len(SUMMARY_METRICS)]
    for row in summary:
        tau = "-" if row["tau"] is None else f"{row['tau']:g}"
        lines.append(f"| {row['estimator']} | {tau} | {row['seeds']} | "
                     + " | ".join(format_cell(row[key]) for key in SUMMARY_METRICS) + " |")
    unfinished = [r for r in runs if r.status != "finished"]
    if unfinished:
        lines += ["", "Unfinished or failed runs (no results.json):", ""]
        lines += [f"- `{r.directory}`: {r.status}; {r.estimator}, tau {r.tau}, seed {r.seed}, "
                  f"last logged step {max((s for s, _ in r.series('train/loss')), default='none')}"
                  + (f"; {r.error}" if r.error else "") for r in unfinished]
    return "\n".join(lines) + "\n"


def write_tables(runs: list[Run], summary: list[dict], out: Path) -> None:
    (out / "summary.md").write_text(summary_markdown(runs, summary))
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["estimator", "tau", "seeds"] + [f"{k} {s}" for k in SUMMARY_METRICS for s in ("mean", "std")])
        for row in summary:
            writer.writerow([row["estimator"], row["tau"], row["seeds"]] + [v for k in SUMMARY_METRICS for v in row[k]])
    with (out / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["directory", "status", "estimator", "tau", "seed", *SUMMARY_METRICS, "error"])
        for r in runs:
            writer.writerow([r.directory, r.status, r.estimator, r.tau, r.seed,
                             *(r.metrics.get(k, "") for k in SUMMARY_METRICS), r.error or ""])


def by_estimator(runs: list[Run]) -> dict[str, dict[float | None, list[Run]]]:
    grouped: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[run.estimator][run.tau].append(run)
    return grouped


def tau_label(tau: float | None, schedule: str) -> str:
    """A legend entry for a run's temperature: fixed, annealed by its schedule to a final value, or none."""
    if tau is None:
        return "no temperature"
    return f"tau={tau:g}" if schedule == "constant" else f"{schedule}, final tau={tau:g}"


def plot_curves(runs: list[Run], key_of, ylabel: str, path: Path, log_y: bool = False) -> bool:
    """One panel per estimator, one line per tau (mean over seeds at the steps all seeds share, band min..max)."""
    grouped = {name: taus for name, taus in by_estimator(runs).items()
               if any(r.series(key_of(name)) for rs in taus.values() for r in rs)}
    if not grouped:
        return False
    columns = min(4, len(grouped))
    rows = math.ceil(len(grouped) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False, sharey=True)
    for ax in list(axes.flat)[len(grouped):]:
        ax.axis("off")
    for ax, (name, taus) in zip(axes.flat, sorted(grouped.items())):
        for tau, members in sorted(taus.items(), key=lambda item: item[0] or 0):
            series = [dict(r.series(key_of(name))) for r in members]
            steps = sorted(set.intersection(*(set(s) for s in series)))
            if not steps:
                continue
            values = [[s[step] for s in series] for step in steps]
            label = tau_label(tau, members[0].schedule)
            line, = ax.plot(steps, [statistics.fmean(v) for v in values], label=f"{label} ({seeds_text([len(members)])})")
            if len(members) > 1:
                ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2,
                                color=line.get_color())
        ax.set_title(name)
        ax.set_xlabel("step")
        if log_y:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def seeds_text(seed_counts: list[int]) -> str:
    """'1 seed', '3 seeds', '1-3 seeds'."""
    counts = sorted(set(seed_counts))
    return f"{'-'.join(map(str, counts))} seed{'s' if counts[-1] > 1 else ''}"


def plot_nll_vs_tau(summary: list[dict], path: Path) -> bool:
    rows = [r for r in summary if not math.isnan(r["test/nll_iw"][0])]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    taus = sorted({r["tau"] for r in rows if r["tau"] is not None})
    for index, name in enumerate(sorted({r["estimator"] for r in rows})):
        color = plt.get_cmap("tab10")(index % 10)
        mine = sorted((r for r in rows if r["estimator"] == name), key=lambda r: r["tau"] or 0)
        seeds = seeds_text([r["seeds"] for r in mine])
        if mine[0]["tau"] is None:
            ax.axhline(mine[0]["test/nll_iw"][0], linestyle="--", linewidth=1, color=color,
                       label=f"{name} (no temperature, {seeds})")
            continue
        several = all(r["seeds"] > 1 for r in mine)  # error bars only where there is a spread over seeds
        ax.errorbar([r["tau"] for r in mine], [r["test/nll_iw"][0] for r in mine], marker="o", capsize=3,
                    yerr=[r["test/nll_iw"][1] for r in mine] if several else None, color=color,
                    label=f"{name} ({seeds}{', bars: std' if several else ''})")
    if taus:
        ax.set_xscale("log")
        ax.set_xticks(taus, [f"{t:g}" for t in taus])
    ax.set_xlabel("tau")
    ax.set_ylabel("test/nll_iw (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def measured(run: Run) -> list[str]:
    """The estimators (and ``reference``) whose gradient variance the run's diagnostics logged."""
    return sorted(key.split("/")[1] for key in (run.rows[0] if run.rows else {})
                  if key.startswith("grad/") and key.endswith("/var") and key.count("/") == 2 and run.series(key))


PANEL_STATS = ("var", "var_x_evals", "snr", "cos", "bias", "bias_se")
PANEL_COLUMNS = ("run", "trained by", "tau", "seed", "step", "estimator", "evaluations", *PANEL_STATS)


def run_labels(runs: list[Run]) -> list[str]:
    """Each run's directory relative to the runs' common parent (``tau_sweep/0``, ``score_function/0``: two
    multiruns' jobs keep distinct names); a single run's is its directory's name."""
    if len(runs) == 1:
        return [runs[0].directory.name]
    parent = Path(os.path.commonpath([run.directory.resolve() for run in runs]))
    return [run.directory.resolve().relative_to(parent).as_posix() for run in runs]


def panel_rows(runs: list[Run]) -> list[dict]:
    """One row per run, diagnostic step and measured estimator (the reference has no evaluations count)."""
    rows = []
    for run, label in zip(runs, run_labels(runs)):
        for name in measured(run):
            if name == "reference":
                continue
            series = {stat: dict(run.series(f"grad/{name}/{stat}")) for stat in PANEL_STATS}
            for step, var in sorted(series["var"].items()):
                row = {"run": label, "trained by": run.estimator, "tau": run.tau, "seed": run.seed,
                       "step": step, "estimator": name, **{stat: series[stat].get(step) for stat in PANEL_STATS}}
                row["evaluations"] = round(row["var_x_evals"] / var) if row["var_x_evals"] is not None and var else None
                rows.append(row)
    return rows


def panel_markdown(rows: list[dict]) -> str:
    """Each run's last diagnostic as a table, lowest var_x_evals first (rows as panel.csv gives them)."""
    lines = ["| trained by | step | estimator | evaluations | var | var x evals | snr | cos | bias | bias_se |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    last = {}
    for row in rows:
        last[row["run"]] = max(last.get(row["run"], 0), int(row["step"]))
    chosen = [r for r in rows if int(r["step"]) == last[r["run"]]]
    def number(value) -> str:
        return "-" if value in (None, "") else f"{float(value):.3g}"

    for row in sorted(chosen, key=lambda r: (r["run"], float(r["var_x_evals"] or math.inf))):
        tau = "" if row["tau"] in (None, "") else f" (tau {float(row['tau']):g})"
        lines.append(f"| {row['trained by']}{tau}, seed {row['seed']} | {row['step']} | {row['estimator']} | "
                     f"{row['evaluations'] or '-'} | " + " | ".join(number(row[key]) for key in PANEL_STATS) + " |")
    return "\n".join(lines) + "\n"


def write_panel(runs: list[Run], out: Path) -> bool:
    rows = panel_rows(runs)
    if not rows:
        return False
    with (out / "panel.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, PANEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "panel.md").write_text(panel_markdown(rows))
    return True


def plot_panels(runs: list[Run], path: Path, most: int = 12) -> bool:
    """Per run with a diagnostics panel: every measured estimator's gradient variance at that run's parameters."""
    panels = [(run, names) for run in runs if len(names := measured(run)) > 1][:most]
    if not panels:
        return False
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False)
    colors = {name: plt.get_cmap("tab10")(i % 10)
              for i, name in enumerate(sorted({n for _, names in panels for n in names}))}
    for ax, (run, names) in zip(axes.flat, panels):
        for name in names:
            steps, values = zip(*run.series(f"grad/{name}/var"))
            ax.plot(steps, values, label=name, color=colors[name], linestyle="--" if name == "reference" else "-")
        tau = "" if run.tau is None else f", tau={run.tau:g}"
        ax.set_title(f"trained by {run.estimator}{tau}, seed {run.seed}", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes[0][0].set_ylabel("gradient variance (encoder)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def compare(paths: list[Path], out: Path) -> dict:
    runs = load_runs(paths)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs)
    write_tables(runs, summary, out)
    figures = {
        "val_nelbo.png": plot_curves(runs, lambda name: "val/nelbo", "val/nelbo (nats)", out / "val_nelbo.png"),
        "nll_vs_tau.png": plot_nll_vs_tau(summary, out / "nll_vs_tau.png"),
        "grad_variance.png": plot_curves(runs, lambda name: f"grad/{name}/var", "gradient variance (encoder)",
                                         out / "grad_variance.png", log_y=True),
        "grad_panel.png": plot_panels(runs, out / "grad_panel.png"),
        "panel.csv": write_panel(runs, out),
    }
    return {"runs": runs, "summary": summary, "figures": figures}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories")
    parser.add_argument("--out", type=Path, help="output directory (default: <first dir>/comparison)")
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing:
        raise SystemExit(f"not a directory: {', '.join(map(str, missing))}")
    out = args.out or args.dirs[0] / "comparison"
    result = compare(args.dirs, out)
    print((out / "summary.md").read_text())
    for name, written in result["figures"].items():
        print(f"{out / name}" if written else f"{name}: nothing to plot (no such metric in these runs)")
    failed = sum(r.status != "finished" for r in result["runs"])
    if failed:
        print(f"{failed} of {len(result['runs'])} runs unfinished or failed (listed in summary.md)", file=sys.stderr)


if __name__ == "__main__":
    main()
