"""Per-step metrics only on the steps the loggers write.

Lightning keeps a value logged with ``on_step=True`` only until the end of its step and writes it every
``trainer.log_every_n_steps`` steps; each ``self.log`` call still costs about a millisecond of host work, so
per-step metrics are logged only on the steps that are written.
"""

from __future__ import annotations

import pytorch_lightning as pl


def written_this_step(trainer: pl.Trainer) -> bool:
    """True on the training steps whose step-level metrics reach the loggers (Lightning's own test)."""
    return trainer._logger_connector.should_update_logs
