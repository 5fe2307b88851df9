"""Progress for logs that are not a terminal (SLURM, nohup, ``> log``): a line per epoch and every ``every_s`` seconds,
instead of the progress bar's line per refresh; and the libraries' notices a user cannot act on dropped.

A progress bar redrawn in a file writes a line at each refresh: the default 10-epoch run wrote 844 KB of progress
text. :class:`LineProgress` writes ``epoch e/E step s/S | r steps/s | metrics`` at each epoch's end (after its
validation) and at most every ``every_s`` seconds within an epoch (the test metrics are printed by the run).
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings

import pytorch_lightning as pl
from pytorch_lightning.callbacks.progress import ProgressBar

LIGHTNING_TIP = "💡 Tip:"


class LineProgress(ProgressBar):
    """One line per epoch (and every ``every_s`` seconds) with steps/s and the latest ``train/`` and ``val/`` metrics
    and ``tau``."""

    def __init__(self, every_s: float = 60.0):
        super().__init__()
        self.every_s = every_s
        self.enabled = True
        self.last_line, self.last_step = 0.0, 0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def write(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    @staticmethod
    def metrics(trainer: pl.Trainer, prefixes: tuple[str, ...]) -> str:
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefixes) or k == "tau"}
        return " ".join(f"{k} {v:.4g}" for k, v in sorted(values.items()) if math.isfinite(v))

    def position(self, trainer: pl.Trainer) -> str:
        """``epoch e/E step s/S | r steps/s`` (the rate since the previous line)."""
        now = time.monotonic()
        rate = (trainer.global_step - self.last_step) / max(now - self.last_line, 1e-9)
        self.last_line, self.last_step = now, trainer.global_step
        total = trainer.max_steps if trainer.max_steps != -1 else trainer.estimated_stepping_batches
        return (f"[catvae] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} step {trainer.global_step}/{total}"
                f" | {rate:.1f} steps/s")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_line, self.last_step = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if time.monotonic() - self.last_line >= self.every_s:
            self.write(f"{self.position(trainer)} | {self.metrics(trainer, ('train/',))}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(f"{self.position(trainer)} | {self.metrics(trainer, ('train/', 'val/'))}")


class DropLightningTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing ..." advertisement lines (one per fit and per test)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(LIGHTNING_TIP)


def drop_library_notices() -> None:
    """Drops Lightning's advertisement lines and torch's FutureWarning that Lightning 2.6's pytree helper builds a
    ``LeafSpec`` (one per fit, about Lightning's code, not the run's)."""
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, DropLightningTips) for f in logger.filters):
        logger.addFilter(DropLightningTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


def line_progress_if_not_a_terminal(enable_progress_bar: bool) -> list[pl.Callback]:
    """[LineProgress()] when the progress bar is on and stdout is not a terminal, else [] (the terminal keeps the
    bar)."""
    return [LineProgress()] if enable_progress_bar and not sys.stdout.isatty() else []
