"""scripts/campaign.py: the full-length Table 1 queue survives SIGKILL (of itself and its runs) and loses nothing, a
failing run is retried once, and the table is what the records give."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import campaign  # noqa: E402

# Tiny VAE (Cat.) runs: 3 epochs of 8 steps on synthetic data, a step checkpoint every 4 steps.
TINY = ("data=synthetic", "data.batch_size=64", "model.hidden_sizes=[16]", "model.n_vars=3", "model.n_classes=3",
        "model.iw_samples=10", "trainer.max_epochs=3", "callbacks.step_checkpoint.every_n_train_steps=4")
JOBS = "campaign.table1_jobs(['vae_cat'], ['gumbel_softmax', 'sf'], [0], sensitivity=(), variants=(), modern=())"


def start_campaign(directory, records, *overrides):
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import campaign; from pathlib import Path; "
            f"print(campaign.Campaign({JOBS}, Path({str(directory)!r}), Path({str(records)!r}), 2, "
            f"{tuple(TINY + overrides)!r}, poll_s=0.2).run())")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def kill_everything(process, directory):
    """SIGKILL the campaign and every run it started (as the end of a session does)."""
    os.killpg(process.pid, signal.SIGKILL)
    for launch in directory.rglob("campaign.json"):
        try:
            os.kill(json.loads(launch.read_text())["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def test_a_killed_campaign_continues_exactly_and_loses_nothing(tmp_path):
    """Killed (with its runs) once a run has written a mid-run checkpoint, started again: every job ends with a record,
    the killed ones were resumed (two parts) to the uninterrupted result, nothing finished is run again."""
    directory, records = tmp_path / "campaign", tmp_path / "records"
    process = start_campaign(directory, records)
    deadline = time.time() + 240
    while not any(directory.rglob("step000004.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    kill_everything(process, directory)
    assert list(directory.rglob("step000004.ckpt")), "no run reached its first checkpoint"
    killed = {path.parent.parent.parent.relative_to(directory).as_posix() for path in directory.rglob("*.ckpt")
              if not (path.parent.parent / "results.json").is_file()}
    again = start_campaign(directory, records)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output
    assert "{'done': 2}" in output, output
    uninterrupted = start_campaign(tmp_path / "clean", tmp_path / "clean_records")
    assert uninterrupted.wait(timeout=600) == 0
    assert killed, "the kill landed between runs"
    for key in killed:
        record = json.loads((records / f"{key}.json").read_text())
        clean = json.loads((tmp_path / "clean_records" / f"{key}.json").read_text())
        assert record["resumed"] and record["parts"] == 2 and record["resumed_from"] == [f"{key}/part0"]
        first, second = record["part_log"]  # the second part starts at the checkpoint it resumed, mid-run
        assert first["start_step"] == 0 and 0 < second["start_step"] < 24 and second["started"] > first["started"]
        for field in ("test", "global_step", "validation_curve", "best_validation", "overrides"):
            assert record[field] == clean[field], (key, field)
    for path in records.rglob("*.json"):
        assert json.loads(path.read_text())["global_step"] == 24
    rerun = start_campaign(directory, records)
    output, _ = rerun.communicate(timeout=120)
    assert "started" not in output and rerun.returncode == 0


def test_a_failing_run_is_retried_once_then_reported(tmp_path):
    jobs = campaign.table1_jobs(["vae_cat"], ["gumbel_softmax"], [0], sensitivity=(), variants=(), modern=())
    run = campaign.Campaign(jobs, tmp_path / "campaign", tmp_path / "records", 2, TINY + ("estimator.tau=-1",),
                            poll_s=0.2)
    assert run.run() == {"failed": 1}
    parts = campaign.parts_of(tmp_path / "campaign" / jobs[0].key)
    assert [campaign.part_state(p) for p in parts] == ["failed", "failed"]
    assert not (tmp_path / "records").exists()


def test_past_its_launch_time_a_campaign_starts_nothing_and_stops(tmp_path):
    jobs = campaign.table1_jobs(["vae_cat"], ["gumbel_softmax"], [0], sensitivity=(), variants=(), modern=())
    run = campaign.Campaign(jobs, tmp_path / "campaign", tmp_path / "records", 2, TINY, poll_s=0.2,
                            launch_until=time.time() - 1)
    assert run.run() == {"todo": 1}
    assert not campaign.parts_of(tmp_path / "campaign" / jobs[0].key)


def record(row, column, seed, value, epoch=90, parts=1, lr=0.003, **fields):
    return {"row": row, "column": column, "seed": seed, "lr": lr, "global_step": 50000, "metric": "test/nll_iw",
            "test": {"test/nll_iw": value}, "best_validation": {"metric": "val/nelbo", "value": value + 5,
                                                                  "epoch": epoch},
            "wall_time_s": 1200.0 + 60 * seed, "parts": parts, "resumed": parts > 1, **fields}


def test_the_table_gives_mean_std_and_seeds_of_the_records():
    records = [record("vae_cat", "gumbel_softmax", 0, 100.0), record("vae_cat", "gumbel_softmax", 1, 102.0, parts=3),
               record("vae_cat", "gumbel_softmax", 2, 104.0), record("sbn_bern", "sf", 0, 90.25)]
    table = campaign.table_markdown(records)
    grid_part = table.split("\n\n")[1]  # after the caption, before the per-cell lines
    grid = {line.split(" | ")[0].strip("| "): line for line in grid_part.splitlines() if line.startswith("| ")}
    assert "| 102.0 ± 2.0 (101.5) |" in grid["VAE (Cat.)"]  # mean, std with ddof=1, the paper's number
    assert "| 90.2 (72.0) |" in grid["SBN (Bern.)"] and "| - (58.5) |" in grid["SBN (Bern.)"]
    (detail,) = [line for line in table.splitlines() if line.startswith("| VAE (Cat.) | Gumbel-S. |")]
    assert detail == ("| VAE (Cat.) | Gumbel-S. | 101.5 | 102.0 ± 2.0 | 0: 100.00 (90), 1: 102.00 (90), 2: 104.00 (90) "
                      "| 0.003 | 50000 | 21.0 min | seed 1 (3 parts) |")


def test_the_queue_is_the_papers_columns_then_the_sensitivity_runs_then_the_variants_then_the_modern_columns():
    import csv

    jobs = campaign.table1_jobs()
    paper, sensitivity, variants, modern = jobs[:84], jobs[84:87], jobs[87:89], jobs[89:]
    assert [(j.row, j.column, j.seed) for j in paper] == [(row, column, seed) for row in campaign.FULL_ROWS
                                                          for seed in (0, 1, 2) for column in campaign.TABLE1_COLUMNS]
    assert [j.name for j in sensitivity] == ["lr0.001_seed0", "lr0.0003_seed0", "lr0.001_seed0"]
    assert [(j.row, j.column, j.name, j.lr) for j in variants] == [(row, "reinmax", "tau1_seed0", 3e-3)
                                                                   for row in ("vae_cat", "vae_bern")]
    assert all(j.overrides()[-1] == "schedule=constant" and j.key.endswith("/reinmax/tau1_seed0") for j in variants)
    ran = {}
    for path in campaign.MODERN_RUNS:
        with path.open() as handle:
            ran.update({(r["row"], r["column"]): r["setting"] for r in csv.DictReader(handle)})
    assert sorted((j.row, j.column) for j in modern) == sorted(ran) and len(modern) == 51
    assert all(j.seed == 0 and j.name == "seed0" and ran[j.row, j.column] == f"model.optimizer.lr={j.lr:g}"
               and j.column not in campaign.TABLE1_COLUMNS for j in modern)
    for block in (modern[:36], modern[36:]):  # each CSV's runs, rows in the campaign's order
        order = [campaign.FULL_ROWS.index(j.row) for j in block]
        assert order == sorted(order)


def test_a_protocol_variant_of_a_cell_no_modern_csv_ran_is_refused_by_name():
    with pytest.raises(ValueError, match=r"protocol variant 'tau1' of \(vae_cat, reinmax\): no modern CSV ran"):
        campaign.table1_jobs(["vae_cat"], modern=())


def test_a_modern_columns_record_has_a_table_of_its_own():
    records = [record("vae_cat", "gumbel_softmax", 0, 100.0), record("sbn_cat", "rloo", 0, 95.4, epoch=97, parts=2)]
    table = campaign.table_markdown(records)
    assert "RLOO" not in table.split("\n\n")[1]  # not in the paper's grid
    assert table.splitlines()[-1] == "| SBN (Cat.) | RLOO | - | 95.40 (0) | 97 | 0.003 | 50000 | 20.0 min | 2 parts |"
    assert "RLOO" not in campaign.table_markdown(records[:1])


def test_a_protocol_variant_is_listed_with_its_overrides_and_stays_out_of_the_grid():
    records = [record("vae_cat", "gumbel_softmax", 0, 100.0), record("vae_cat", "gumbel_softmax", 1, 102.0),
               record("vae_cat", "gumbel_softmax", 0, 90.0, variant=["schedule=constant"]),
               record("vae_cat", "reinmax", 0, 123.0, epoch=7),
               record("vae_cat", "reinmax", 0, 95.0, variant=["schedule=constant", "model.n_vars=30"])]
    table = campaign.table_markdown(records)
    assert "| 101.0 ± 1.4 (101.5) |" in table.split("\n\n")[1]  # the grid holds seeds 0 and 1 only
    assert table.splitlines()[-3:] == [
        "| VAE (Cat.) | Gumbel-S. | schedule=constant | 90.00 (0) | 90 | 0.003 | 50000 | 20.0 min | - |",
        "| VAE (Cat.) | ReinMax | - | 123.00 (0) | 7 | 0.003 | 50000 | 20.0 min | - |",
        "| VAE (Cat.) | ReinMax | schedule=constant model.n_vars=30 | 95.00 (0) | 90 | 0.003 | 50000 | 20.0 min | - |"]


def test_every_committed_record_ran_the_papers_length():
    for path in (ROOT / "docs" / "reproduction" / "full").rglob("*.json"):
        assert json.loads(path.read_text())["global_step"] == 50000, path


def test_the_page_shows_the_table_the_committed_records_give():
    page = (ROOT / "docs" / "reproduction.md").read_text()
    shown = re.search(r"<!-- full-table1 -->\n(.*?)<!-- /full-table1 -->", page, re.S)  # campaign.PAGE_MARKERS
    assert shown, "docs/reproduction.md lacks the full-length table's markers"
    assert shown.group(1) == campaign.table_markdown(campaign.load_records(ROOT / "docs" / "reproduction" / "full"))


@pytest.mark.parametrize("field", ["row", "column", "seed", "global_step", "overrides", "lr", "commits", "test",
                                   "best_validation", "validation_curve", "wall_time_s", "threads", "resumed",
                                   "resumed_from"])
def test_every_committed_record_has_what_the_table_and_a_reader_need(field):
    for path in (ROOT / "docs" / "reproduction" / "full").rglob("*.json"):
        assert field in json.loads(path.read_text()), (path, field)


def test_the_table_is_written_between_the_page_markers_and_nowhere_else(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# head\n<!-- full-table1 -->\nold table\n<!-- /full-table1 -->\ntail\n")
    campaign.write_table_into(page, "new table\n")
    assert page.read_text() == "# head\n<!-- full-table1 -->\nnew table\n<!-- /full-table1 -->\ntail\n"


def test_a_resumed_record_with_a_part_log_names_the_steps_it_resumed_at():
    log = [{"start_step": 0}, {"start_step": 14000}, {"start_step": 30500}]
    (detail,) = [line for line in campaign.table_markdown([record("vae_cat", "st", 1, 110.0, parts=3, part_log=log)])
                 .splitlines() if line.startswith("| VAE (Cat.) | ST |")]
    assert detail.endswith("| seed 1 (3 parts, at step 14,000 and 30,500) |")


def test_a_sensitivity_run_is_set_against_seed_0_at_the_selected_rate():
    selected = [record("vae_cat", "sf", seed, 126.0 + seed, lr=1e-3) for seed in (0, 1, 2)]
    worse = record("vae_cat", "sf", 0, 127.5, epoch=97, lr=3e-4)  # best validation 132.5 against the selected 131.0
    better = record("vae_cat", "gumbel_softmax", 0, 90.0, lr=1e-3)
    table = campaign.table_markdown([*selected, worse, better, record("vae_cat", "gumbel_softmax", 0, 93.0)])
    assert "| 127.0 ± 1.0 (110.6) |" in table  # the sensitivity run stays out of the cell's mean
    lines = table.splitlines()
    assert ("| VAE (Cat.) | Gumbel-S. | 0.001 | 90.00 | 95.00 (90) | 0.003 | 93.00 | 98.00 (90) | no | 20.0 min | - |"
            in lines)
    assert ("| VAE (Cat.) | SF | 0.0003 | 127.50 | 132.50 (97) | 0.001 | 126.00 | 131.00 (90) | yes | 20.0 min | - |"
            in lines)


def test_the_training_loss_curve_counts_each_step_once_across_parts(tmp_path):
    """A resumed part re-logs the steps its predecessor logged after the checkpoint: each step counts once."""
    header = "epoch,step,train/loss,val/nll\n"
    first, second = tmp_path / "part0", tmp_path / "part1"
    logged = {first: "0,1,10.0,\n0,3,8.0,\n0,3,,7.5\n1,5,6.0,\n", second: "1,5,6.0,\n1,7,4.0,\n1,7,,3.5\n"}
    for part, rows in logged.items():
        (part / "csv").mkdir(parents=True)
        (part / "csv" / "metrics.csv").write_text(header + rows)
    rows = campaign.metrics_rows([first, second])
    assert campaign.training_loss_curve(rows) == {0: 9.0, 1: 5.0}
    assert campaign.validation_curve(rows, "val/nll") == {0: 7.5, 1: 3.5}
