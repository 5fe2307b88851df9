"""Exact resume: where a run is, recorded once after an optimiser step and carried by every checkpoint; which
checkpoint to resume from; which config changes a resume accepts.

A Lightning checkpoint holds the model (estimator baselines and learned control variates included), the optimiser,
every callback's state and the loops' progress with the training loader's position
(:class:`catvae.data.TensorBatchLoader`); temperature schedules are functions of the global step. Two things vary with
*when* a checkpoint is written, and :class:`ResumePoint` removes both at the root:

- the loops' progress: a checkpoint written at the end of an epoch (after validation) or of the fit describes a moment
  Lightning restarts from otherwise than from a mid-epoch one (it skipped a whole epoch, or the epoch's validation).
  Every checkpoint instead carries one record of where the run is, *the point*: the loops' state right after the
  latest optimiser step (``on_train_batch_end``), the state Lightning restarts from exactly. It is taken at that
  moment for the checkpoints written there, and kept for those written later (after the last step of an epoch or of
  the run), so every checkpoint written after step k and before step k+1 resumes the same way. A point at the end
  of an epoch is only ever written once that epoch's end has run (:class:`StepCheckpoint`; the SLURM requeue signal
  is deferred to the next such moment), and a point at the run's last step resumes straight to the test;
- the random generators: evaluation (validation with its epoch-end pictures, the test) draws from streams seeded by
  (seed, phase, global step) and hands the training streams back untouched, so the torch, CUDA, numpy and Python
  generators whenever a checkpoint is written are those right after the latest step, and a repeated validation
  gives the same numbers.
"""

from __future__ import annotations

import logging
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import ModelCheckpoint

from catvae.sweep import read_status

log = logging.getLogger(__name__)

EVALUATION_PHASES = ("validation", "test")
CONFIG_KEY = "catvae_config"  # the run's resolved config, in every checkpoint
# Config keys a resume may change (dotted prefixes): lengths, output and logging; everything else is the run's math.
# Callbacks whose class says ``affects_training = False`` (pictures, code usage, gradient diagnostics) may be added,
# removed or changed too.
RESUME_MAY_DIFFER = (
    "resume", "paths", "logger", "project", "experiment_name", "optimized_metric",
    "trainer.max_steps", "trainer.max_epochs", "trainer.log_every_n_steps", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "trainer.default_root_dir",
    "callbacks.model_checkpoint.dirpath", "callbacks.step_checkpoint.dirpath",
    "callbacks.step_checkpoint.every_n_train_steps", "callbacks.nonfinite_guard.check_every_n_steps",
)


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python generators' states, as tensors and plain containers (``weights_only``)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_all(seed: int) -> None:
    """Seeds torch (CPU and every CUDA device), numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class ResumePoint(pl.Callback):
    """Puts the point into every checkpoint, restores its generators at the first training step of a resumed run,
    defers the SLURM requeue to a point, and runs evaluation on streams of its own (see the module docstring). It must
    come first among the callbacks, so that it acts before any other callback writes a checkpoint.

    ``seed``: the run's seed; evaluation at global step t in phase p draws from seed ``(seed * 1_000_003 + t) * 2 + p``.
    ``config``: the run's resolved config (plain containers), written into every checkpoint for
    :func:`check_resume_config`.
    """

    def __init__(self, seed: int, config: dict[str, Any] | None = None):
        self.seed, self.config = seed, config
        self.point: dict[str, Any] | None = None  # {"global_step", "loops"}: kept after an epoch's or the run's last step
        self.pending_rng: dict[str, Any] | None = None  # a loaded checkpoint's generators, for the first training step
        self.training_rng: dict[str, Any] | None = None  # the training streams, set aside during evaluation
        self.requeue: tuple[Any, signal.Signals] | None = None  # Lightning's SLURM requeue handler and its signal
        self.requeue_requested = False

    # -- the point
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        last_step = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or last_step:
            # the epoch's or the run's last step: what follows (validation, checkpoints, the test) must not move it
            self.point = {"global_step": trainer.global_step,
                          "loops": trainer._checkpoint_connector._get_loops_state_dict()}
        else:
            self.requeue_if_requested()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:  # the metrics rows up to this point reach the disk before the checkpoint does
            logger.save()
        if self.point is not None and self.point["global_step"] == trainer.global_step:
            checkpoint["loops"] = self.point["loops"]
        checkpoint[CONFIG_KEY] = self.config

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.pending_rng if self.pending_rng is not None else rng_state()}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        fit_loop = checkpoint["loops"]["fit_loop"]
        count_the_epoch_under_way(fit_loop)
        if training_is_over(fit_loop, trainer.max_steps, trainer.max_epochs):
            count_the_last_epoch(fit_loop)
        self.point = {"global_step": checkpoint["global_step"], "loops": checkpoint["loops"]}
        for callback in trainer.checkpoint_callbacks:
            state = checkpoint["callbacks"].get(callback.state_key)
            if state and callback.dirpath and state.get("dirpath") != callback.dirpath:
                adopt_checkpoint_files(state, callback.dirpath)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending_rng = state_dict["rng"]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.point is not None and self.point["global_step"] == trainer.global_step:
            self.requeue_if_requested()  # after an epoch's last step: its end has run, the next step has not begun
        if self.pending_rng is not None:
            set_rng_state(self.pending_rng)
            self.pending_rng = None

    # -- the SLURM requeue signal: its checkpoint written at the next point, not wherever the signal lands
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            number = environment.requeue_signal or signal.SIGUSR1
            handler = signal.getsignal(number)
            if callable(handler):
                self.requeue = (handler, number)
                signal.signal(number, self.request_requeue)

    def request_requeue(self, signum: int, frame) -> None:
        self.requeue_requested = True

    def requeue_if_requested(self) -> None:
        """Runs Lightning's handler (it writes ``hpc_ckpt_<n>.ckpt`` and calls ``scontrol requeue``)."""
        if self.requeue_requested:
            self.requeue_requested = False
            handler, number = self.requeue
            handler(number, None)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.requeue_if_requested()  # after the run's last step: its checkpoint resumes to the test
        if self.requeue is not None:  # during the test, Lightning's handler again
            signal.signal(self.requeue[1], self.requeue[0])

    # -- evaluation on its own streams
    def begin_evaluation(self, trainer: pl.Trainer, phase: str) -> None:
        self.training_rng = rng_state()
        seed_all((self.seed * 1_000_003 + trainer.global_step) * 2 + EVALUATION_PHASES.index(phase))

    def end_evaluation(self) -> None:
        set_rng_state(self.training_rng)
        self.training_rng = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.begin_evaluation(trainer, "validation")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end_evaluation()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.begin_evaluation(trainer, "test")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end_evaluation()


def training_is_over(fit_loop: dict[str, Any], max_steps: int, max_epochs: int | None) -> bool:
    """Whether a point (a fit loop's state right after an optimiser step) is the last step of the run."""
    automatic = fit_loop["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"]["total"]["completed"]
    manual = fit_loop["epoch_loop.manual_optimization.optim_step_progress"]["total"]["completed"]
    step = max(automatic, manual)  # the steps counted by whichever optimisation ran (steps_per_call > 1: manual)
    epoch_ends = fit_loop["epoch_loop.batch_progress"]["is_last_batch"]
    epochs = fit_loop["epoch_progress"]["current"]["processed"] + int(epoch_ends)
    return (max_steps != -1 and step >= max_steps) or (max_epochs not in (None, -1) and epochs >= max_epochs)


def count_the_epoch_under_way(fit_loop: dict[str, Any]) -> None:
    """A point's epoch counted as ready and started, as in a run never resumed. Lightning, resumed at an epoch's last
    batch, closes that epoch but starts the next without counting it; a checkpoint of that run then reads as written
    between epochs, and a second resume from it would train its epoch again (an extra epoch in a run that counts
    epochs). A point always follows an optimiser step, so its epoch is under way."""
    epochs = fit_loop["epoch_progress"]
    if fit_loop["epoch_loop.batch_progress"]["current"]["processed"] > 0 and \
            epochs["total"]["started"] == epochs["total"]["processed"]:
        for counts in (epochs["current"], epochs["total"]):
            counts["ready"] = counts["started"] = counts["processed"] + 1


def count_the_last_epoch(fit_loop: dict[str, Any]) -> None:
    """The counters a finished fit leaves (its last epoch processed, the logging step past the last step), applied to
    the point of the run's last step, so that a run resumed there goes straight to its test and logs it with the epoch
    and step an uninterrupted run logs."""
    for counts in (fit_loop["epoch_progress"]["current"], fit_loop["epoch_progress"]["total"]):
        counts["processed"] += 1
        counts["completed"] = counts["processed"]
    fit_loop["epoch_loop.state_dict"]["_batches_that_stepped"] += 1


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ``every_n_train_steps`` checkpoint, written only where nothing is pending: one that falls on the
    last step of an epoch is written at that epoch's end, after its validation (and beside its best and last
    checkpoints), so that no checkpoint ever stands before an epoch end that has yet to run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deferred = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self.deferred = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.deferred:
            self.deferred = False
            super().on_train_batch_end(trainer, pl_module, None, None, trainer.fit_loop.epoch_loop.batch_idx)


CHECKPOINT_PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")


def adopt_checkpoint_files(state: dict[str, Any], dirpath: str) -> None:
    """A ModelCheckpoint's saved ``state`` from another run directory, made this run's: the checkpoints it tracks (the
    best so far, the last) are copied into ``dirpath`` and the state points to the copies. Lightning would otherwise
    drop the best score when the directory changes, and the resumed run would take its first validation for the best.
    """
    copies: dict[str, str] = {}

    def adopt(path: str) -> str:
        if not path or not Path(path).is_file():
            return path
        if path not in copies:
            copies[path] = str(Path(dirpath) / Path(path).name)
            if not Path(copies[path]).exists():
                Path(dirpath).mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, copies[path])
        return copies[path]

    for key in CHECKPOINT_PATH_KEYS:
        if key in state:
            state[key] = adopt(state[key])
    if "best_k_models" in state:
        state["best_k_models"] = {adopt(path): score for path, score in state["best_k_models"].items()}
    state["dirpath"] = dirpath


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of nested dicts (lists are leaves)."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def observing_callbacks(config: dict[str, Any]) -> set[str]:
    """Names of the config's callbacks whose class does not affect training (``affects_training = False``)."""
    names = set()
    for name, node in (config.get("callbacks") or {}).items():
        try:
            if isinstance(node, dict) and not getattr(get_class(node["_target_"]), "affects_training", True):
                names.add(name)
        except (ImportError, KeyError, ValueError):
            continue
    return names


def check_resume_config(checkpoint: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Refuses a resume whose config differs from the checkpoint's in anything outside :data:`RESUME_MAY_DIFFER`
    (and observing callbacks): the continuation would not be the run it claims to continue."""
    saved = checkpoint.get(CONFIG_KEY)
    if saved is None:
        log.warning("%s records no config (written before catvae recorded it): the resumed config is not checked", path)
        return
    observers = observing_callbacks(saved) | observing_callbacks(config)
    old, new = flatten(saved), flatten(config)
    differing = [key for key in sorted(old.keys() | new.keys())
                 if old.get(key, "<absent>") != new.get(key, "<absent>")
                 and not any(key == p or key.startswith(p + ".") for p in RESUME_MAY_DIFFER)
                 and not (key.startswith("callbacks.") and key.split(".")[1] in observers)]
    if differing:
        lines = "\n".join(f"  {key}: {old.get(key, '<absent>')!r} in the checkpoint, {new.get(key, '<absent>')!r} now"
                          for key in differing)
        raise ValueError(f"resume={str(path)!r}: the config differs from the checkpoint's in keys that change the run "
                         f"(resume with the run's own overrides; only {', '.join(RESUME_MAY_DIFFER)} and observing "
                         f"callbacks may differ):\n{lines}")


def resume_chain(checkpoint: Path) -> list[str]:
    """The run directories a resume from ``checkpoint`` continues, oldest first: the checkpoint's run directory,
    after the runs that one continued (from its status.json)."""
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return [*(read_status(run_dir) or {}).get("chain", []), str(run_dir)]


def readable_checkpoint(path: Path) -> bool:
    """True if ``path`` loads as a checkpoint (with ``weights_only``: plain tensors and containers)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means "not usable"; the caller reports it
        log.warning("checkpoint %s is unreadable (%s: %s)", path, type(error).__name__, error)
        return False
    return isinstance(checkpoint, dict) and "state_dict" in checkpoint and "loops" in checkpoint


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was written at (memory-mapped: its tensors are not read)."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def resolve_resume(resume: str) -> Path | None:
    """The checkpoint to resume from: ``resume`` is a .ckpt file, or a run directory (or its checkpoints/),
    where the newest checkpoint is used, or, if it is corrupt, the newest readable one (with a warning). None for a run
    directory that holds no checkpoint at all (a run killed before its first one): the run starts afresh."""
    path = Path(resume).expanduser()
    if path.is_file():
        if not readable_checkpoint(path):
            raise ValueError(f"resume={resume!r}: the checkpoint is corrupt or not a catvae checkpoint")
        return path
    if not path.is_dir():
        raise ValueError(f"resume={resume!r} is neither a checkpoint file nor a run directory")
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    candidates = sorted(directory.glob("*.ckpt"), key=lambda p: -p.stat().st_mtime)  # newest first
    if not candidates and (path / "status.json").is_file():
        log.warning("resume=%s: the run wrote no checkpoint before it stopped; starting it afresh", resume)
        return None
    for candidate in candidates:
        if readable_checkpoint(candidate):
            if candidate != candidates[0]:
                log.warning("resuming from %s: the newest checkpoint %s is corrupt, so the run continues from an "
                            "earlier one and will not match an uninterrupted run exactly", candidate, candidates[0])
            return candidate
    raise ValueError(f"resume={resume!r}: no readable checkpoint in {directory} "
                     f"(tried: {', '.join(p.name for p in candidates) or 'none found'})")
