"""Train and test a categorical VAE: ``python train.py [experiment=...] [estimator=...] [key=value ...]``.

Hydra composes conf/config.yaml with the overrides; see README.md for the config groups.
"""

import hydra
from omegaconf import DictConfig

from catvae.run import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Returns the metric a Hydra sweeper minimises (``optimized_metric``, default test/nll_iw)."""
    return run(cfg)["metrics"].get(cfg.optimized_metric, float("nan"))


if __name__ == "__main__":
    main()
