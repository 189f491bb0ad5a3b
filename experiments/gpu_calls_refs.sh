#!/usr/bin/env bash
# The three 2-GPU device calls of issues 10/11: retain95/retain90 references with the target's
# recipe (train_default stages 1-2, docs/packaged_models.md), the full TOFU protocol on
# forget01/05/10 with the matching references, and `timerome compare --full-protocol` on forget01.
#
#   bash experiments/gpu_calls_refs.sh call1|call2|call3       # on the GPU machine, from the repo root
#   TINY=1 OUT=/tmp/x bash experiments/gpu_calls_refs.sh call1  # CPU smoke run (tiny sizes)
#
# call1  GPU0: refs stage 1 -> $W/refs_s1          GPU1: compare forget01 + full protocol forget01
# call2  GPU0: refs stage 2 (--init $W/refs_s1), packaged (float32) into $W/refs
#        GPU1: compare forget01 continued (resumes $W/cmp01)
# call3  GPU0: full protocol forget05 (+ compare continued)   GPU1: full protocol forget10
#
# State between calls lives in /tmp on the machine (it stays only while the machine is warm). If it
# is gone, a folder named by CARRY (default .carry, carried) may hold what came back from $OUT:
# cmp01.tgz / fp01.tgz (unpacked into /tmp) and retain95_s1.npz / retain90_s1.npz (stage-1 weights).
# Every job writes <job>.log into $OUT; at most 8 files per call, folders as .tgz.
set -u
call=${1:?usage: gpu_calls_refs.sh call1|call2|call3}
: "${OUT:?OUT must name the output folder}"
mkdir -p "$OUT"
CARRY=${CARRY:-.carry}
W=${WORK:-/tmp}  # state between calls (default /tmp on the machine)
mkdir -p "$W"

if ls .whl/*.whl >/dev/null 2>&1; then  # rouge_score + nltk + defusedxml (absent from the GPU image)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $W/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=$PWD:$W/site
else
  export PYTHONPATH=$PWD
fi
python3 -c "from rouge_score import rouge_scorer; rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)" \
  || { echo "rouge_score does not import: carry .whl"; exit 1; }
# two jobs may share one GPU (the model is tiny): no preallocation; compiled programs are reused
# across processes and calls through the persistent cache
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_COMPILATION_CACHE_DIR=$W/jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1

if [ -n "${TINY:-}" ]; then  # CPU smoke sizes; budgets shrink with SCALE
  TR="--tiny --steps 20 --chunk 10 --batch 8 --n-mc 2"
  FP="--limit 3 --n-mc 2 --seeds 0 1 --gen-length 16"
  CMP="--limit 2 --n-mc 1 --seeds 0 --no-mu --methods no_edit ga"
else
  TR=""
  FP=""
  CMP="--full-protocol --batch-size 64"
fi
S=${SCALE:-1}  # budgets in seconds are multiplied by S (smoke runs on a shared CPU need more)
b() { python3 -c "print(int($1 * $S))"; }

for f in cmp01 fp01; do  # unpack carried results when the machine lost /tmp
  [ ! -d $W/$f ] && [ -f "$CARRY/$f.tgz" ] && tar xzf "$CARRY/$f.tgz" -C $W
done
if [ ! -d $W/refs_s1 ] && [ -f "$CARRY/retain95_s1.npz" ]; then
  mkdir -p $W/refs_s1 && cp "$CARRY/retain95_s1.npz" $W/refs_s1/retain95.npz \
    && cp "$CARRY/retain90_s1.npz" $W/refs_s1/retain90.npz
fi

compare01() {  # resumable: methods done in $W/cmp01/compare.json are kept
  timeout -s INT "$(b 540)" python3 -m timerome_jax.cli compare --split forget01 $CMP --budget-s "$(b $1)" \
    --out $W/cmp01 --no-progress >>"$OUT/cmp01.log" 2>&1
  echo "compare rc $?" >>"$OUT/cmp01.log"
  tar czf "$OUT/cmp01.tgz" -C $W cmp01
}

protocol() {  # split, GPU budget, extra args
  local s=$1 sec=$2; shift 2
  timeout -s INT "$(b 560)" python3 experiments/full_protocol.py --out $W/fp${s#forget} --splits "$s" $FP \
    --budget-s "$(b "$sec")" --no-progress "$@" >"$OUT/fp${s#forget}.log" 2>&1
  echo "full_protocol rc $?" >>"$OUT/fp${s#forget}.log"
  tar czf "$OUT/fp${s#forget}.tgz" -C $W "fp${s#forget}"
}

case $call in
call1)
  ( CUDA_VISIBLE_DEVICES=0 timeout -s INT "$(b 560)" python3 experiments/train_suite.py --out $W/refs_s1 \
      --groups refs --recipe default-s1 --budget-s "$(b 430)" $TR >"$OUT/refs_s1.log" 2>&1
    echo "train rc $?" >>"$OUT/refs_s1.log"
    cp $W/refs_s1/retain95.npz "$OUT/retain95_s1.npz"; cp $W/refs_s1/retain90.npz "$OUT/retain90_s1.npz"
    cp $W/refs_s1/report.json "$OUT/refs_s1_report.json" ) &
  ( export CUDA_VISIBLE_DEVICES=1; compare01 480 ) &
  ( export CUDA_VISIBLE_DEVICES=1; protocol forget01 480 ) &
  wait ;;
call2)
  [ -f $W/refs_s1/retain95.npz ] || { echo "no $W/refs_s1: run call1 (or carry its npz as $CARRY/*_s1.npz)"; exit 1; }
  ( CUDA_VISIBLE_DEVICES=0 timeout -s INT "$(b 530)" python3 experiments/train_suite.py --out $W/refs_s2 \
      --groups refs --recipe default-s2 --init $W/refs_s1 --budget-s "$(b 450)" $TR >"$OUT/refs_s2.log" 2>&1
    echo "train rc $?" >>"$OUT/refs_s2.log"
    CUDA_VISIBLE_DEVICES=0 python3 experiments/package_suite.py $W/refs_s2 --out $W/refs --dtype float32 \
      --max-mb 1000 >>"$OUT/refs_s2.log" 2>&1
    echo "package rc $?" >>"$OUT/refs_s2.log"
    cp $W/refs_s2/retain95.npz "$OUT/retain95_s2.npz"; cp $W/refs_s2/retain90.npz "$OUT/retain90_s2.npz"
    cp $W/refs_s2/report.json "$OUT/refs_s2_report.json" ) &
  ( export CUDA_VISIBLE_DEVICES=1; compare01 500 ) &
  wait ;;
call3)
  [ -f $W/refs/tofu_retain95/config.json ] || { echo "no $W/refs: run call2 first"; exit 1; }
  ( export CUDA_VISIBLE_DEVICES=0; protocol forget05 500 --reference forget05=$W/refs/tofu_retain95 ) &
  ( export CUDA_VISIBLE_DEVICES=0; compare01 480 ) &
  ( export CUDA_VISIBLE_DEVICES=1; protocol forget10 500 --reference forget10=$W/refs/tofu_retain90 ) &
  wait ;;
*) echo "unknown call $call (call1|call2|call3)"; exit 2 ;;
esac
ls -la "$OUT"
