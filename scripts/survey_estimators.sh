#!/usr/bin/env bash
# Run the categorical estimators on the short CPU protocol (conf/experiment/survey_cpu.yaml), one seed, then
# tabulate the results. Usage: bash scripts/survey_estimators.sh [output dir] [estimator list] [extra overrides...]
set -euo pipefail
out=${1:-multirun/survey_cpu/$(date +%Y-%m-%d_%H-%M-%S)}
estimators=${2:-gumbel_softmax,st_gumbel_softmax,st,gumbel_rao,reinmax,reinforce,reinforce_nvar,nvil,rloo,muprop,vimco,rebar,relax}
shift 2 || shift $#
python train.py -m experiment=survey_cpu logger=csv \
  estimator="$estimators" \
  hydra.sweep.dir="$out/main" "$@"
python train.py -m experiment=survey_cpu logger=csv estimator=slope_annealed_st schedule=slope_linear \
  hydra.sweep.dir="$out/slope" "$@"
python scripts/collect_results.py "$out"
