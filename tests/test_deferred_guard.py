"""The non-finite guard with check_every_n_steps > 1: sync-free steps, the bad step skipped on the device by the fused
optimiser, and the same parameters and optimiser state as the guard that reads every step."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch

from catvae.callbacks import NonFiniteGuard
from test_host_sync import no_host_reads

OPTIMISERS = {"adam": functools.partial(torch.optim.Adam, lr=1e-2, fused=True),
              "adamw": functools.partial(torch.optim.AdamW, lr=1e-2, fused=True)}
STEPS, BAD_STEP, BAD_PARAMETER = 7, 2, "1.weight"


def train(guard: NonFiniteGuard, optimiser_factory, bad_steps=(BAD_STEP,), bad_value=math.nan, end: bool = True):
    """Seven steps of a small regression driven through the guard's hooks as Lightning calls them; a gradient
    entry of 1.weight is set to ``bad_value`` at ``bad_steps``. Returns (module, optimiser) after the last step
    (and after on_train_end when ``end``)."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    module.estimator, module.device = SimpleNamespace(name="rloo"), torch.device("cpu")
    optimiser = optimiser_factory(module.parameters())
    trainer = SimpleNamespace(global_step=0, optimizers=[optimiser], precision_plugin=SimpleNamespace(),
                              _logger_connector=SimpleNamespace(should_update_logs=False))
    guard.on_fit_start(trainer, module)
    guard.on_train_start(trainer, module)
    x = torch.randn(8, 3)
    for step in range(STEPS):
        loss = module(x + step).pow(2).mean()
        guard.on_before_backward(trainer, module, loss)
        loss.backward()
        if step in bad_steps:
            module[1].weight.grad[0, 1] = bad_value
        guard.on_before_optimizer_step(trainer, module, optimiser)
        optimiser.step()
        optimiser.zero_grad()
        trainer.global_step += 1
        guard.on_train_batch_end(trainer, module, None, None, step)
    if end:
        guard.on_train_end(trainer, module)
    return module, optimiser


def state(module, optimiser) -> list[torch.Tensor]:
    return [*module.parameters(), *(t for s in optimiser.state.values() for t in s.values() if torch.is_tensor(t))]


@pytest.mark.parametrize("optimiser", OPTIMISERS)
@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
@pytest.mark.parametrize("bad_step", [0, BAD_STEP])  # 0: the optimiser's state does not exist yet
def test_deferred_skip_equals_the_per_step_skip(optimiser, bad_value, bad_step):
    """The fused optimiser's on-device skip leaves parameters, moments and step counts exactly as dropping the
    gradients does (the per-step guard), and differs from training on the bad step's finite part."""
    reference, deferred = NonFiniteGuard("skip"), NonFiniteGuard("skip", check_every_n_steps=3)
    expected = state(*train(reference, OPTIMISERS[optimiser], bad_steps=(bad_step,), bad_value=bad_value))
    got = state(*train(deferred, OPTIMISERS[optimiser], bad_steps=(bad_step,), bad_value=bad_value))
    assert reference.skipped == deferred.skipped == 1
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(torch.isfinite(t).all() for t in got)
    unskipped = state(*train(NonFiniteGuard("skip"), OPTIMISERS[optimiser], bad_steps=()))
    assert not torch.equal(unskipped[0], got[0])


def test_deferred_raise_names_the_first_bad_step_at_the_next_read():
    """Bad steps 2 and 4, reads every 3 steps: the read after step 2 (global step 3) raises naming step 2 and the
    tensor; the bad update was never applied."""
    guard = NonFiniteGuard("raise", check_every_n_steps=3)
    with pytest.raises(FloatingPointError, match=rf"non-finite gradient of {BAD_PARAMETER} at step 2 with estimator rloo"):
        train(guard, OPTIMISERS["adam"], bad_steps=(2, 4))


def test_deferred_skip_counts_every_bad_step_and_reports_the_first(caplog):
    guard = NonFiniteGuard("skip", check_every_n_steps=5)
    train(guard, OPTIMISERS["adam"], bad_steps=(1, 3, 6))
    assert guard.skipped == 3
    # reads at global steps 5 (bad steps 1, 3) and at the end of training (bad step 6)
    assert f"skipped 2 update(s), the first: non-finite gradient of {BAD_PARAMETER} at step 1" in caplog.text
    assert f"skipped 1 update(s), the first: non-finite gradient of {BAD_PARAMETER} at step 6" in caplog.text


def without_host_reads(guard: NonFiniteGuard) -> NonFiniteGuard:
    """The guard with its per-step hooks run under no_host_reads."""
    for name in ("on_before_backward", "on_before_optimizer_step", "on_train_batch_end"):
        def hook(*args, method=getattr(guard, name)):
            with no_host_reads():
                return method(*args)
        setattr(guard, name, hook)
    return guard


def test_deferred_steps_read_nothing_on_the_host():
    """Between reads the guard's per-step hooks never convert a tensor to a Python value; the per-step guard
    does (so the test can tell)."""
    guard = without_host_reads(NonFiniteGuard("skip", check_every_n_steps=100))
    train(guard, OPTIMISERS["adam"])
    assert guard.skipped == 1  # read at the end of training
    with pytest.raises(RuntimeError, match="host read"):
        train(without_host_reads(NonFiniteGuard("skip")), OPTIMISERS["adam"])


def test_torchs_fused_sgd_leaves_garbage_momentum_after_a_skipped_first_step():
    """Why the deferred guard refuses fused SGD: with momentum, a first step skipped through found_inf leaves the
    momentum buffer uninitialised, so the next step moves the parameters by garbage (if torch fixes this, this
    test fails and SGD can join Adam and AdamW)."""
    parameter = torch.nn.Parameter(torch.zeros(10_000))
    sgd = torch.optim.SGD([parameter], lr=0.1, momentum=0.9, fused=True)
    for found_inf, grad in ((1.0, math.nan), (0.0, 1.0)):
        sgd.found_inf, parameter.grad = torch.tensor(found_inf), torch.full_like(parameter, grad)
        stale = torch.full_like(parameter, 7.0)
        del stale  # its freed block is what the allocator hands to a new buffer of the same size: not fresh zeros
        sgd.step()
    assert not torch.allclose(parameter.detach(), torch.full_like(parameter, -0.1))


@pytest.mark.parametrize("optimiser", [functools.partial(torch.optim.Adam, lr=1e-2),
                                       functools.partial(torch.optim.SGD, lr=1e-2, momentum=0.9, fused=True)])
def test_deferred_mode_refuses_an_optimiser_that_cannot_skip_on_the_device(optimiser):
    guard = NonFiniteGuard("raise", check_every_n_steps=10)
    with pytest.raises(ValueError, match=r"check_every_n_steps=10 needs an optimiser .*fused Adam or AdamW.*got "
                                         rf"{optimiser.func.__name__} with fused={optimiser.keywords.get('fused')}"):
        train(guard, optimiser)


def test_check_every_n_steps_must_be_a_positive_integer():
    with pytest.raises(ValueError, match=r"check_every_n_steps must be an integer >= 1, got 0"):
        NonFiniteGuard("raise", check_every_n_steps=0)


def test_a_checkpoint_reads_the_pending_steps_into_the_saved_count():
    guard = NonFiniteGuard("skip", check_every_n_steps=1000)
    train(guard, OPTIMISERS["adam"], bad_steps=(1, 5), end=False)
    assert guard.skipped == 0  # not read yet
    assert guard.state_dict() == {"skipped": 2} and guard.skipped == 2
    assert guard.state_dict() == {"skipped": 2}  # read once
    raising = NonFiniteGuard("raise", check_every_n_steps=1000)
    train(raising, OPTIMISERS["adam"], end=False)
    with pytest.raises(FloatingPointError, match="at step 2"):
        raising.state_dict()
