"""scripts/compare.py on a real 2x2 multirun (estimator x tau, with gradient diagnostics and the joblib
launcher), and scripts/figures.py against the limits of the Gumbel-Softmax distribution."""

import csv
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import FAST, ROOT
from test_training import train_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def script(name: str, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 estimators x 2 temperatures, run in parallel by the joblib launcher, diagnostics (with an rloo panel)
    every 4 steps."""
    tmp_path = tmp_path_factory.mktemp("compare")
    overrides = [o for o in FAST if not o.startswith("trainer.max_epochs")]
    done = train_cli("-m", *overrides, "trainer.max_epochs=2", "callbacks=grad_diagnostics",
                     "callbacks.grad_diagnostics.every_n_steps=4", "callbacks.grad_diagnostics.n_draws=4",
                     "+estimator@callbacks.grad_diagnostics.panel.rloo=rloo",
                     "estimator=gumbel_softmax,st_gumbel_softmax", "estimator.tau=0.5,1.0",
                     "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}/sweep",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "sweep"


def test_compare_writes_the_tables_and_every_figure(sweep, tmp_path):
    done = script("compare.py", sweep, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    for estimator in ("gumbel_softmax", "st_gumbel_softmax"):
        for tau in ("0.5", "1"):
            assert f"| {estimator} | {tau} | 1 |" in summary
    with open(tmp_path / "out" / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(float(row["test/nll_iw mean"]) > 0 for row in rows)
    assert all(float(row["grad var mean"]) > 0 for row in rows)  # diagnostics reached the table
    for figure in ("val_nelbo.png", "nll_vs_tau.png", "grad_variance.png", "grad_panel.png"):
        assert (tmp_path / "out" / figure).read_bytes()[:8] == PNG_MAGIC, figure


def test_compare_writes_the_equal_work_panel(sweep, tmp_path):
    """panel.csv: every run x diagnostic step x measured estimator, with evaluations = var_x_evals / var (rloo S = 4:
    4, the relaxed estimators: 1); panel.md is each run's last diagnostic, as panel_markdown gives it from the CSV."""
    done = script("compare.py", sweep, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "out" / "panel.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["estimator"], r["evaluations"]) for r in rows} == {("gumbel_softmax", "1"), ("st_gumbel_softmax", "1"),
                                                                  ("rloo", "4")}
    assert len({r["run"] for r in rows}) == 4 and {r["step"] for r in rows} == {"0", "4", "8", "12"}
    for row in rows:
        assert float(row["var_x_evals"]) == pytest.approx(float(row["var"]) * int(row["evaluations"]))
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare

    table = (tmp_path / "out" / "panel.md").read_text()
    assert table == compare.panel_markdown(rows) and table.count("\n") == 2 + 4 * 2  # header + 4 runs x 2


def test_two_multiruns_jobs_of_the_same_number_stay_apart_in_the_panel(sweep, tmp_path):
    """Comparing two multiruns (jobs 0-3 in each): the panel names a job by its path below the common parent, so
    each of the 8 runs keeps its own last diagnostic."""
    for name in ("tau_sweep", "score_function"):
        shutil.copytree(sweep, tmp_path / "runs" / name)
    done = script("compare.py", tmp_path / "runs" / "tau_sweep", tmp_path / "runs" / "score_function",
                  "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "out" / "panel.csv") as handle:
        runs = {r["run"] for r in csv.DictReader(handle)}
    assert runs == {f"{name}/{job}" for name in ("tau_sweep", "score_function") for job in range(4)}
    assert (tmp_path / "out" / "panel.md").read_text().count("\n") == 2 + 8 * 2


def test_compare_lists_unfinished_runs(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    (copy / "3" / "results.json").unlink()  # as if job 3 had failed or been killed
    done = script("compare.py", copy)
    assert done.returncode == 0, done.stderr
    summary = (copy / "comparison" / "summary.md").read_text()
    assert "Unfinished or failed runs" in summary and str(copy / "3") in summary
    assert "1 of 4 runs unfinished or failed" in done.stderr
    with open(copy / "comparison" / "runs.csv") as handle:
        statuses = {row["directory"].rsplit("/", 1)[-1]: row["status"] for row in csv.DictReader(handle)}
    assert statuses == {"0": "finished", "1": "finished", "2": "finished", "3": "unfinished"}


def test_compare_fails_clearly_without_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    done = script("compare.py", tmp_path / "empty")
    assert done.returncode != 0 and "no runs found under" in done.stderr
    done = script("compare.py", tmp_path / "missing")
    assert done.returncode != 0 and "not a directory" in done.stderr


def test_figure1_and_the_mean_soft_sample_table(tmp_path):
    done = script("figures.py", "--out", tmp_path, "--samples", "100000")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "gumbel_softmax_figure1.png").read_bytes()[:8] == PNG_MAGIC
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1]
            for line in (tmp_path / "gumbel_softmax_mean.md").read_text().splitlines()[2:]}

    def means(tau):
        return torch.tensor([float(cell.split("+-")[0]) for cell in rows[tau]])

    def errors(tau):
        return torch.tensor([float(cell.split("+-")[1]) for cell in rows[tau]])

    pi = torch.tensor([0.15, 0.4, 0.45])
    # tau -> 0: E[y] -> pi (Gumbel-max), within 4 standard errors (+ rounding); tau -> inf: -> uniform
    assert ((means("0.01") - pi).abs() <= 4 * errors("0.01") + 1e-4).all()
    assert (means("100") - 1 / 3).abs().max() < 0.005
    # and in between, the smallest class's mean grows monotonically with tau
    taus = ["0.01", "0.1", "0.5", "1", "2", "5", "10", "100"]
    smallest = [means(t)[0].item() for t in taus]
    assert smallest == sorted(smallest)


def test_figures_rejects_bad_probabilities(tmp_path):
    done = script("figures.py", "--out", tmp_path, "--probs", "0.5", "0.6")
    assert done.returncode != 0 and "--probs must be >= 2 positive numbers summing to 1" in done.stderr


def test_legends_name_an_annealed_temperature_and_show_no_error_bars_over_one_seed(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare

    assert compare.tau_label(0.5, "jang_exp") == "jang_exp, final tau=0.5"
    assert compare.tau_label(1.0, "constant") == "tau=1"
    assert compare.tau_label(None, "constant") == "no temperature"
    drawn = []
    original = compare.plt.Axes.errorbar
    monkeypatch.setattr(compare.plt.Axes, "errorbar",
                        lambda ax, *args, **kwargs: drawn.append(kwargs) or original(ax, *args, **kwargs))
    one_seed = [{"estimator": "gumbel_softmax", "tau": t, "seeds": 1, "test/nll_iw": (100.0 + t, float("nan"))}
                for t in (0.5, 1.0)]
    three = [dict(r, seeds=3, **{"test/nll_iw": (100.0, 1.5)}) for r in one_seed]
    assert compare.plot_nll_vs_tau(one_seed, tmp_path / "one.png") and compare.plot_nll_vs_tau(three, tmp_path / "3.png")
    assert drawn[0]["yerr"] is None and drawn[0]["label"] == "gumbel_softmax (1 seed)"
    assert drawn[1]["yerr"] == [1.5, 1.5] and drawn[1]["label"] == "gumbel_softmax (3 seeds, bars: std)"
