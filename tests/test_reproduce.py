"""scripts/reproduce_jang2017.py: selection on validation, seeds, the table, and continuing a stopped reproduction."""

import csv
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import compare  # noqa: E402
import reproduce_jang2017 as reproduce  # noqa: E402

TINY = ["data=synthetic", "data.batch_size=64", "model.n_vars=3", "model.n_classes=3", "model.val_samples=10",
        "model.test_samples=20", "trainer=cpu", "trainer.max_epochs=1", "trainer.enable_model_summary=false"]


def script(out, *args):
    command = [sys.executable, "scripts/reproduce_jang2017.py", "--out", str(out), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_a_row_end_to_end_then_nothing_to_redo(tmp_path):
    out = tmp_path / "table1"
    args = ["--rows", "sbn_cat", "--columns", "st,gumbel_softmax", "--grid", "1e-1,1e-4", "--seeds", "0,1", *TINY]
    script(out, *args)
    row = reproduce.ROWS["sbn_cat"]
    with (out / "table1.csv").open() as handle:
        records = {r["column"]: r for r in csv.DictReader(handle)}
    assert set(records) == {"st", "gumbel_softmax"}
    for column, record in records.items():
        assert record["seeds"] == "2" and (float(record["paper"]),) == row.paper[column]
        # the selected learning rate is the one with the lower best val/nll among the seed-0 runs
        runs = [r for r in compare.load_runs([out / "sbn_cat" / "select"]) if reproduce.column_of(r) == column]
        best = min(runs, key=lambda r: min(value for _, value in r.series("val/nll")))
        assert record["setting"] == " ".join(reproduce.setting_of(best, row))
        seeds = compare.load_runs([out / "sbn_cat" / "seeds" / column])
        assert [r.seed for r in seeds] == [1] and reproduce.setting_of(seeds[0], row) == reproduce.setting_of(best, row)
        values = [best.metrics["test/nll"], seeds[0].metrics["test/nll"]]
        assert float(record["mean"]) == pytest.approx(sum(values) / 2, abs=0.01)
    assert "SBN (Cat.)" in (out / "table1.md").read_text()
    commands = (out / "commands.txt").read_text().splitlines()
    assert len(commands) == 4  # selection: temperature and other columns; seeds: one per column
    script(out, *args)  # everything is found again: nothing re-runs
    assert (out / "commands.txt").read_text().splitlines() == commands
    # a grid extended later runs only its new value, into new directories, and the table keeps 2 seeds per cell
    script(out, *[a if a != "1e-1,1e-4" else "1e-1,1e-4,3e-2" for a in args])
    added = (out / "commands.txt").read_text().splitlines()[len(commands):]
    selection = [c for c in added if "seed=0 " in c]
    assert len(selection) == 2 and all("model.optimizer.lr=3e-2 " in c and "/more0" in c for c in selection)
    assert len(compare.load_runs([out / "sbn_cat" / "select"])) == 6
    with (out / "table1.csv").open() as handle:
        assert [r["seeds"] for r in csv.DictReader(handle)] == ["2", "2"]


def test_vae_rows_select_the_temperature_schedule_for_the_gumbel_columns_only(tmp_path):
    printed = script(tmp_path, "--rows", "vae_bern", "--dry-run")
    temperature, other = [line for line in printed.splitlines() if line.startswith("[reproduce]")]
    assert "table1_column=gumbel_softmax,st_gumbel_softmax" in temperature
    assert "schedule.every=500,1000 schedule.rate=1e-5,1e-4" in temperature
    assert "schedule" not in other and "model.optimizer.lr=3e-5,1e-5,3e-4,1e-4,3e-3,1e-3" in other
    cpu = script(tmp_path / "cpu", "--rows", "sbn_bern", "--protocol", "cpu", "--dry-run")
    assert "protocol=cpu model.val_samples=10" in cpu and "model.optimizer.lr=1e-3,3e-3" in cpu and "schedule" not in cpu


def test_table2_selects_alpha_for_each_estimator(tmp_path):
    temperature, other = script(tmp_path, "--table", "2", "--protocol", "cpu", "--dry-run").splitlines()
    assert "experiment=jang2017_m2_cpu estimator=gumbel_softmax,st_gumbel_softmax model.alpha=0.1,0.3,1.0" in temperature
    assert "estimator=exact model.alpha=0.1,0.3,1.0 seed=0" in other and "protocol" not in other
    m2 = reproduce.ROWS["m2"]
    assert m2.better(0.9, 0.8) and not reproduce.ROWS["vae_cat"].better(0.9, 0.8)  # accuracy up, nats down


@pytest.mark.parametrize("args, message", [(["--rows", "sbn"], "unknown rows ['sbn']"),
                                           (["--columns", "sf,gumbel"], "unknown columns ['gumbel']"),
                                           (["--n-jobs", "0"], "--n-jobs must be >= 1, got 0")])
def test_bad_arguments_name_the_value(args, message, tmp_path):
    result = subprocess.run([sys.executable, "scripts/reproduce_jang2017.py", "--out", str(tmp_path), *args],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr


def test_cells_markdown_shows_each_csv_line_as_it_is_held():
    rows = [{"row": "sbn_cat", "column": "st", "metric": "nats", "paper": "61.8", "mean": "98.1", "std": "1.6",
             "seeds": "3", "setting": "model.optimizer.lr=0.003", "wall_time_min": "2.2"},
            {"row": "sbn_cat", "column": "rloo", "metric": "nats", "paper": "", "mean": "95.404", "std": "nan",
             "seeds": "1", "setting": "model.optimizer.lr=0.003 schedule.rate=1e-4", "wall_time_min": "0.36"}]
    assert reproduce.cells_markdown(rows).splitlines() == [
        "| row | column | paper | ours (mean +- std) | seeds | selected | wall time |",
        "|---|---|---|---|---|---|---|",
        "| SBN (Cat.) | ST | 61.8 | **98.10** +- 1.60 | 3 | lr=0.003 | 2.2 min |",
        "| SBN (Cat.) | RLOO | - | **95.40** | 1 | lr=0.003 rate=1e-4 | 0.4 min |"]
    rows[1]["metric"] = "accuracy %"
    assert reproduce.cells_markdown(rows).splitlines()[2] == (
        "| SBN (Cat.) | ST | nats | 61.8 | **98.10** +- 1.60 | 3 | lr=0.003 | 2.2 min |")
