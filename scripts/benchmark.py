"""Training speed of catvae's full path against a minimal plain-PyTorch loop of the same model.

    python scripts/benchmark.py [--estimators gumbel_softmax reinforce ...] [--steps 300] [--warmup 50]
                                [--steps-per-call 1 4 16] [--device cpu|cuda] [--iw] [--overrides KEY=VALUE ...]
                                [--out docs/performance.md]

For each estimator, in this one process, on the same MNIST batches (batch 100, the 20x10 categorical VAE):

- catvae: ``train.py``'s path, composed from conf/ (Hydra config, Lightning Trainer, default callbacks, CSV
  logging every 50 steps; validation off so that only training steps are timed);
- plain: a hand-written loop (nn.Sequential encoder and decoder of the same sizes, the batches pre-cut in memory
  on the device) calling the same catvae estimator object, timed twice: with catvae's configured optimiser (the
  fused Adam of conf/model), so that the difference is framework cost, and with ``torch.optim.Adam(lr=1e-3)`` as
  torch builds it by default (a for-loop over the tensors on the CPU), the loop a researcher writes by hand.

All are timed over ``--steps`` steps after ``--warmup`` steps, ``--repeats`` times alternately; the medians
are reported (a shared machine's speed drifts by 10-20% between runs). Peak memory is the GPU's max allocated
memory on CUDA, and the process's peak resident set size on CPU (cumulative: it only grows across rows).
``--steps-per-call`` times catvae's path once per value of ``steps_per_call`` in each repeat (a row each, against
the same plain runs; with k > 1 the timing starts at the first call that starts at or after ``--warmup``).
``--overrides`` change catvae's path (e.g. ``~callbacks.nonfinite_guard`` times it without the non-finite guard,
``compile=networks`` with compiled networks; the plain loop stays eager).
Each table says how much of the cores' time the hypervisor stole during its invocation (on a virtual machine,
time the host gave to other guests). ``--iw`` also times the 1000-sample importance-weighted test bound on the
10,000 test images. ``--phases`` adds one more run of each path that splits a step's wall time into phases
(forward, backward, the hooks after backward, the optimiser, the time between steps; medians in ms), to show where
catvae's extra time goes. The tables are
printed and written to ``--out`` with the machine they ran on.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from catvae.evaluation import importance_weighted_nll
from catvae.models.networks import mlp
from catvae.models import CategoricalVAE
from catvae.relaxations import categorical_log_prob, kl_to_uniform
from catvae.run import build_model, group_steps, use_cached_cuda_check

ROOT = Path(__file__).resolve().parents[1]
BATCH, N_VARS, N_CLASSES = 100, 20, 10


class StepTimer(pl.Callback):
    """Wall time and count of the training steps from the first call that starts at or after step ``warmup`` to the
    end (with steps_per_call > 1 a call may start past ``warmup``)."""

    step_period = None  # acts once per call, at no particular step (catvae.step_calls)

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.started, self.first_step, self.elapsed, self.steps = None, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.started is None and trainer.global_step >= self.warmup:
            self.started, self.first_step = synced_time(self.device), trainer.global_step

    def on_train_end(self, trainer, pl_module):
        self.elapsed = synced_time(self.device) - self.started
        self.steps = trainer.global_step - self.first_step


PHASES = ("forward", "backward", "after backward", "optimizer", "between steps")


def synced_time(device: torch.device) -> float:
    """perf_counter once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class PhaseTimer(pl.Callback):
    """Time stamps of each training step after warm-up at the hooks that bound the phases (``--phases``): batch
    start, before backward, after backward, before the optimiser step, batch end. Appended after the other
    callbacks, so that their hooks fall inside the phases (the non-finite guard in "after backward")."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device, self.steps = warmup, device, []

    def stamp(self) -> None:
        self.steps[-1].append(synced_time(self.device))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.warmup:
            self.steps.append([])
        if self.steps:
            self.stamp()

    def on_before_backward(self, trainer, pl_module, loss):
        if self.steps:
            self.stamp()

    def on_after_backward(self, trainer, pl_module):
        if self.steps:
            self.stamp()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.steps:
            self.stamp()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.steps:
            self.stamp()


def phase_medians(steps: list[list[float]]) -> dict[str, float]:
    """Median ms of each phase from per-step stamps [start, before backward, after backward, before the optimiser
    step, end]; "between steps" runs from one step's end to the next one's start."""
    steps = [s for s in steps if len(s) == 5]
    phases = {name: [1000 * (s[i + 1] - s[i]) for s in steps] for i, name in enumerate(PHASES[:-1])}
    phases["between steps"] = [1000 * (b[0] - a[-1]) for a, b in zip(steps, steps[1:])]
    return {name: statistics.median(values) if values else math.nan for name, values in phases.items()}  # 1 step: no gap


def compose_run(estimator: str, device: str, out: Path, steps: int, extra: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"estimator={estimator}", "experiment=jang2017_vae_cat", "logger=csv", f"trainer={device.replace('cuda', 'gpu')}",
            f"+trainer.max_steps={steps}", "+trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "trainer.log_every_n_steps=50", *extra])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out / estimator)
    return cfg


def time_catvae(estimator: str, device: torch.device, warmup: int, steps: int, out: Path,
                extra: list[str] = (), phases: PhaseTimer | None = None,
                steps_per_call: int = 1) -> tuple[float, object, object]:
    """steps/s of catvae's path, the data module (for the plain loop) and the configured optimiser factory."""
    cfg = compose_run(estimator, device.type, out, warmup + steps, [*extra, f"steps_per_call={steps_per_call}"])
    use_cached_cuda_check()  # as train.py's run() does
    pl.seed_everything(0)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # as run() does
    model = build_model(cfg, list(datamodule.image_shape))
    timer = StepTimer(warmup, device)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()] + [instantiate(cfg.schedule), timer]
    callbacks += [phases] if phases else []
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    group_steps(trainer, model, datamodule, steps_per_call)  # as run() does
    trainer.fit(model, datamodule=datamodule)
    return timer.steps / timer.elapsed, datamodule, instantiate(cfg.model.optimizer)


def time_plain(estimator_name: str, datamodule, device: torch.device, warmup: int, steps: int,
               optimizer_factory=functools.partial(torch.optim.Adam, lr=1e-3),
               phases: list[list[float]] | None = None) -> float:
    """The minimal loop: same sizes, same estimator object, the given optimiser, batches in device memory.
    With ``phases``, each timed step's stamps are appended to it (as PhaseTimer's; "after backward" is empty)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        estimator = instantiate(compose(config_name="config", overrides=[f"estimator={estimator_name}"]).estimator)
    torch.manual_seed(0)
    encoder_body = mlp([784, 512, 256], final_activation=True).to(device)
    to_logits = torch.nn.Linear(256, N_VARS * N_CLASSES).to(device)
    decoder = mlp([N_VARS * N_CLASSES, 256, 512, 784]).to(device)
    estimator.bind(N_VARS, N_CLASSES, 256)
    estimator.to(device)
    modules = torch.nn.ModuleList([encoder_body, to_logits, decoder])
    optimizer = optimizer_factory([{"params": modules.parameters()},
                                   *([{"params": list(estimator.parameters()), **estimator.optim}]
                                     if list(estimator.parameters()) else [])])
    images = datamodule.splits["train"][0].flatten(1).to(device)
    batches = images[: (len(images) // BATCH) * BATCH].view(-1, BATCH, 784)

    def step(x, stamps: list[float] | None = None):
        def mark(times: int = 1):
            if stamps is not None:
                stamps.extend([synced_time(device)] * times)

        mark()
        optimizer.zero_grad(set_to_none=True)
        features = encoder_body(x)
        logits = to_logits(features).view(-1, N_VARS, N_CLASSES)

        def objective(z):
            return F.binary_cross_entropy_with_logits(
                decoder(z.flatten(-2)), x.expand(*z.shape[:-2], -1), reduction="none").sum(-1)

        if estimator.analytic_kl:
            f, kl = objective, kl_to_uniform(logits)
        else:  # the whole sampled bound, -log p(x|z) - log p(z) + log q(z|x)
            f = lambda z: objective(z) + N_VARS * math.log(N_CLASSES) + categorical_log_prob(logits, z)  # noqa: E731
            kl = torch.zeros(len(x), device=x.device)
        loss = CategoricalVAE.surrogate_loss(estimator(logits, f, context=features), kl)
        mark()
        loss.backward()
        mark(2)  # after backward = before the optimiser step: no hooks in between
        optimizer.step()
        mark()

    for i in range(warmup):
        step(batches[i % len(batches)])
    started = synced_time(device)
    for i in range(warmup, warmup + steps):
        if phases is not None:
            phases.append([])
        step(batches[i % len(batches)], phases[-1] if phases is not None else None)
    return steps / (synced_time(device) - started)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_iw(datamodule, device: torch.device) -> float:
    """Seconds for the 1000-sample bound on the 10,000 test images with an untrained model (cost does not depend
    on the weights), in chunks of 100 samples, test batches of 100."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=jang2017_vae_cat"])
    model = instantiate(cfg.model, estimator=instantiate(cfg.estimator), image_shape=[1, 28, 28]).to(device).eval()
    images = datamodule.splits["test"][0].flatten(1).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.no_grad():
        for x in images.split(100):
            logits = model.encode(x)[0]
            importance_weighted_nll(logits, lambda z: model.log_prior() - model.reconstruction_nll(x, z), 1000, 100)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def cpu_steal_ticks() -> tuple[int, int] | None:
    """(steal, all) clock ticks of the machine's CPUs so far, from /proc/stat (None where there is none)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(before: tuple[int, int] | None) -> str:
    """The share of the CPUs' time stolen by the hypervisor since ``before``, in words."""
    after = cpu_steal_ticks()
    if before is None or after is None or after[1] == before[1]:
        return "CPU steal time not available"
    return f"CPU steal time {100 * (after[0] - before[0]) / (after[1] - before[1]):.1f}% of the cores' time meanwhile"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} torch threads ({os.cpu_count()} cores visible), torch {torch.__version__}"


def publish(lines: list[str], out: Path) -> None:
    """Print a table and append it to ``out`` (docs/performance.md by default)."""
    table = "\n".join(lines) + "\n"
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        handle.write("\n" + table)
    print(f"appended to {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--estimators", nargs="+", default=["gumbel_softmax", "st_gumbel_softmax", "reinforce", "rloo"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats; the medians are reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps-per-call", type=int, nargs="+", default=[1],
                        help="catvae's steps_per_call values to time (each against the same plain runs)")
    parser.add_argument("--iw", action="store_true", help="also time the 1000-sample test bound")
    parser.add_argument("--phases", action="store_true", help="also split a step's time into phases (one more run)")
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="extra Hydra overrides for catvae's path, e.g. '~callbacks.nonfinite_guard'")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/catvae_benchmark"))
    args = parser.parse_args(argv)
    if min(args.steps, args.warmup, args.repeats) < 1:
        raise SystemExit(f"--steps, --warmup and --repeats must be >= 1, got {args.steps}, {args.warmup}, "
                         f"{args.repeats}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    device = torch.device(args.device)
    rows, phase_rows, datamodule, steal_before = [], [], None, cpu_steal_ticks()
    for name in args.estimators:
        rates = {**{k: [] for k in args.steps_per_call}, "same": [], "default": []}
        for _ in range(args.repeats):  # alternated, so that a slow spell of the machine hits every path
            for k in args.steps_per_call:
                rate, datamodule, optimizer_factory = time_catvae(name, device, args.warmup, args.steps,
                                                                  args.workdir, args.overrides, steps_per_call=k)
                rates[k].append(rate)
            catvae_memory = peak_memory_mb(device)
            rates["same"].append(time_plain(name, datamodule, device, args.warmup, args.steps, optimizer_factory))
            rates["default"].append(time_plain(name, datamodule, device, args.warmup, args.steps))
        medians = {path: statistics.median(values) for path, values in rates.items()}
        for k in args.steps_per_call:  # paired ratios: each repeat's paths ran back to back
            ratios = {path: statistics.median(c / p for c, p in zip(rates[k], rates[path])) for path in ("same", "default")}
            rows.append((name, k, medians, ratios, catvae_memory, peak_memory_mb(device)))
        print(f"{name}: " + ", ".join(f"{'catvae k=' if isinstance(path, int) else ''}{path} "
                                      f"{[round(r, 1) for r in values]} steps/s" for path, values in rates.items()),
              flush=True)
        if args.phases:
            timer, plain_steps = PhaseTimer(args.warmup, device), []
            time_catvae(name, device, args.warmup, args.steps, args.workdir, args.overrides, timer)
            time_plain(name, datamodule, device, args.warmup, args.steps, optimizer_factory, plain_steps)
            phase_rows += [(name, "catvae", phase_medians(timer.steps)),
                           (name, "plain, same optimiser", phase_medians(plain_steps))]
    lines = [f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {machine(device)} with "
             f"`python scripts/benchmark.py {' '.join(sys.argv[1:] if argv is None else argv)}`: batch {BATCH}, "
             f"20x10 VAE, {args.steps} timed steps after {args.warmup} warm-up steps, {args.repeats} alternating "
             f"repeats: steps/s are medians, ratios the medians of each repeat's ratio; "
             f"{steal_share(steal_before)}.", "",
             "| estimator | steps per call | catvae steps/s | plain, same optimiser | catvae / plain | plain, "
             "torch.optim.Adam defaults | catvae / that | ms per step (catvae) | peak memory after catvae, plain (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, k, medians, ratios, catvae_memory, plain_memory in rows:
        lines.append(f"| {name} | {k} | {medians[k]:.1f} | {medians['same']:.1f} | {ratios['same']:.2f} | "
                     f"{medians['default']:.1f} | {ratios['default']:.2f} | {1000 / medians[k]:.1f} | "
                     f"{catvae_memory:.0f}, {plain_memory:.0f} |")
    if phase_rows:
        lines += ["", "Phases of a step (ms, medians over the timed steps of one more run of each path):", "",
                  f"| estimator | path | {' | '.join(PHASES)} | sum |", "|---|---|" + "---|" * (len(PHASES) + 1)]
        lines += [f"| {name} | {path} | " + " | ".join(f"{phases[p]:.2f}" for p in PHASES)
                  + f" | {sum(phases.values()):.2f} |" for name, path, phases in phase_rows]
    if args.iw:
        lines += ["", f"1000-sample importance-weighted bound on the 10,000 test images: "
                      f"{time_iw(datamodule, device):.1f} s."]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
