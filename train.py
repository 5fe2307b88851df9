"""Train and test a categorical VAE: ``python train.py [experiment=...] [estimator=...] [key=value ...]``.

Hydra composes conf/config.yaml with the overrides; see README.md for the config groups.
"""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from catvae.run import run

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Returns the metric a Hydra sweeper minimises (``optimized_metric``, default test/nll_iw).

    In a multirun a failed job (recorded in its status.json) returns NaN so the other jobs still run; the
    sweep's summary (catvae.sweep.SweepSummary) reports it at the end.
    """
    try:
        return run(cfg)["metrics"].get(cfg.optimized_metric, float("nan"))
    except Exception:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        log.exception("job %s failed; the sweep goes on", HydraConfig.get().job.num)
        return float("nan")


if __name__ == "__main__":
    main()
