"""Timings of the single operations that performance.md's choices rest on, on the 20x10 VAE of jang2017_vae_cat.

    python scripts/micro_benchmarks.py [--calls 300] [--repeats 5] [--out docs/performance.md]

Each row is the median over ``--repeats`` of the mean time of ``--calls`` back-to-back calls (after as many warm-up
calls), in this process with torch's default threads; the gradients are those of one training step and stay in
cache between calls, so the optimiser and guard rows are lower bounds of their cost inside a training step:

- one Adam step (lr 1e-3) over the model's parameters: torch's default on the CPU (for-loop) and ``fused=True``;
- one SGD step with momentum 0.9 (Table 1's optimiser): default and ``fused=True``;
- the non-finite guard's reduction: one sum per gradient, torch._foreach_norm (the norms it used before) and
  GradScaler's fused non-finite check (which also multiplies the gradients by its scale, here 1);
- ``torch.cuda.is_available()`` with and without ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (set by importing Lightning);
- cutting a batch of 100 training images: ``images[index]`` and ``images.index_select(0, index)``;
- one-hot draws for a tenth of an SBN validation chunk (10 samples of 100 images x 200 binary units, K = 2), as the
  importance-weighted bound draws them: Gumbel-max (``sample_categorical``) and CDF inversion
  (``sample_categorical_by_inversion``);
- the guard's net cost inside a training step (``--steps`` rounds): whole steps (zero_grad, forward and backward on
  one of 50 random binary batches, the check and its host read, the fused Adam step) with each check against steps
  with none, the variants interleaved step by step in a rotating order. This counts what the cached rows cannot:
  the check reads gradients fresh from the backward pass, and leaves them in cache for the optimiser. Variants: the
  guard's sums after the backward pass (``catvae.callbacks.nonfinite_terms``), torch._foreach_norm, and the same
  sums taken in post-accumulate-grad hooks, while each gradient is still in cache from its backward kernel.

The table is printed and appended to ``--out`` with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from benchmark import machine, publish  # scripts/benchmark.py, beside this script
from catvae.callbacks import nonfinite_terms
from catvae.relaxations import sample_categorical, sample_categorical_by_inversion

ROOT = Path(__file__).resolve().parents[1]
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def per_call_us(function: Callable[[], object], calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean microseconds per call of ``calls`` calls, after ``calls`` warm-up calls."""
    for _ in range(calls):
        function()
    means = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        means.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(means)


def vae_with_gradients() -> torch.nn.Module:
    """jang2017_vae_cat's model (gumbel_softmax) after the backward of one training step on a random batch."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=jang2017_vae_cat", "estimator=gumbel_softmax"])
    torch.manual_seed(0)
    model = instantiate(cfg.model, estimator=instantiate(cfg.estimator), image_shape=[1, 28, 28])
    estimate, kl, _ = model.nelbo_estimate(torch.rand(100, 784).bernoulli())
    model.surrogate_loss(estimate, kl).backward()
    return model


def with_nvml_check(enabled: bool) -> Callable[[], bool]:
    """torch.cuda.is_available() with the variable set or unset for the call (the process's value restored)."""
    def timed() -> bool:
        saved = os.environ.pop(NVML_CHECK, None)
        if enabled:
            os.environ[NVML_CHECK] = "1"
        try:
            return torch.cuda.is_available()
        finally:
            os.environ.pop(NVML_CHECK, None)
            if saved is not None:
                os.environ[NVML_CHECK] = saved
    return timed


def rows(calls: int, repeats: int) -> list[tuple[str, str, float]]:
    model = vae_with_gradients()
    parameters = list(model.parameters())
    gradients = [p.grad for p in parameters]
    images, order = torch.rand(50_000, 1, 28, 28), torch.randperm(50_000)
    positions = iter(range(10**9))
    found_inf, one = torch.zeros(()), torch.ones(())
    sbn_logits = torch.randn(100, 200, 2)

    def index() -> torch.Tensor:
        i = next(positions) % 500
        return order[i * 100:(i + 1) * 100]

    def step(optimizer_class, **options) -> Callable[[], None]:
        return optimizer_class(parameters, **options).step

    timed = [
        ("Adam step", "torch default (for-loop on the CPU)", step(torch.optim.Adam, lr=1e-3)),
        ("Adam step", "fused=True", step(torch.optim.Adam, lr=1e-3, fused=True)),
        ("SGD step, momentum 0.9", "torch default", step(torch.optim.SGD, lr=1e-3, momentum=0.9)),
        ("SGD step, momentum 0.9", "fused=True", step(torch.optim.SGD, lr=1e-3, momentum=0.9, fused=True)),
        ("guard reduction", "one sum per gradient (now)",
         lambda: torch.stack([g.sum(dtype=torch.float32) for g in gradients]).sum()),
        ("guard reduction", "torch._foreach_norm (before)", lambda: torch.stack(torch._foreach_norm(gradients)).sum()),
        ("guard reduction", "torch._amp_foreach_non_finite_check_and_unscale_ (GradScaler's check, scale 1)",
         lambda: torch._amp_foreach_non_finite_check_and_unscale_(gradients, found_inf, one)),
        ("torch.cuda.is_available()", f"{NVML_CHECK}=1 (Lightning's)", with_nvml_check(True)),
        ("torch.cuda.is_available()", "unset (a catvae run)", with_nvml_check(False)),
        ("a batch of 100 images", "images[index] (before)", lambda: images[index()]),
        ("a batch of 100 images", "images.index_select(0, index) (now)", lambda: images.index_select(0, index())),
        ("one-hot draws, 10 x 100 x 200 x 2", "Gumbel-max, sample_categorical (training)",
         lambda: sample_categorical(sbn_logits, (10,))),
        ("one-hot draws, 10 x 100 x 200 x 2", "CDF inversion, sample_categorical_by_inversion (evaluation)",
         lambda: sample_categorical_by_inversion(sbn_logits, (10,))),
    ]
    with torch.no_grad():
        return [(what, how, per_call_us(function, calls, repeats)) for what, how, function in timed]


def guard_rows(steps: int) -> list[tuple[str, str, float]]:
    """Median us per whole training step with each guard check minus that with none (see the module docstring);
    the first row is the step without a check."""
    model = vae_with_gradients()
    parameters = list(model.parameters())
    optimizer = torch.optim.Adam(parameters, lr=1e-3, fused=True)
    generator = torch.Generator().manual_seed(0)
    batches = torch.rand(50, 100, 784, generator=generator).bernoulli(generator=generator)
    in_hooks: list[torch.Tensor] | None = None  # the hooks' sums while the hooked variant runs

    def hook(parameter: torch.Tensor) -> None:
        if in_hooks is not None:
            in_hooks.append(parameter.grad.sum(dtype=torch.float32))

    for parameter in parameters:
        parameter.register_post_accumulate_grad_hook(hook)
    checks = {
        "no check": lambda loss: False,
        "one sum per gradient after backward (the guard)":
            lambda loss: bool(~torch.isfinite(nonfinite_terms(loss, [p.grad for p in parameters]).sum())),
        "torch._foreach_norm after backward": lambda loss: bool(~torch.isfinite(
            torch.stack([loss.detach(), *torch._foreach_norm([p.grad for p in parameters])]).sum())),
        "sums in post-accumulate-grad hooks": lambda loss: bool(~torch.isfinite(
            torch.stack([loss.detach(), *in_hooks]).sum())),
    }
    names = list(checks)
    times: dict[str, list[float]] = {name: [] for name in names}
    warmup = max(1, steps // 10)
    for round_ in range(warmup + steps):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            in_hooks = [] if name == "sums in post-accumulate-grad hooks" else None
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            estimate, kl, _ = model.nelbo_estimate(batches[round_ % len(batches)])
            loss = model.surrogate_loss(estimate, kl)
            loss.backward()
            checks[name](loss.detach())
            optimizer.step()
            if round_ >= warmup:
                times[name].append((time.perf_counter() - started) * 1e6)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return [("training step", "no check (whole step)", medians["no check"])] + [
        ("guard in a training step, net", name, medians[name] - medians["no check"]) for name in names[1:]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300, help="rounds of the in-step guard rows")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    args = parser.parse_args(argv)
    if min(args.calls, args.repeats, args.steps) < 1:
        raise SystemExit(f"--calls, --repeats and --steps must be >= 1, got {args.calls}, {args.repeats}, {args.steps}")
    lines = [f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {machine(torch.device('cpu'))} with "
             f"`python scripts/micro_benchmarks.py "
             f"{' '.join(sys.argv[1:] if argv is None else argv)}` (medians of {args.repeats} means of "
             f"{args.calls} calls; the in-step rows medians of {args.steps} steps each):", "",
             "| operation | variant | us per call |", "|---|---|---|"]
    lines += [f"| {what} | {how} | {us:.1f} |" for what, how, us in rows(args.calls, args.repeats) + guard_rows(args.steps)]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
