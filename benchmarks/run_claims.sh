#!/usr/bin/env bash
# The paper's two claims (benchmarks/claims.py) and notebook 11b on one GPU, one device call per step or a few,
# each call following the last on a warm machine (/tmp and checkpoints/ are kept between calls):
#   OUT=<results folder> bash benchmarks/run_claims.sh STEP...
# STEPs (checked before any runs; the script stops at the first that fails and returns its status):
#   judge          train the Shapes judge alone (80 s): a later step of 9+ minutes then fits the 10-minute limit
#                  (or bring the judge of an earlier run along, checkpoints/full/judge_64.pt, as session 15 did)
#   pixel, latent  (a) latent vs pixel, one space each (latent about 6.5 min on one H200; pixel's default curve, to
#                  960 s, about 18 min: past one device call, so give it CURVE as below). Where $CLAIMS has no
#                  result yet, the committed one (benchmarks/results/h200/claims_latent_vs_pixel.json) is the start,
#                  so one space can run again against the other's measured curve (claims.py refuses it if that was
#                  measured with other settings or on another GPU model). CURVE="15 30 60 120 240 480" sets --curve
#                  (pixel to 480 s: about 9.6 min, with the judge there already); RESUME=1 adds --resume (going on
#                  from the checkpoint of an earlier call on this machine: CURVE=960 RESUME=1 ... pixel takes that
#                  pixel model on to 960 s). CURVE and RESUME apply to every step of the call.
#   f1 f2 f4 f8    (b) the f-study, one factor each (about 4.7 min each with the defaults: two fit a call), from
#                  scratch in $CLAIMS (the committed f-study is not its start: run all four into one $CLAIMS)
#   nb:<notebook>  run a notebook (scripts/run_notebooks.py) after copying $CLAIMS's JSON into
#                  benchmarks/results/h200/ for 11b's plots (a partial f-study replaces the committed one there)
# Needs the Jupyter wheels in .whl/ (../shared/tools/gpu-wheels.sh) for nb:, and $MINILDM_DATA (or data/) with
# MNIST and cifar10-test for the real-data notebooks. Results: $OUT/claims/ (JSON, PNG) and $OUT/log_<step>.txt.
# A step the device stops at its time limit leaves its saved points in $CLAIMS only: the next call copies them out.
# With no STEP it only installs the wheels. On a machine of several GPUs, give each GPU a lane of its own, with its
# own $CLAIMS and $OUT (the wheels installed first, once), and merge nothing by hand: one lane per part's JSON, e.g.
#   bash benchmarks/run_claims.sh && (CUDA_VISIBLE_DEVICES=0 CLAIMS=/tmp/c0 OUT=$OUT/gpu0 CURVE="15 30 60 120 240 480"
#   bash benchmarks/run_claims.sh pixel & CUDA_VISIBLE_DEVICES=1 CLAIMS=/tmp/c1 OUT=$OUT/gpu1 bash
#   benchmarks/run_claims.sh f8 f4 & wait)   (9.8 minutes on two H200s; the next call: CURVE=960 RESUME=1 ... pixel
#   beside f1 f2, into the same $CLAIMS folders)
# Each lane has a GPU of its own, but the lanes share the host's CPU cores (32 on a two-H200 machine): a pixel lane
# beside an f-study lane made 7.4% fewer steps a second than alone on a one-H200 machine (docs/measured.md, 15).
set -u -o pipefail
OUT=${OUT:-runs/claims_out}; CLAIMS=${CLAIMS:-/tmp/claims}
for step in "$@"; do
  case $step in judge|pixel|latent|f1|f2|f4|f8|nb:*) ;; *)
    echo "run_claims.sh: unknown step '$step' (judge, pixel, latent, f1, f2, f4, f8, nb:<notebook>)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT/claims" "$CLAIMS"
cp "$CLAIMS"/*.json "$CLAIMS"/*.png "$OUT/claims/" 2>/dev/null  # what an earlier call left, e.g. one cut short
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site_claims/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_claims .whl/*.whl \
    && touch /tmp/site_claims/.done
fi
export PYTHONPATH=/tmp/site_claims:$PWD${PYTHONPATH:+:$PYTHONPATH}
resume=(); [ "${RESUME:-0}" = 1 ] && resume=(--resume)
curve=(); [ -n "${CURVE:-}" ] && read -ra curve <<< "--curve $CURVE"
nvidia-smi --query-gpu=name --format=csv,noheader
status=0
for step in "$@"; do
  echo "=== $step $(date +%T)"; start=$SECONDS
  case $step in
    judge) python3 -c "from minildm.config import checkpoint_dir; from minildm.device import setup
from minildm.judge import judge_for; rt = setup(seed=0); judge_for(32 if rt.fast else 64, rt, checkpoint_dir(rt.fast))" ;;
    pixel|latent) [ -e "$CLAIMS/claims_latent_vs_pixel.json" ] \
                    || cp benchmarks/results/h200/claims_latent_vs_pixel.json "$CLAIMS/" 2>/dev/null
                  python3 benchmarks/claims.py latent-vs-pixel --spaces "$step" --out "$CLAIMS" "${curve[@]}" \
                    "${resume[@]}" ;;
    f*) python3 benchmarks/claims.py f-study --f "${step#f}" --out "$CLAIMS" "${curve[@]}" "${resume[@]}" ;;
    nb:*) mkdir -p benchmarks/results/h200 && cp "$CLAIMS"/claims_*.json benchmarks/results/h200/ 2>/dev/null
          python3 scripts/run_notebooks.py "${step#nb:}" --out "$OUT" ;;
  esac 2>&1 | tee "$OUT/log_${step//[:\/]/_}.txt"
  status=$?
  echo "=== $step: $((SECONDS - start)) s, exit status $status"
  cp "$CLAIMS"/*.json "$CLAIMS"/*.png "$OUT/claims/" 2>/dev/null
  [ $status = 0 ] || break
done
exit $status
