#!/usr/bin/env bash
# The GPU checks of issues 8 and 19 in one run, sized for one lent GPU and a 10-minute command:
#   1. CAL / plain at CREMA-D shapes (ResNet18 pair, 3 × 224² frames, batch 64, bf16, channels_last)
#      — bench_step.py --preset cremad; target ≤ 1.03
#   2. the data path vs a resident-batch step on a CREMA-D fixture in the OGM-GE layout
#      — bench_data.py; target ≥ 0.95
#   3. trial packing K = 1, 2, 4 trials per GPU on that fixture's run config
#      — bench_sweep.py --packing; target ≥ 0.93 of the K-process ceiling; the best K sets the ready
#      GPU sweeps' `gpus_per_worker` (1/K)
# Every JSON, log and the summary go to $OUT (the device tool's folder; ./runs/gpu_checks otherwise).
#
# On the lent machine (Python 3.12 with torch; no Ray/Optuna): build the wheels here first with
#   bash ../shared/tools/gpu_wheels.sh
# then run, carrying .whl:   bash scripts/gpu_checks.sh
# Plumbing check on a CPU machine (tiny sizes, minutes):   GPU_CHECKS_DEVICE=cpu bash scripts/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_checks}
mkdir -p "$out"
device=${GPU_CHECKS_DEVICE:-cuda}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import ray, optuna" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_checks: installing .whl/ failed" >&2; exit 2; }
  export PYTHONPATH=$PWD:/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  step_args=(--preset cremad --device cuda --rounds 9 --steps 20)
  data_args=(--device cuda --image-size 224 --frames 3 --batch 64 --clips 768 --workers 8 --epochs 2)
  pack_args=(--packing 1 2 4 --device cuda --cpus 16 --epochs 2 --waves 2 --rounds 5 --steps 30)
else  # the same commands at sizes a 2-core CPU runs in minutes
  step_args=(--preset mlp --device cpu --rounds 3 --steps 5)
  data_args=(--device cpu --image-size 32 --frames 3 --batch 8 --clips 48 --workers 1 --epochs 1)
  pack_args=(--packing 1 2 --device cpu --cpus 2 --epochs 1 --waves 1 --rounds 2 --steps 5)
fi
fixture=$(mktemp -d /tmp/calray_gpu_checks_XXXX)
status=0
run() {  # name, command…: log to $out/name.log, keep going on failure
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc $rc in $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || status=1
}
run step python3 scripts/bench_step.py "${step_args[@]}" --variants plain cal cal_aib --out "$out/step.json"
run data python3 scripts/bench_data.py "${data_args[@]}" --keep "$fixture" --out "$out/data.json"
if [ -f "$fixture/run.yaml" ]; then
  run packing python3 scripts/bench_sweep.py "${pack_args[@]}" --run-config "$fixture/run.yaml" --out "$out/packing.json"
else
  echo "== packing: skipped (the data check wrote no $fixture/run.yaml)"; status=1
fi
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None
step, data, pack = load("step"), load("data"), load("packing")
if step:
    r = step["ratio_to_plain"]
    print(f"1. CAL / plain {r['cal']:.3f} (target <= 1.03), CAL+AIB / plain {r['cal_aib']:.3f}; "
          f"plain {step['ms_per_step']['plain']:.2f} ms/step, amp {step['amp']}, batch {step['batch']}")
if data:
    print(f"2. data path / resident {data['ratio']:.3f} (target >= 0.95): {data['data_path_sps']:.0f} vs "
          f"{data['resident_sps']:.0f} samples/s")
if pack:
    per_k = ", ".join(f"K={k}: {r['ratio_to_max_ceiling']:.3f}" for k, r in pack["results"].items())
    print(f"3. packing, sweep / max ceiling: {per_k} (target >= 0.93); best K {pack['best_k']}: "
          f"set the ready GPU sweeps' gpus_per_worker to 1/{pack['best_k']}")
PY
rm -rf "$fixture"
exit $status
