#!/usr/bin/env bash
# One prepared GPU session (docs/gpu.md): run on a lent GPU machine, from the repository root, after
# tools/gpu_prepare.sh filled .gpu/ here (carry `.gpu`). Within BUDGET seconds it
#   1. installs the carried wheels, records the machine (nvidia-smi, torch);
#   2. runs bench/gpu_check.py: the serving path on CUDA (the precisions chosen at start, windows,
#      clicks and autos against the CPU, memory peaks), hard-capped at CHECK_S seconds;
#   3. trains the `small` starter further on the GPU in two arms (STARTER=0: none), beside probes of
#      whether a point round fits its own labels (FITS), until the budget's end (see below);
#   4. leaves in $OUT: each arm's weights (its point checkpoint's network if its run was cut), the
#      `resumed` arm's checkpoint in bfloat16 split into 15 MiB parts (join with `cat`, resume with
#      --checkpoint), gpu_check.json and logs.tgz (logs, reports, the probes' JSON, machine).
# The held-out figures are taken back home: `tools/train_starter.py --evaluate OUT/resumed.pt`.
set -uo pipefail
BUDGET=${BUDGET:-550}
CHECK_S=${CHECK_S:-0}    # the serving path was checked on 2026-12-04 (docs/gpu.md); 200 runs it again
OUT=${OUT:-artifacts/gpu_session}
RUN=${RUN:-/tmp/gpu_run}
PY=${PY:-python3}          # the image's python3 holds torch
DEVICE=${DEVICE:-cuda}    # cpu for a dry run here
PY=$(command -v "$PY"); [ "${PY#/}" != "$PY" ] || PY=$PWD/$PY  # absolute: the probes run from bench/
T0=$SECONDS
mkdir -p "$OUT" "$RUN"
left() { echo $((BUDGET - (SECONDS - T0))); }

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 VISTA3D_DATA=$PWD/.gpu/data
{ nvidia-smi; "$PY" -c 'import torch, monai, numpy; print("torch", torch.__version__, "cuda", torch.version.cuda, "monai", monai.__version__, "numpy", numpy.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'; lscpu | grep -E "Model name|^CPU\(s\)"; } > "$RUN/machine.txt" 2>&1
cat "$RUN/machine.txt"

echo "== gpu_check (at most ${CHECK_S} s) at $((SECONDS - T0)) s"
if [ "$CHECK_S" -gt 0 ]; then  # CHECK_S=0: training only
  timeout -s INT "$CHECK_S" "$PY" bench/gpu_check.py --limit-s $((CHECK_S - 80)) --out "$OUT/gpu_check.json" > "$RUN/gpu_check.log" 2>&1
  echo "gpu_check rc $?"; grep "gpu_check:" "$RUN/gpu_check.log" | cut -c1-400
fi

# Two kinds of job share the machine until the budget's end (the step is bound by the CPU's click
# simulation, so each gets its own cores and the GPU runs them all):
#   starter arms, further from the shipped starter at lr 5e-4 with crops moved up to 16 voxels off
#   their object: `resumed` (3 clicks a session, as the starter trained) and `rounds5` (5 clicks, more
#   corrections, negative ones above all); the point phase ends 100 s before the budget, the
#   automatic branch, saving and packing follow;
#   fitting probes (bench/fit_own_labels.py): does a round fit its own five labels (STS_006..010)
#   given hundreds of steps, scored through the served click path every 100 steps.
MINUTES=$("$PY" -c "print(round(max(0.2, ($(left) - 100) / 60), 2))")
FIT_MINUTES=$("$PY" -c "print(round(max(0.2, ($(left) - 60) / 60), 2))")
COMMON=(--data "$VISTA3D_DATA" --device "$DEVICE" --steps 8000 --shift 16 --max-minutes "$MINUTES" --auto-steps "${AUTO_STEPS:-1500}" --auto-crops "${AUTO_CROPS:-48}" --threads 3 --no-figures --lr 5e-4 --init apps/vista3d/weights/small_starter.pt)
PIDS=()
if [ "${STARTER:-1}" = 1 ]; then  # STARTER=0: the probes alone
  "$PY" tools/train_starter.py "${COMMON[@]}" --rounds 3 --checkpoint "$RUN/resumed.ckpt" --out "$RUN/resumed.pt" > "$RUN/resumed.log" 2>&1 &
  PIDS+=($!)
  "$PY" tools/train_starter.py "${COMMON[@]}" --rounds 5 --checkpoint "$RUN/rounds5.ckpt" --out "$RUN/rounds5.pt" > "$RUN/rounds5.log" 2>&1 &
  PIDS+=($!)
fi
fit() {  # name, then fit_own_labels' arguments (FIT_ARGS are added to every probe's, e.g. --holdout)
  local name=$1; shift
  # shellcheck disable=SC2086
  (cd bench && "$PY" fit_own_labels.py --device "$DEVICE" --threads "${FIT_THREADS:-2}" --steps "${FIT_STEPS:-1500}" --every "${FIT_EVERY:-100}" --max-minutes "$FIT_MINUTES" --out "$RUN/fit_$name.json" ${FIT_ARGS:-} "$@") > "$RUN/fit_$name.log" 2>&1 &
  PIDS+=($!)
}
# FITS: probes as "name args;name args" (default: the four of 2026-12-04's second run)
IFS=';' read -ra SPECS <<< "${FITS:-full_1e-4 --modes full --lr 1e-4;full_1e-4_shift16 --modes full --lr 1e-4 --shift 16;full_3e-5_shift16 --modes full --lr 3e-5 --shift 16;head_1e-4 --modes head --lr 1e-4}"
for spec in "${SPECS[@]}"; do
  # shellcheck disable=SC2086
  fit $spec
done
echo "== $(( ${#PIDS[@]} - ${#SPECS[@]} )) starter arms for ${MINUTES} min, ${#SPECS[@]} fitting probes for ${FIT_MINUTES} min, at $((SECONDS - T0)) s"
running() { for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while running; do
  if [ "$(left)" -lt 25 ]; then echo "budget: stopping the jobs"; kill -INT "${PIDS[@]}" 2>/dev/null; sleep 5; kill -9 "${PIDS[@]}" 2>/dev/null; break; fi
  sleep 2
done
wait
for arm in resumed rounds5; do [ -f "$RUN/$arm.log" ] && grep -E "step [0-9]+/|Encoded|time limit" "$RUN/$arm.log" | tail -3; done
for f in "$RUN"/fit_*.log; do echo "$f"; grep -E "fit_own_labels INFO" "$f" | tail -2 | cut -c1-300; done

echo "== packing at $((SECONDS - T0)) s"
"$PY" - "$RUN" "$OUT" <<'PY'
import shutil, sys, torch
from pathlib import Path
sys.path.insert(0, "apps/vista3d")
from lib.model import build_network, save_state
run, out = Path(sys.argv[1]), Path(sys.argv[2])
for arm in ("resumed", "rounds5"):
    final, ckpt = run / f"{arm}.pt", run / f"{arm}.ckpt"
    if final.is_file():
        shutil.copy(final, out / final.name)
    elif ckpt.is_file():  # cut during the automatic branch: the point phase's network, saved as the starter is
        network = build_network("small")
        network.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["trainer"]["network"])
        save_state(network, out / f"{arm}_point.pt")
ckpt = run / "resumed.ckpt"
if ckpt.is_file():
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    def bf16(x):
        if isinstance(x, torch.Tensor): return x.bfloat16() if x.is_floating_point() and x.dim() else x
        if isinstance(x, dict): return {k: bf16(v) for k, v in x.items()}
        if isinstance(x, list): return [bf16(v) for v in x]
        return x
    state["trainer"] = bf16(state["trainer"])
    torch.save(state, run / "resumed.ckpt.bf16")
PY
[ -f "$RUN/resumed.ckpt.bf16" ] && split -b 15M -d "$RUN/resumed.ckpt.bf16" "$OUT/resumed.ckpt.bf16.part"
tar -czf "$OUT/logs.tgz" -C "$RUN" $(cd "$RUN" && ls *.log *.txt *.json 2>/dev/null)
ls -la "$OUT"; echo "done at $((SECONDS - T0)) s"
