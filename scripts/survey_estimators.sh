#!/usr/bin/env bash
# Run every categorical estimator on the short CPU protocol (conf/experiment/survey_cpu.yaml), one seed,
# then tabulate the results. Usage: bash scripts/survey_estimators.sh [output dir] [extra overrides...]
set -euo pipefail
out=${1:-multirun/survey_cpu/$(date +%Y-%m-%d_%H-%M-%S)}
shift || true
python train.py -m experiment=survey_cpu logger=csv \
  estimator=gumbel_softmax,st_gumbel_softmax,st,gumbel_rao,reinmax,reinforce,reinforce_nvar,nvil,rloo,muprop,vimco,rebar,relax \
  hydra.sweep.dir="$out/main" "$@"
python train.py -m experiment=survey_cpu logger=csv estimator=slope_annealed_st schedule=slope_linear \
  hydra.sweep.dir="$out/slope" "$@"
python scripts/collect_results.py "$out"
