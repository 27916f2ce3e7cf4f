#!/usr/bin/env bash
# The demo checkpoint's GPU call (from the checkout on the GPU machine, SmolLM2's GGUF already in $SAISA_CACHE):
#   bash scripts/demo_artifact_gpu.sh scripts/demo_sweeps/sweep8.json
# runs the sweep's variants (describe-first, LoRA r=16), packs each finished one as a delta
# (scripts/pack_demo_checkpoint.py, one at a time: parallel packs oversubscribe the CPU), re-evaluates the rebuilt
# models, and splits the delta of the one whose worst category beats its chance by most into 15 MiB parts.
# Under $OUT: sweep.json, sweep.md, logs.tar.gz, pack-<variant>.json, pack.log, stage2.safetensors.part-NN.
set -uo pipefail
SW=/tmp/sweep-artifact
python3 scripts/demo_sweep.py "$1" --out $SW --jobs 4 --timeout "${VARIANT_TIMEOUT:-420}"
cp $SW/sweep.json $SW/sweep.md $SW/logs.tar.gz "$OUT"/ 2>/dev/null
export OMP_NUM_THREADS=8
for d in $SW/*/stage2/final; do
  v=$(basename "$(dirname "$(dirname "$d")")")
  [ -f "$SW/$v/results.json" ] || continue
  python3 scripts/pack_demo_checkpoint.py --model "$d" --synth "$SW/$v/synth" --rank 16 --out "/tmp/pack/$v" \
    --results "$SW/$v/results.json" --describe-first 2>&1 | grep -v "Loading weights\|Writing\|Converting" >> "$OUT/pack.log"
  python3 -c "import json; d=json.load(open('/tmp/pack/$v/pack.json')); d['variant']='$v'; json.dump(d, open('$OUT/pack-$v.json','w'), indent=1)"
done
best=$(python3 - "$OUT" <<'PY'
import glob, json, sys
rows = [json.load(open(f)) for f in glob.glob(sys.argv[1] + "/pack-*.json")]
margin = lambda d: min(d["rebuilt_accuracy"][c] - d["chance"][c] for c in d["rebuilt_accuracy"] if c != "overall")
print(max(rows, key=margin)["variant"] if rows else "")
PY
)
echo "best variant: $best"
[ -n "$best" ] || exit 1
split -b 15M -d "/tmp/pack/$best/stage2.safetensors" "$OUT/stage2.safetensors.part-"
ls -la "$OUT"
