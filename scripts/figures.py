"""Jang et al. (2017), Figure 1, computed: the Gumbel-Softmax distribution interpolates between a one-hot
categorical (tau -> 0) and the uniform point (1/K, ..., 1/K) (tau -> inf).

    python scripts/figures.py [--out docs/figures] [--probs 0.15 0.4 0.45] [--samples 200000] [--seed 0]

Writes ``gumbel_softmax_figure1.png`` (top row: the expected soft sample E[y] at tau = 0.1, 0.5, 1, 10, with the
categorical's probabilities for reference; bottom row: one sample y at each tau, all from the same Gumbel noise)
and ``gumbel_softmax_mean.md``, the Monte Carlo mean of y against tau with its standard errors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from catvae.relaxations import gumbel_noise  # noqa: E402

FIGURE_TAUS = (0.1, 0.5, 1.0, 10.0)
TABLE_TAUS = (0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 100.0)


def soft_samples(probs: torch.Tensor, tau: float, noise: torch.Tensor) -> torch.Tensor:
    """y = softmax((log pi + g) / tau) for Gumbel noise g (S, K) -> (S, K) (Jang et al. 2017, Eq. 2)."""
    return torch.softmax((probs.log() + noise) / tau, dim=-1)


def mean_table(probs: torch.Tensor, noise: torch.Tensor, taus=TABLE_TAUS) -> str:
    """Markdown table of E[y_k] (Monte Carlo mean +- standard error) for each tau."""
    k = len(probs)
    header = "| tau | " + " | ".join(f"E[y_{i + 1}]" for i in range(k)) + " |"
    lines = [header, "|---|" + "---|" * k,
             "| (pi) | " + " | ".join(f"{p:.3f}" for p in probs.tolist()) + " |"]
    for tau in taus:
        y = soft_samples(probs, tau, noise)
        mean, se = y.mean(0), y.std(0) / len(y) ** 0.5
        lines.append(f"| {tau:g} | " + " | ".join(f"{m:.4f} +- {s:.4f}" for m, s in zip(mean.tolist(), se.tolist()))
                     + " |")
    lines.append("| (uniform) | " + " | ".join(f"{1 / k:.3f}" for _ in range(k)) + " |")
    return "\n".join(lines) + "\n"


def figure(probs: torch.Tensor, noise: torch.Tensor, path: Path) -> None:
    k, classes = len(probs), range(1, len(probs) + 1)
    fig, axes = plt.subplots(2, len(FIGURE_TAUS) + 1, figsize=(2.4 * (len(FIGURE_TAUS) + 1), 4.4), sharey="row")
    axes[0][0].bar(classes, probs.tolist(), color="tab:gray")
    axes[0][0].set_title("categorical pi")
    axes[1][0].axis("off")
    for column, tau in enumerate(FIGURE_TAUS, start=1):
        y = soft_samples(probs, tau, noise)
        axes[0][column].bar(classes, y.mean(0).tolist(), color="tab:blue")
        axes[0][column].set_title(f"E[y], tau = {tau:g}")
        axes[1][column].bar(classes, y[0].tolist(), color="tab:orange")
        axes[1][column].set_title(f"sample, tau = {tau:g}")
    for ax in axes.flat:
        ax.set_xticks(list(classes))
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("probability")
    axes[1][1].set_ylabel("y")
    axes[1][1].tick_params(labelleft=True)
    fig.suptitle(f"Gumbel-Softmax with K = {k}: E[y] -> pi as tau -> 0, -> uniform as tau -> inf", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--probs", type=float, nargs="+", default=[0.15, 0.4, 0.45])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    probs = torch.tensor(args.probs, dtype=torch.float64)
    if len(probs) < 2 or (probs <= 0).any() or abs(probs.sum().item() - 1) > 1e-6:
        raise SystemExit(f"--probs must be >= 2 positive numbers summing to 1, got {args.probs}")
    if args.samples < 2:
        raise SystemExit(f"--samples must be >= 2, got {args.samples}")
    generator = torch.Generator().manual_seed(args.seed)
    noise = gumbel_noise((args.samples, len(probs)), generator=generator).double()
    args.out.mkdir(parents=True, exist_ok=True)
    figure(probs, noise, args.out / "gumbel_softmax_figure1.png")
    table = mean_table(probs, noise)
    (args.out / "gumbel_softmax_mean.md").write_text(table)
    print(table)
    print(f"wrote {args.out / 'gumbel_softmax_figure1.png'} and {args.out / 'gumbel_softmax_mean.md'}")


if __name__ == "__main__":
    main()
