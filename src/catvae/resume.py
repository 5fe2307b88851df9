"""Exact resume: which checkpoint to resume from, and the random state that makes the continuation exact.

A Lightning checkpoint already holds the model (estimator baselines and learned control variates included),
the optimiser, the loops' progress (global step, epoch, batch), every callback's state and the training
loader's position (:class:`catvae.data.TensorBatchLoader`); temperature schedules are functions of the global
step. :class:`RNGState` adds the torch, CUDA, numpy and Python generators, so that a run stopped after step k and
resumed from its step-k checkpoint continues with the same random draws as the uninterrupted run.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


class RNGState(pl.Callback):
    """Saves every random generator's state in checkpoints and restores it at the first training batch
    after a resume (after Lightning's sanity validation, which draws samples of its own)."""

    def __init__(self):
        self.pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, cached = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.pending is None:
            return
        state, self.pending = self.pending, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                             n["cached"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


def readable_checkpoint(path: Path) -> bool:
    """True if ``path`` loads as a checkpoint (with ``weights_only``: plain tensors and containers)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means "not usable"; the caller reports it
        log.warning("checkpoint %s is unreadable (%s: %s)", path, type(error).__name__, error)
        return False
    return isinstance(checkpoint, dict) and "state_dict" in checkpoint and "loops" in checkpoint


def resolve_resume(resume: str) -> Path:
    """The checkpoint to resume from: ``resume`` is a .ckpt file, or a run directory (or its checkpoints/),
    where the newest checkpoint is used, or, if it is corrupt, the newest readable one (with a warning)."""
    path = Path(resume).expanduser()
    if path.is_file():
        if not readable_checkpoint(path):
            raise ValueError(f"resume={resume!r}: the checkpoint is corrupt or not a catvae checkpoint")
        return path
    if not path.is_dir():
        raise ValueError(f"resume={resume!r} is neither a checkpoint file nor a run directory")
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    candidates = sorted(directory.glob("*.ckpt"), key=lambda p: -p.stat().st_mtime)  # newest first
    for candidate in candidates:
        if readable_checkpoint(candidate):
            if candidate != candidates[0]:
                log.warning("resuming from %s: the newest checkpoint %s is corrupt, so the run continues from an "
                            "earlier one and will not match an uninterrupted run exactly", candidate, candidates[0])
            return candidate
    raise ValueError(f"resume={resume!r}: no readable checkpoint in {directory} "
                     f"(tried: {', '.join(p.name for p in candidates) or 'none found'})")
