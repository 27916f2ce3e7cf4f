#!/usr/bin/env bash
# Whole-prefill A/B between source trees on one GPU: scripts/profile_prefill.py's default graph (serial-auto, t=64)
# built from each tree's `src` in turn, in ROUNDS alternating rounds (a fresh process each), so clock drift falls on
# every tree alike; then a summary JSON (each tree's per-round medians and their median).
#
#   git archive <commit> src | tar -x -C ab_old            # a tree per commit to compare (untracked, not committed)
#   ROUNDS=3 bash scripts/ab_prefill.sh $OUT old=ab_old/src new=src
#   bash scripts/ab_prefill.sh --summarize DIR              # the summary of runs already in DIR
set -euo pipefail
summarize() {
  python3 - "$1" <<'PY'
import json, pathlib, statistics, sys
d = pathlib.Path(sys.argv[1])
runs = {}
for f in sorted(d.glob("ab-*-*.json")):
    name, rnd = f.stem[3:].rsplit("-", 1)
    row = json.loads(f.read_text())["variants"]["serial-auto"]
    runs.setdefault(name, {})[int(rnd)] = {k: row[k] for k in ("ms", "p10_ms", "p90_ms", "rel_err_vs_reference")}
out = {"device": json.loads(next(d.glob("ab-*-*.json")).read_text())["device"],
       "trees": {n: {"round_ms": [r[i]["ms"] for i in sorted(r)], "median_ms": round(statistics.median(r[i]["ms"] for i in r), 4),
                     "rounds": r} for n, r in runs.items()}}
(d / "summary.json").write_text(json.dumps(out, indent=1))
print(json.dumps({n: (t["median_ms"], t["round_ms"]) for n, t in out["trees"].items()}))
PY
}
if [ "${1:-}" = "--summarize" ]; then summarize "$2"; exit 0; fi
out=$1; shift
for r in $(seq 1 "${ROUNDS:-3}"); do
  for tree in "$@"; do
    name=${tree%%=*}; path=${tree#*=}
    PYTHONPATH=$path python3 scripts/profile_prefill.py --variants serial-auto --timelines "" --no-pieces --rounds 0 \
      --out "$out/ab-$name-$r.json" | grep "^serial-auto" | cut -c1-160 | sed "s/^/$name $r /"
  done
done
summarize "$out"
