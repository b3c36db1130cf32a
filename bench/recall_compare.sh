#!/usr/bin/env bash
# Issue 20 on one GPU, in two device calls of under 10 minutes each (bench/README.md "recall_compare.sh"):
#
#   bench/recall_compare.sh teacher    # train the recall teacher (MINUTES=6), RULER through lm-eval, per-layer ablation;
#                                      # fla's kernels compile meanwhile in the background (WARMUP=0: not)
#   bench/recall_compare.sh compare    # join the teacher from its pieces if it is not here, write the corpus, hybridize compare
#   bench/recall_compare.sh check      # only the environment: versions, lm-eval / fla importable, the data found
#
# Work files stay under WORK (default runs/recall12, git-ignored): on a machine still warm from the teacher call
# the compare call finds the teacher there; on a fresh one, carry the teacher call's files (its $OUT) into PIECES
# (default runs/recall12/pieces) and they are joined. Results go to $OUT (what a device call brings back; at most
# 8 files), else WORK/out: teacher call: recall_teacher.json, recall_teacher.md, recall_ablation.png, teacher.log,
# teacher.bf16.tar.NN (3 pieces of 16 MiB); compare call: compare.json, compare.md, compare_metrics.png,
# compare_layers.png, compare.log, compare_state.tgz (the resume state without weights: carried back in PIECES, a compare
# on a fresh machine resumes from it), and compare_rows_partial.json when it ran out of time: run it again, it resumes.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/recall12}
PIECES=${PIECES:-$WORK/pieces}
OUTDIR=${OUT:-$WORK/out}
MINUTES=${MINUTES:-6}
COMPARE_LIMIT_S=${COMPARE_LIMIT_S:-555}
TEACHER_LIMIT_S=${TEACHER_LIMIT_S:-560}
# a device call ends at 600 s whatever runs: the compare's limit is what is left of CALL_LIMIT_S after the join and
# the corpus, less COPY_S for copying its files to $OUT (the first GPU call lost its rows to that arithmetic)
CALL_LIMIT_S=${CALL_LIMIT_S:-585}
COPY_S=${COPY_S:-15}
START_S=$SECONDS
CORPUS_TOKENS=${CORPUS_TOKENS:-2097152}
SEQ=${SEQ:-2048}                 # the teacher's row length, the corpus's blocks (the config's data.seq_len)
DEVICE=${DEVICE:-cuda}
TEACHER_ARGS=${TEACHER_ARGS:-}   # more recall_teacher.py train flags (a CPU rehearsal: --preset tiny --steps 10)
TEACHER=$WORK/teacher_run/teacher
PY=${PYTHON:-python3}
mkdir -p "$WORK" "$OUTDIR"

setup() {
  # the device image has no fla / lm-eval / datasets and triton 3.6: use what the lead installed (/tmp/site2: triton
  # 3.7.1, /tmp/site: wheels; shared/gpu/install.sh), install .whl/ here if it came along, then this project
  for d in /tmp/site /tmp/site2; do [ -d "$d" ] && export PYTHONPATH="$d${PYTHONPATH:+:$PYTHONPATH}"; done
  if [ -d .whl ] && [ ! -e /tmp/site/.recall-wheels ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    touch /tmp/site/.recall-wheels
    case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}";; esac
  fi
  "$PY" -c "import hybridize" 2>/dev/null || "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
  export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
  [ -f .tc/tc_autotune.tgz ] && [ ! -d "$TRITON_CACHE_DIR" ] && tar xzf .tc/tc_autotune.tgz -C /tmp || true
  "$PY" - <<'EOF'
import importlib, sys
sys.path.insert(0, "bench")
import torch, recall_data as rd
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("transformers", "triton", "fla", "lm_eval", "datasets", "nltk", "wonderwords"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING:", type(exc).__name__, exc)
print("essays", rd.ESSAYS, rd.ESSAYS.is_dir(), "stories", rd.STORIES, rd.STORIES.is_file())
missing = [n for n in ("lm_eval", "datasets", "nltk", "wonderwords") if importlib.util.find_spec(n) is None]
if missing or not rd.ESSAYS.is_dir() or not rd.STORIES.is_file():
    sys.exit(f"recall_compare.sh: missing {missing or ''} {'' if rd.ESSAYS.is_dir() else 'essays'} "
             f"{'' if rd.STORIES.is_file() else 'stories'}: carry the wheels (.whl) and REPO/shared/data (bench/README.md)")
EOF
}

essays() { "$PY" -c 'import sys; sys.path.insert(0, "bench"); import recall_data as rd; print(rd.ESSAYS)'; }

teacher() {
  if [ -e "$WORK/teacher_run" ]; then echo "recall_compare.sh: $WORK/teacher_run exists; move it away (or run: compare)"; exit 2; fi
  # fla's kernels compile while the teacher trains (it needs none of them): the compare call then finds them in
  # TRITON_CACHE_DIR instead of spending its first minutes compiling (bench/fla_warmup.py)
  warm=
  if [ "$DEVICE" != cpu ] && [ "${WARMUP:-1}" = 1 ]; then
    "$PY" bench/fla_warmup.py --preset recall12 > "$WORK/fla_warmup.log" 2>&1 &
    warm=$!
  fi
  set +e
  # TEACHER_LIMIT_S stops it inside a 10-minute device call; the pieces (written before the evaluation) still come back
  timeout "$TEACHER_LIMIT_S" "$PY" bench/recall_teacher.py train --device "$DEVICE" --minutes "$MINUTES" --out "$WORK/teacher_run" $TEACHER_ARGS 2>&1 | tee "$OUTDIR/teacher.log"
  rc=${PIPESTATUS[0]}
  if [ -n "$warm" ]; then
    wait "$warm"; echo "recall_compare.sh: fla warm-up exit $? (log below)"; tail -n 20 "$WORK/fla_warmup.log"
  fi
  set -e
  cp "$WORK"/teacher_run/recall_teacher.{json,md} "$WORK"/teacher_run/recall_ablation.png "$WORK"/teacher_run/teacher.bf16.tar.* "$OUTDIR/" 2>/dev/null || true
  return "$rc"
}

compare() {
  # a compare stopped on an earlier machine: its resume state came back as compare_state.tgz (carry it in PIECES)
  if [ ! -d "$WORK/compare" ] && [ -f "$PIECES/compare_state.tgz" ]; then
    tar xzf "$PIECES/compare_state.tgz" -C "$WORK" && echo "recall_compare.sh: resuming the compare of $PIECES/compare_state.tgz"
  fi
  if [ ! -f "$TEACHER/config.json" ]; then
    ls "$PIECES"/teacher.bf16.tar.* >/dev/null 2>&1 || { echo "recall_compare.sh: no teacher in $TEACHER and no pieces in $PIECES: run 'teacher' first or carry its files to $PIECES"; exit 2; }
    "$PY" bench/recall_teacher.py join "$PIECES" "$TEACHER"
  fi
  [ -f "$WORK/corpus.jsonl" ] || "$PY" bench/recall_teacher.py corpus --teacher "$TEACHER" --out "$WORK/corpus.jsonl" --tokens "$CORPUS_TOKENS" --seq "$SEQ"
  resume=()
  [ -d "$WORK/compare" ] && resume=(--resume)   # a compare this script started (and the time limit stopped): go on
  limit=$(( CALL_LIMIT_S - (SECONDS - START_S) - COPY_S ))
  [ "$limit" -lt "$COMPARE_LIMIT_S" ] && COMPARE_LIMIT_S=$limit
  echo "recall_compare.sh: compare limit ${COMPARE_LIMIT_S} s"
  # the finished rows reach $OUT every 20 s, so even a call killed from outside brings back what was done
  ( while sleep 20; do [ -f "$WORK/compare/checkpoints/rows.json" ] && cp "$WORK/compare/checkpoints/rows.json" "$OUTDIR/compare_rows_partial.json"; done ) &
  copier=$!
  set +e
  timeout "$COMPARE_LIMIT_S" "$PY" -m hybridize compare configs/compare_recall12.yaml --out "$WORK/compare" "${resume[@]}" \
    --set "teacher=$TEACHER" --set "data.train=$WORK/corpus.jsonl" --set "evaluators.2.essays_dir=$(essays)" "$@" 2>&1 | tee "$OUTDIR/compare.log"
  rc=${PIPESTATUS[0]}
  kill "$copier" 2>/dev/null
  set -e
  for f in compare.json compare.md compare_metrics.png compare_layers.png; do
    [ -f "$WORK/compare/$f" ] && cp "$WORK/compare/$f" "$OUTDIR/"
  done
  # everything a resume on another machine needs, without model weights (rows, ledgers, probe-run records)
  tar czf "$OUTDIR/compare_state.tgz" -C "$WORK" --exclude='*.pt' --exclude='*.safetensors' --exclude='*.bin' compare \
    && echo "recall_compare.sh: resume state $(du -h "$OUTDIR/compare_state.tgz" | cut -f1) in compare_state.tgz" || true
  if [ "$rc" -ne 0 ]; then
    rows=0
    if [ -f "$WORK/compare/checkpoints/rows.json" ]; then
      cp "$WORK/compare/checkpoints/rows.json" "$OUTDIR/compare_rows_partial.json"
      rows=$("$PY" -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$WORK/compare/checkpoints/rows.json")
    fi
    echo "recall_compare.sh: compare stopped (exit $rc; 124 = COMPARE_LIMIT_S) with $rows rows done; run 'compare' again: it resumes"
  fi
  return "$rc"
}

cmd=${1:-}
shift || true
case "$cmd" in
  check) setup ;;
  teacher) setup; teacher ;;
  compare) setup; compare "$@" ;;
  *) echo "usage: bench/recall_compare.sh check|teacher|compare [--set key=value ...]"; exit 2 ;;
esac
