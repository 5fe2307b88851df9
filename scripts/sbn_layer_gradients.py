"""Where an estimator's gradient points in each layer of a trained SBN, against an unbiased reference.

At fixed parameters (a run's checkpoint) and one fixed batch of training images, each estimator draws M gradient
estimates of the batch's mean loss E_h[-log p(x_lower | h)]; the reference is the mean of R draws of chained RLOO
(unbiased through both layers, tests/test_sbn.py). Per parameter group (the nets of the stochastic layers and the
output net) it reports

    cos_mean  = cos(g_bar, g_ref)  the direction of the estimator's expectation, 1 when unbiased (up to noise);
    cos_draw  = mean_m cos(g_m, g_ref)  how well one estimate points there;

cosines, because the variance-normalised estimators divide each layer's gradient by their own running scale. Each
estimator's baselines are first fitted at the checkpoint (``--warmup`` batches), then frozen. cos_mean is also
limited by the noise of the draws, which ``cos_halves`` measures (for the reference too).

    python scripts/sbn_layer_gradients.py --run campaign_state/sbn_bern/darn/seed0/part0 \
        --checkpoint best-epoch069.ckpt --estimators darn,muprop,st --out docs/results/sbn_layer_gradients
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from catvae.relaxations import sample_categorical

CONF = Path(__file__).resolve().parents[1] / "conf" / "estimator"


def build(run_cfg, estimator_name: str, state: dict, reference_samples: int, image_shape: list[int]):
    """The run's SBN with ``estimator_name``'s estimator and the checkpoint's nets, in eval mode (the
    estimators' running statistics are read, never updated, so every draw sees the same parameters); RLOO
    takes ``reference_samples`` samples per layer."""
    estimator_cfg = OmegaConf.load(CONF / f"{estimator_name}.yaml")
    if estimator_name == "rloo":
        estimator_cfg.n_samples = reference_samples
    model = instantiate(run_cfg.model, estimator=instantiate(estimator_cfg), image_shape=image_shape)
    nets = {k: v for k, v in state.items() if not k.startswith("layer_estimators.")}
    missing, unexpected = model.load_state_dict(nets, strict=False)
    if [k for k in missing if not k.startswith("layer_estimators.")] or unexpected:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    return model.eval()


def warm_up(model, images: torch.Tensor, n_batches: int, batch: int, generator: torch.Generator):
    """Fits the estimators' baselines (moving averages of the signal and its variance) at the checkpoint's
    parameters on ``n_batches`` random training batches, as training does, without changing a parameter."""
    model.train()
    with torch.no_grad():
        for _ in range(n_batches):
            x_upper, x_lower = model.halves(images[torch.randint(len(images), (batch,), generator=generator)])
            model.estimate_from(0, x_upper, x_lower)
    return model.eval()


def groups(model) -> dict[str, list[torch.nn.Parameter]]:
    """The parameters of each stochastic layer's net (layer0, layer1, ...) and of the output net."""
    named = {f"layer{i}": list(net.parameters()) for i, net in enumerate(model.layers)}
    named["output"] = list(model.output.parameters())
    return named


def draws(model, images: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """n gradient estimates per parameter group, (n, D) in float64."""
    params = groups(model)
    flat = [p for ps in params.values() for p in ps]
    x_upper, x_lower = model.halves(images)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in params}
    for _ in range(n):
        with torch.enable_grad():
            grads = torch.autograd.grad(model.estimate_from(0, x_upper, x_lower).surrogate.mean(), flat,
                                        allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, flat)]
        start = 0
        for name, ps in params.items():
            out[name].append(torch.cat([g.flatten() for g in grads[start:start + len(ps)]]).double())
            start += len(ps)
    return {name: torch.stack(rows) for name, rows in out.items()}


def distance_from_half(model, images: torch.Tensor) -> list[float]:
    """Per stochastic layer, the mean over images and units of |q(h_n = class 0) - 1/2| (K = 2), each layer's input
    drawn ancestrally: how far the units are from the point x_bar = 1/2 that DARN expands about."""
    inputs, distances = model.halves(images)[0], []
    with torch.no_grad():
        for layer in range(len(model.layers)):
            logits = model.layer_logits(layer, inputs)
            distances.append((torch.softmax(logits, -1)[..., 0] - 0.5).abs().mean().item())
            inputs = sample_categorical(logits).flatten(1)
    return distances


def cosines(sample: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """cos_mean and cos_draw of the module docstring, and cos_halves: the cosine between the means of the sample's
    two halves, near 1 when the M draws resolve the estimator's expectation and near 0 when noise dominates it."""
    half = len(sample) // 2
    return {"cos_mean": F.cosine_similarity(sample.mean(0), reference, dim=0).item(),
            "cos_draw": F.cosine_similarity(sample, reference.expand_as(sample), dim=1).mean().item(),
            "cos_halves": F.cosine_similarity(sample[:half].mean(0), sample[half:].mean(0), dim=0).item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run's part directory (config.yaml, checkpoints/)")
    parser.add_argument("--checkpoint", default="last.ckpt")
    parser.add_argument("--estimators", default="darn,muprop,st")
    parser.add_argument("--draws", type=int, default=400, help="M, per estimator")
    parser.add_argument("--reference-draws", type=int, default=800, help="R, chained RLOO")
    parser.add_argument("--reference-samples", type=int, default=8, help="RLOO samples per layer")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=500, help="batches that fit each estimator's baselines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    run_cfg = OmegaConf.load(args.run / "config.yaml")
    state = torch.load(args.run / "checkpoints" / args.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    data = instantiate(run_cfg.data)
    data.setup("fit")
    generator = torch.Generator().manual_seed(args.seed)
    images = data.splits["train"][0]
    batch = images[torch.randperm(len(images), generator=generator)[:args.batch]]

    torch.manual_seed(args.seed)
    image_shape = list(data.image_shape)
    reference_model = build(run_cfg, "rloo", state, args.reference_samples, image_shape)
    reference = draws(reference_model, batch, args.reference_draws)
    results = {"run": str(args.run), "checkpoint": args.checkpoint, "draws": args.draws,
               "reference_draws": args.reference_draws, "reference_samples": args.reference_samples,
               "batch": args.batch, "warmup": args.warmup, "seed": args.seed, "groups": {}}
    if run_cfg.model.n_classes == 2:
        results["distance_from_half"] = distance_from_half(reference_model, batch)
    for name, ref in reference.items():
        results["groups"][name] = {"reference_norm": ref.mean(0).norm().item(),
                                   "reference_halves": cosines(ref, ref.mean(0))["cos_halves"]}
    for estimator_name in args.estimators.split(","):
        model = warm_up(build(run_cfg, estimator_name, state, args.reference_samples, image_shape), images,
                        args.warmup, args.batch, generator)
        sample = draws(model, batch, args.draws)
        for name, ref in reference.items():
            results["groups"][name][estimator_name] = cosines(sample[name], ref.mean(0))

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{run_cfg.experiment_name}_{run_cfg.estimator.name}_seed{run_cfg.seed}_{Path(args.checkpoint).stem}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, rows in results["groups"].items():
        cells = ", ".join(f"{k} {v['cos_mean']:.3f}/{v['cos_draw']:.3f}/{v['cos_halves']:.3f}"
                          for k, v in rows.items() if isinstance(v, dict))
        print(f"{name}: reference halves {rows['reference_halves']:.3f}; cos_mean/cos_draw/cos_halves: {cells}")


if __name__ == "__main__":
    main()
