#!/usr/bin/env bash
# Run every estimator on the short CPU protocol (conf/experiment/survey_cpu.yaml), one seed, then tabulate.
# Categorical 20x10 latents for all but arm/disarm; slope-annealed ST with its slope schedule; and a Bernoulli
# block (200 binary latents) where arm and disarm run beside gumbel_softmax, reinforce and rloo.
# Usage: bash scripts/survey_estimators.sh [output dir] [categorical estimator list] [extra overrides...]
set -euo pipefail
out=${1:-multirun/survey_cpu/$(date +%Y-%m-%d_%H-%M-%S)}
estimators=${2:-gumbel_softmax,st_gumbel_softmax,st,gumbel_rao,gst,reinmax,reinforce,reinforce_nvar,nvil,rloo,darn,muprop,vimco,rebar,relax}
shift 2 || shift $#
python train.py -m experiment=survey_cpu logger=csv estimator="$estimators" hydra.sweep.dir="$out/categorical" "$@"
python train.py -m experiment=survey_cpu logger=csv estimator=slope_annealed_st schedule=slope_linear \
  hydra.sweep.dir="$out/slope" "$@"
python train.py -m experiment=survey_cpu logger=csv model.n_vars=200 model.n_classes=2 \
  estimator=arm,disarm,gumbel_softmax,reinforce,rloo hydra.sweep.dir="$out/bernoulli" "$@"
for part in categorical slope bernoulli; do
  python scripts/compare.py "$out/$part" --out "$out/$part/comparison"
done
