"""Training speed of the M2 model against its number of classes K: Gumbel-Softmax against marginalization.

    python scripts/speed_vs_classes.py [--classes 10 20 30 50 75 100] [--steps 20] [--warmup 3] [--threads N]
                                       [--device cpu|cuda] [--overrides KEY=VALUE ...] [--out DIR]

Jang et al. (2017, Section 4.3) report that Gumbel-Softmax trains M2 2x faster than marginalizing y at K = 10 and
9.9x faster at K = 100. For each K, in this one process: the config ``experiment=jang2017_m2_speed
model.n_classes=K`` (labels replaced by uniform random draws from {0..K-1}), one list of training batches, and for
``estimator=exact`` (marginalization: the objective at all K one-hot y's) and ``estimator=gumbel_softmax`` a model
built from the config with the same seed, timed over ``--steps`` optimiser steps after ``--warmup`` steps. A step is
SemiSupervisedM2.loss_and_metrics, backward and the Adam update, without Lightning (whose per-step cost is the same for
both and would only dilute the ratio). ``--overrides`` change the composed config (e.g. smaller networks).

Writes to ``--out``: speed_vs_classes.csv (one row per K), speed_vs_classes.png (steps/s of both, and the speed-up
= Gumbel-Softmax steps/s / marginalization steps/s, against K, with the paper's two points) and
speed_vs_classes.md (the markdown table, also printed, with the machine and torch threads).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from benchmark import machine  # noqa: E402  (scripts/benchmark.py, beside this file)

ROOT = Path(__file__).resolve().parents[1]
ESTIMATORS = ("exact", "gumbel_softmax")
PAPER_SPEEDUP = {10: 2.0, 100: 9.9}  # Jang et al. (2017), Section 4.3


def compose_speed_config(n_classes: int, estimator: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[
            "experiment=jang2017_m2_speed", f"model.n_classes={n_classes}", f"estimator={estimator}", *overrides])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def steps_per_second(cfg, image_shape: list[int], batches: list, warmup: int, device: torch.device) -> float:
    """Optimiser steps per second of a fresh model over ``batches[warmup:]``, after ``batches[:warmup]``."""
    torch.manual_seed(0)
    model = instantiate(cfg.model, estimator=instantiate(cfg.estimator), image_shape=image_shape).to(device)
    optimizer = model.configure_optimizers()

    def step(batch):
        loss, _ = model.loss_and_metrics(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for batch in batches[:warmup]:
        step(batch)
    sync(device)
    started = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    sync(device)
    return (len(batches) - warmup) / (time.perf_counter() - started)


def measure(n_classes: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """{"classes", "<estimator> steps/s" for each estimator, "speed-up"} for K = n_classes."""
    datamodule = instantiate(compose_speed_config(n_classes, ESTIMATORS[0], args.overrides).data)
    datamodule.setup("fit")
    batches = [tuple(t.to(device) for t in batch)
               for batch in itertools.islice(datamodule.train_dataloader(), args.warmup + args.steps)]
    if len(batches) < args.warmup + args.steps:
        raise SystemExit(f"the data has {len(batches)} training batches per epoch, fewer than --warmup + --steps = "
                         f"{args.warmup + args.steps}")
    row: dict[str, float] = {"classes": n_classes}
    for name in ESTIMATORS:
        cfg = compose_speed_config(n_classes, name, args.overrides)
        row[f"{name} steps/s"] = steps_per_second(cfg, list(datamodule.image_shape), batches, args.warmup, device)
        print(f"K={n_classes} {name}: {row[f'{name} steps/s']:.2f} steps/s", flush=True)
    row["speed-up"] = row["gumbel_softmax steps/s"] / row["exact steps/s"]
    return row


def plot(rows: list[dict[str, float]], path: Path) -> None:
    classes = [row["classes"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, label in zip(ESTIMATORS, ("marginalization (exact)", "Gumbel-Softmax")):
        left.plot(classes, [row[f"{name} steps/s"] for row in rows], marker="o", label=label)
    left.set(xlabel="number of classes K", ylabel="training steps / s", yscale="log", title="M2 training speed")
    left.legend()
    right.plot(classes, [row["speed-up"] for row in rows], marker="o", label="measured")
    right.plot(list(PAPER_SPEEDUP), list(PAPER_SPEEDUP.values()), "s", color="gray", label="Jang et al. (2017)")
    right.set(xlabel="number of classes K", ylabel="speed-up (GS steps/s / marginalization steps/s)",
              title="Gumbel-Softmax speed-up over marginalization")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 20, 30, 50, 75, 100])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides, e.g. data.batch_size=50")
    parser.add_argument("--out", type=Path, default=Path("speed_vs_classes"))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or min(args.classes) < 2:
        raise SystemExit(f"need --steps >= 1, --warmup >= 0 and --classes >= 2, got {args.steps}, {args.warmup}, "
                         f"{args.classes}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    device = torch.device(args.device)
    rows = [measure(k, args, device) for k in args.classes]

    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "speed_vs_classes.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "speed_vs_classes.png")
    command = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {machine(device)} with "
             f"`python scripts/speed_vs_classes.py {command}`: {args.steps} timed steps after {args.warmup} "
             f"warm-up steps, the same batches for both estimators.", "",
             "| K | marginalization steps/s | Gumbel-Softmax steps/s | speed-up | paper |", "|---|---|---|---|---|"]
    for row in rows:
        paper = PAPER_SPEEDUP.get(row["classes"])
        lines.append(f"| {row['classes']} | {row['exact steps/s']:.2f} | {row['gumbel_softmax steps/s']:.2f} | "
                     f"{row['speed-up']:.1f}x | {f'{paper}x' if paper else ''} |")
    table = "\n".join(lines) + "\n"
    (args.out / "speed_vs_classes.md").write_text(table)
    print(table)
    print(f"wrote {args.out}/speed_vs_classes.{{csv,png,md}}")


if __name__ == "__main__":
    main()
