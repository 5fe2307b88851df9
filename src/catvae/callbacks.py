"""Lightning callbacks: temperature schedules, image grids, code usage, the non-finite guard."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from torchvision.utils import make_grid, save_image

from catvae.estimators import Estimator
from catvae.relaxations import check_temperature
from catvae.step_logging import written_this_step
from catvae.validation import check_choice, check_integer

log = logging.getLogger(__name__)


class TemperatureSchedule(pl.Callback):
    """Sets the temperature ``tau`` (or the estimator attribute named by ``attribute``, e.g. ``tau_forward``) of
    every estimator held by the model (one, or one per stochastic layer) from the global step before every
    training batch and logs it under that name. Estimators without the attribute are left alone (nothing is
    logged).

    Subclasses define :meth:`value`; the step comes from the trainer, never from ``batch_idx``
    (which restarts every epoch), so a resumed run continues the same curve.
    """

    step_period: int | None = None  # the value changes only at multiples of it (catvae.step_calls)

    def __init__(self, name: str, attribute: str = "tau"):
        self.name, self.attribute = name, attribute

    def value(self, step: int) -> float | None:
        """Temperature at global step ``step``; None keeps the estimator's own value."""
        raise NotImplementedError

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.estimators = [m for m in pl_module.modules() if isinstance(m, Estimator) and hasattr(m, self.attribute)]
        if not self.estimators and self.attribute != "tau":  # tau: estimators without one are left alone by design
            raise ValueError(f"schedule.attribute={self.attribute!r}: estimator {pl_module.estimator.name} has no such "
                             f"attribute (decoupled_st has tau_forward; every tempered estimator has tau)")
        self.applied: float | None = None  # the value last set, so that an unchanged one is not set again

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if not hasattr(pl_module.estimator, self.attribute):
            return
        tau = self.value(trainer.global_step)
        if tau is not None and tau != self.applied:
            for estimator in self.estimators:
                setattr(estimator, self.attribute, tau)
            self.applied = tau

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        """Logs the value at the (last) step of the call, on the steps the loggers write."""
        if hasattr(pl_module.estimator, self.attribute) and written_this_step(trainer):
            pl_module.log(self.attribute, float(getattr(pl_module.estimator, self.attribute)), on_step=True,
                          on_epoch=False)


class ConstantTemperature(TemperatureSchedule):
    """tau stays at the estimator's configured value (``estimator.tau``)."""

    def __init__(self, name: str = "constant"):
        super().__init__(name)

    def value(self, step: int) -> float | None:
        return None


class SteppedSchedule(TemperatureSchedule):
    """A schedule of the global step held constant for ``every`` steps: value(step) = at(t) with
    t = every * floor(step / every), and a non-negative ``rate`` of change per step."""

    def __init__(self, name: str, rate: float, every: int, attribute: str = "tau"):
        super().__init__(name, attribute)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
            raise ValueError(f"schedule.rate must be a finite number >= 0, got {rate!r}")
        self.rate, self.every = float(rate), check_integer("schedule.every", every)
        self.step_period = self.every

    def at(self, t: int) -> float:
        raise NotImplementedError

    def value(self, step: int) -> float:
        return self.at((step // self.every) * self.every)


class JangExponentialTemperature(SteppedSchedule):
    """Jang et al. (2017, Section 4.2): tau = max(tau_min, tau0 * exp(-r t)), recomputed every N steps."""

    def __init__(self, tau0: float = 1.0, tau_min: float = 0.5, rate: float = 1e-4, every: int = 1000,
                 name: str = "jang_exp", attribute: str = "tau"):
        super().__init__(name, rate, every, attribute)
        check_temperature(tau0, "schedule.tau0")
        check_temperature(tau_min, "schedule.tau_min")
        self.tau0, self.tau_min = float(tau0), float(tau_min)

    def at(self, t: int) -> float:
        return max(self.tau_min, self.tau0 * math.exp(-self.rate * t))


class LinearSlopeSchedule(SteppedSchedule):
    """Slope annealing (Chung et al. 2017, Section 4): the straight-through gradient uses
    softmax(slope * logits) with slope = min(slope_max, slope0 + rate * t), recomputed every N steps;
    it is applied as tau = 1 / slope (and logged as ``tau``)."""

    def __init__(self, slope0: float = 1.0, slope_max: float = 5.0, rate: float = 1e-4, every: int = 500,
                 name: str = "slope_linear"):
        super().__init__(name, rate, every)
        check_temperature(slope0, "schedule.slope0")
        check_temperature(slope_max, "schedule.slope_max")
        self.slope0, self.slope_max = float(slope0), float(slope_max)

    def at(self, t: int) -> float:
        return 1.0 / min(self.slope_max, self.slope0 + self.rate * t)


class ImageGrids(pl.Callback):
    """After each validation epoch: a grid of validation images beside their reconstructions, and a
    grid of prior samples (mean images), saved as PNG under ``<output_dir>/images/`` and sent to
    every WandbLogger as ``val/reconstructions`` and ``val/prior_samples``."""

    affects_training = False  # a resume may add, drop or change it (catvae.resume.check_resume_config)

    N_ROW = 8

    def __init__(self, output_dir: str, n_images: int = 32, every_n_epochs: int = 1):
        if n_images < 1 or every_n_epochs < 1:
            raise ValueError(f"callbacks.image_grids: n_images and every_n_epochs must be >= 1, "
                             f"got {n_images} and {every_n_epochs}")
        self.dir = Path(output_dir) / "images"
        self.n_images, self.every_n_epochs = n_images, every_n_epochs
        self.images: torch.Tensor | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and self.images is None:
            self.images = batch[0][: self.n_images].detach()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.images is None or trainer.current_epoch % self.every_n_epochs:
            return
        images = self.images.to(pl_module.device)
        grids = {
            "reconstructions": make_grid(torch.cat([images, pl_module.reconstruct(images)]).float().cpu(),
                                         nrow=self.N_ROW, pad_value=0.5),
            "prior_samples": make_grid(pl_module.sample_prior(len(images)).float().cpu(), nrow=self.N_ROW, pad_value=0.5),
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        for kind, grid in grids.items():
            save_image(grid, self.dir / f"{kind}_epoch{trainer.current_epoch:03d}.png")
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"val/{kind}", images=[grid], step=trainer.global_step)


class CodeUsage(pl.Callback):
    """How many classes each latent variable actually uses on the validation set.

    For each variable n, the frequency u_nk with which class k is the argmax of q(z_n|x) over the validation
    images. Logged each validation epoch: ``val/classes_used`` (mean over n of #{k : u_nk >= min_frequency}) and
    ``val/code_perplexity`` (mean over n of exp H(u_n), the effective number of classes); the (N, K) map of u
    is saved as ``images/code_usage_epochXXX.png`` (one row per variable, white = frequent) and sent to W&B as
    ``val/code_usage``.
    """

    affects_training = False  # a resume may add, drop or change it (catvae.resume.check_resume_config)

    def __init__(self, output_dir: str, min_frequency: float = 0.01, pixels_per_cell: int = 8):
        if not 0 < min_frequency < 1:
            raise ValueError(f"callbacks.code_usage.min_frequency must be in (0, 1), got {min_frequency!r}")
        self.dir = Path(output_dir) / "images"
        self.min_frequency, self.pixels_per_cell = min_frequency, pixels_per_cell
        self.counts: torch.Tensor | None = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.counts = torch.zeros(pl_module.n_vars, pl_module.n_classes, device=pl_module.device)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        logits = pl_module.encode(pl_module.flatten(batch))[0]  # (B, N, K)
        self.counts += torch.nn.functional.one_hot(logits.argmax(-1), pl_module.n_classes).sum(0)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.counts is None or self.counts.sum() == 0:
            return
        usage = self.counts / self.counts.sum(-1, keepdim=True)  # (N, K)
        entropy = -(usage * usage.clamp_min(1e-12).log()).sum(-1)
        pl_module.log_dict({"val/classes_used": (usage >= self.min_frequency).sum(-1).float().mean(),
                            "val/code_perplexity": entropy.exp().mean()})
        image = (usage / usage.max()).repeat_interleave(self.pixels_per_cell, 0)
        image = image.repeat_interleave(self.pixels_per_cell, 1)[None].float().cpu()
        self.dir.mkdir(parents=True, exist_ok=True)
        save_image(image, self.dir / f"code_usage_epoch{trainer.current_epoch:03d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/code_usage", images=[image], step=trainer.global_step)


def nonfinite_terms(loss: torch.Tensor, gradients: list[torch.Tensor]) -> torch.Tensor:
    """[sum of the loss, sum_i g_i of each gradient] in float32: each term is finite iff its tensor is (barring a
    float32 overflow of the sum, which the guard counts as non-finite), so one isfinite of their total decides."""
    return torch.stack([loss.float().sum(), *(g.sum(dtype=torch.float32) for g in gradients)])


class NonFiniteGuard(pl.Callback):
    """Catches a training step whose loss or gradients are not finite (NaN or inf) before the optimiser applies it.

    ``policy="raise"`` stops the run with a FloatingPointError that names the step, the estimator and the offending
    tensor; ``policy="skip"`` leaves parameters and optimiser state untouched for that step, counts it and logs the
    count as ``train/skipped_steps``. The check is one sum per gradient (sum_i g_i is finite iff every g_i is,
    unless it overflows float32, which counts as non-finite; a norm overflows already at |g| ~ 1e19; for the
    20x10 VAE's 1.2M gradients the sums take 0.11-0.24 ms, the norms 0.19-0.22, scripts/micro_benchmarks.py).

    ``check_every_n_steps`` says how often the host reads the verdict. At 1 (the default) it reads it at every step:
    one device-to-host sync per step, and a bad step never reaches the optimiser. Above 1 the steps are sync-free: the
    verdict stays on the device and goes to the optimiser as ``found_inf`` (the flag through which a GradScaler
    makes torch's fused Adam and AdamW skip a step on the device), and the host reads the count every n steps,
    at each checkpoint and at the end of training; "raise" then stops at that read, naming the first bad step (whose
    update was not applied; the steps after it were trained normally).
    """

    POLICIES = ("raise", "skip")
    # deferred mode's device counters and their values after a read: bad steps since the last read, steps since
    # it, steps from it to the first bad one (-1: none yet)
    COUNTERS = (("count", 0), ("since", 0), ("first", -1))

    def __init__(self, policy: str = "raise", check_every_n_steps: int = 1):
        check_choice("callbacks.nonfinite_guard.policy", policy, self.POLICIES)
        check_integer("callbacks.nonfinite_guard.check_every_n_steps", check_every_n_steps)
        self.policy, self.check_every_n_steps = policy, check_every_n_steps
        self.step_period = check_every_n_steps if check_every_n_steps > 1 else None  # the host's reads
        self.skipped = 0
        self.loss: torch.Tensor | None = None
        self.parameters: list[tuple[str, torch.nn.Parameter]] = []
        self.pending: dict[str, torch.Tensor] = {}  # deferred mode: bad steps not read yet, and the first of them
        self.read_at = 0  # deferred mode: the global step at the last read

    def state_dict(self) -> dict[str, int]:
        self.read_pending()
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = state_dict["skipped"]

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self.loss = loss.detach()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.parameters = list(pl_module.named_parameters())
        self.estimator_name = pl_module.estimator.name
        if self.check_every_n_steps == 1:
            return
        for optimizer in trainer.optimizers:
            self.check_optimizer(optimizer)
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(f"callbacks.nonfinite_guard.check_every_n_steps={self.check_every_n_steps} cannot be "
                             f"combined with trainer.precision={trainer.precision}, whose GradScaler sets the "
                             f"optimiser's found_inf itself; use check_every_n_steps=1")

    def check_model(self, model: pl.LightningModule) -> None:
        """Refuses, before the trainer starts (run() calls this), a model whose optimiser deferred mode cannot use."""
        self.check_optimizer(model.configure_optimizers())

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if self.check_every_n_steps == 1:
            return
        # torch's fused SGD can skip a step too, but with momentum a skipped first step leaves its momentum
        # buffer uninitialised (garbage up to 3e38 measured with torch 2.14, tests/test_deferred_guard.py)
        if not (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and optimizer.defaults.get("fused")):
            raise ValueError(
                f"callbacks.nonfinite_guard.check_every_n_steps={self.check_every_n_steps} needs an optimiser that "
                f"skips a step on the device (torch's fused Adam or AdamW: model.optimizer.fused=true), got "
                f"{type(optimizer).__name__} with fused={optimizer.defaults.get('fused')}; or set check_every_n_steps=1")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Deferred mode: the device-side counters (after a resume, once the global step is restored)."""
        if self.check_every_n_steps == 1:
            return
        self.read_at = trainer.global_step
        self.pending = {name: torch.full((), start, dtype=torch.long, device=pl_module.device)
                        for name, start in self.COUNTERS}
        self.pending["first_terms"] = torch.zeros(len(self.parameters) + 1, device=pl_module.device)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        named = [(name, p) for name, p in self.parameters if p.grad is not None]
        terms = nonfinite_terms(self.loss, [p.grad for _, p in named])
        bad = ~torch.isfinite(terms.sum())  # a non-finite term makes the total NaN or inf (opposite infinities: NaN)
        if self.pending:
            self.defer(bad, terms, named, optimizer)
        elif bool(bad):  # the step's one host sync
            self.act(1, trainer.global_step, self.describe(terms, named))
            for _, p in named:
                p.grad = None

    def defer(self, bad: torch.Tensor, terms: torch.Tensor, named: list, optimizer) -> None:
        """Device-side bookkeeping of one step's verdict; the optimiser skips the step when ``bad``."""
        pending = self.pending
        if len(named) < len(self.parameters):  # a parameter without a gradient this step: its term is 0
            present = {name: term for (name, _), term in zip(named, terms[1:])}
            terms = torch.stack([terms[0], *(present.get(name, terms.new_zeros(())) for name, _ in self.parameters)])
        first = bad & (pending["first"] < 0)
        pending["first"] = torch.where(first, pending["since"], pending["first"])
        pending["first_terms"] = torch.where(first, terms, pending["first_terms"])
        pending["count"] += bad
        pending["since"] += 1
        optimizer.found_inf = bad.float()

    def read_pending(self) -> None:
        """Deferred mode: the host reads the bad steps counted since the last read (one sync) and acts on them."""
        if not self.pending:
            return
        count, since, first = torch.stack([self.pending[name] for name, _ in self.COUNTERS]).tolist()
        first_step, self.read_at = self.read_at + first, self.read_at + since
        for name, start in self.COUNTERS:
            self.pending[name].fill_(start)
        if count:
            self.act(count, first_step, self.describe(self.pending["first_terms"], self.parameters))

    def describe(self, terms: torch.Tensor, named: list) -> str:
        """Which term is non-finite: the loss (with its value), a gradient, or a float32 overflow of their sum."""
        if not bool(torch.isfinite(terms[0])):
            return f"loss ({terms[0].item()})"
        return next((f"gradient of {name}" for (name, _), term in zip(named, terms[1:]) if not bool(torch.isfinite(term))),
                    "gradient sum (finite terms whose total overflows float32)")

    def act(self, count: int, step: int, what: str) -> None:
        where = f"non-finite {what} at step {step} with estimator {self.estimator_name}"
        if self.policy == "raise":
            raise FloatingPointError(f"{where}; set callbacks.nonfinite_guard.policy=skip to skip such steps")
        self.skipped += count
        log.warning("skipped %d update(s), the first: %s (%d skipped so far)", count, where, self.skipped)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.read_pending()
        for optimizer in trainer.optimizers:
            optimizer.__dict__.pop("found_inf", None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.check_every_n_steps == 0:
            self.read_pending()
        if written_this_step(trainer):
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
