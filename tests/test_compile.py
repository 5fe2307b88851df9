"""compile=networks: torch.compile of the model's networks gives the eager run's results on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from catvae.compile import CompileNetworks
from catvae.estimators import GumbelSoftmax
from catvae.run import run
from conftest import compose_config, FAST


def last_checkpoint(cfg) -> dict:
    return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("estimator", ["gumbel_softmax", "reinforce"])
def test_compiled_networks_train_to_the_eager_results(estimator, tmp_path):
    """Same seed, same data, two epochs: the compiled run's test metrics and final weights equal the eager
    run's up to float rounding (inductor may fuse and reorder float operations), and its checkpoint has the
    same keys, so either kind of run resumes the other."""
    runs = {}
    for mode in ("none", "networks"):
        cfg = compose_config(FAST + [f"estimator={estimator}", f"compile={mode}"], tmp_path / mode)
        runs[mode] = (run(cfg), last_checkpoint(cfg))
    (eager, eager_state), (compiled, compiled_state) = runs["none"], runs["networks"]
    assert compiled["metrics"].keys() == eager["metrics"].keys()
    for key, value in eager["metrics"].items():
        assert compiled["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
    assert compiled_state.keys() == eager_state.keys()
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_compile_reaches_networks_inside_containers_and_leaves_estimators_eager():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.estimator = GumbelSoftmax()
            self.layers = nn.ModuleList([nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 2), nn.ReLU())])
            self.head = nn.Linear(2, 1)

    model = Model()
    keys = set(model.state_dict())
    assert CompileNetworks()(model) == ["layers.0", "layers.1", "head"]
    assert set(model.state_dict()) == keys
    assert model.head._compiled_call_impl is not None and model.layers[1]._compiled_call_impl is not None
    assert model.estimator._compiled_call_impl is None


@pytest.mark.parametrize("estimator", ["rebar", "relax"])
def test_compile_refuses_double_backward_estimators_before_training(estimator, tmp_path):
    cfg = compose_config(FAST + [f"estimator={estimator}", "compile=networks"], tmp_path / "run")
    with pytest.raises(ValueError, match=rf"compile=networks cannot train estimator {estimator}: .*use compile=none"):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("option, value", [("mode", "fast"), ("dynamic", "auto"), ("fullgraph", "yes")])
def test_compile_rejects_bad_options(option, value):
    with pytest.raises(ValueError, match=rf"compile\.{option}={value!r} is not allowed; choose one of"):
        CompileNetworks(**{option: value})
