#!/usr/bin/env bash
# The paper's two claims (benchmarks/claims.py) and notebook 11b on one GPU, one device call per step, each
# following the last on a warm machine (/tmp and checkpoints/ are kept between calls; the judge is trained once):
#   OUT=<results folder> bash benchmarks/run_claims.sh STEP...
# STEPs: pixel | latent          (a) latent vs pixel, one space each (about 6.5 min each on one H200); where
#                                $CLAIMS has no result yet, the committed one (benchmarks/results/h200/) is the
#                                start, so one space can run again against the other's measured curve (claims.py
#                                refuses it if that was measured with other settings or on another GPU model);
#                                CURVE="15 30 60 120 240 480" sets --curve (480 s of pixel training: about 9.5 min),
#                                RESUME=1 adds --resume (go on from the checkpoint of the last call on this machine:
#                                CURVE=960 RESUME=1 ... pixel takes that pixel model on to 960 s)
#        f1 | f2 | f4 | f8       (b) the f-study, one factor each (about 5 min each with the defaults)
#        nb:<notebook>           run a notebook (scripts/run_notebooks.py), after copying the claims' JSON into
#                                benchmarks/results/h200/ for 11b's plots
# Needs the Jupyter wheels in .whl/ (../shared/tools/gpu-wheels.sh) for nb:, and $MINILDM_DATA (or data/) with
# MNIST and cifar10-test for the real-data notebooks. Results: $OUT/claims/ (JSON, PNG) and $OUT/log_<step>.txt.
set -u
OUT=${OUT:-runs/claims_out}; CLAIMS=${CLAIMS:-/tmp/claims}
mkdir -p "$OUT/claims" "$CLAIMS"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site_claims/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_claims .whl/*.whl \
    && touch /tmp/site_claims/.done
fi
export PYTHONPATH=/tmp/site_claims:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name --format=csv,noheader
for step in "$@"; do
  echo "=== $step $(date +%T)"; start=$SECONDS
  case $step in
    pixel|latent) cp -n benchmarks/results/h200/claims_latent_vs_pixel.json "$CLAIMS/" 2>/dev/null
                  python3 benchmarks/claims.py latent-vs-pixel --spaces "$step" --out "$CLAIMS" \
                    ${CURVE:+--curve $CURVE} ${RESUME:+--resume} ;;
    f1|f2|f4|f8) python3 benchmarks/claims.py f-study --f "${step#f}" --out "$CLAIMS" ${CURVE:+--curve $CURVE} \
                   ${RESUME:+--resume} ;;
    nb:*) mkdir -p benchmarks/results/h200 && cp "$CLAIMS"/claims_*.json benchmarks/results/h200/ 2>/dev/null
          python3 scripts/run_notebooks.py "${step#nb:}" --out "$OUT" ;;
    *) echo "unknown step $step (pixel, latent, f1, f2, f4, f8, nb:<notebook>)"; exit 2 ;;
  esac 2>&1 | tee "$OUT/log_${step//[:\/]/_}.txt"
  echo "=== $step: $((SECONDS - start)) s"
  cp "$CLAIMS"/*.json "$CLAIMS"/*.png "$OUT/claims/" 2>/dev/null
done
true
