#!/usr/bin/env bash
# Reproduces crossrank's bundled default model (models/crossrank-minilm-l6) step by step.
# Usage: training/recipes/default_model.sh DATA_DIR WORK_DIR [STEP...]
#   DATA_DIR: the shared relevance data (../shared/data from the project root)
#   WORK_DIR: where mined groups, checkpoints and reports go (not the repo: it is large)
#   STEP: any of blend init mine mix train nq soup distill export eval classic (default: blend init
#   export eval, in that order: the shipped model is the step-0 network, see CHECKPOINT; classic
#   adds zero-shot figures on Vaswani, Cranfield and CISI)
# CHECKPOINT picks what export ships: by default the step-0 network of the init step. Fine-tuning
# it (mine mix train, then CHECKPOINT=$WORK/train/checkpoints/step-0000NN/model) has not beaten
# step 0 on the NFCorpus dev set in five runs, one with the encoder frozen, and the NQ-only run of
# step nq, which gained on its own dev set, did not gain on TREC DL 2021, nor did its weight-space
# ensembles with step 0 (step soup); LCE held near step 0 by distilling its scores (step distill,
# with and without dropout) did not gain on NFCorpus dev (docs/model.md);
# RESUME="--resume latest" continues a cut-off train or distill step.
set -euo pipefail
DATA=${1:?DATA_DIR}; WORK=${2:?WORK_DIR}; shift 2
STEPS=${*:-blend init export eval}
CR=${CROSSRANK:-crossrank}
PY=${PYTHON:-python}
CHECKPOINT=${CHECKPOINT:-$WORK/init}
mkdir -p "$WORK/groups"
# The dev set that picks checkpoints: a training source's own dev split, never an eval set.
NF_DEV="--dev-queries $DATA/nfcorpus/dev.titles.preprocessed.queries.tsv
  --dev-qrels $DATA/nfcorpus/qrels/dev.tsv --dev-corpus $DATA/nfcorpus/corpus_preprocessed.jsonl.gz
  --dev-max-queries 100 --dev-depth 30"

# The reference corpus the IDF table of the lexical term is counted over: the training sources'
# passages (Wikipedia, PubMed, NIH). SciFact's corpus is also its test split's (as BM25's own
# statistics are); no TREC DL, SQuAD dev or NQ dev text is in it.
IDF="--idf-corpus $DATA/squad-v1.1/corpus_train.jsonl.gz $DATA/nfcorpus/corpus_preprocessed.jsonl.gz
  $DATA/scifact/corpus.jsonl.gz --idf-pairs $DATA/nq-qed/train.jsonl.gz $DATA/medquad/medquad.jsonl.gz"

for step in $STEPS; do case $step in
blend)  # the weights of the score's terms, chosen on dev sets (training sources, never eval sets):
  # one forward pass over each set's BM25 top 30 scores every term (kept in --parts files), then
  # a grid of blends and of BM25's k1 and b for the lexical term
  # shellcheck disable=SC2086  # IDF is a list of flags
  $PY -m crossrank_train.gated_bert --out "$WORK/init-terms" --cosine-scale 1 --maxsim-scale 1 \
    --lexical-scale 1 $IDF
  BLEND="$PY -m crossrank_train.blend --model $WORK/init-terms --depth 30
    --k1 0.6 0.9 1.2 1.6 2.0 --b 0.3 0.5 0.75 0.9"
  $BLEND --queries "$DATA/nfcorpus/dev.titles.preprocessed.queries.tsv" \
    --qrels "$DATA/nfcorpus/qrels/dev.tsv" --corpus "$DATA/nfcorpus/corpus_preprocessed.jsonl.gz" \
    --parts "$WORK/parts-nfcorpus-dev.npz" --out "$WORK/blend-nfcorpus-dev.json"
  $BLEND --pairs "$DATA/nq-qed/train.jsonl.gz" --max-queries 200 \
    --parts "$WORK/parts-nq-train.npz" --out "$WORK/blend-nq-train.json"
  $BLEND --wikiqa "$DATA/wikiqa/dev.tsv" --parts "$WORK/parts-wikiqa-dev.npz" \
    --out "$WORK/blend-wikiqa-dev.json"
  $BLEND --queries "$DATA/scifact/queries.jsonl" --qrels "$DATA/scifact/qrels/train.tsv" \
    --corpus "$DATA/scifact/corpus.jsonl.gz" --max-queries 200 \
    --parts "$WORK/parts-scifact-train.npz" --out "$WORK/blend-scifact-train.json"
  # the pick: the best mean nDCG@10 over the four
  $PY -m crossrank_train.blend --combine "$WORK/blend-nfcorpus-dev.json" \
    "$WORK/blend-nq-train.json" "$WORK/blend-wikiqa-dev.json" "$WORK/blend-scifact-train.json" ;;
init)  # the segment-gated cross-encoder: at step 0 the all-MiniLM-L6-v2 bi-encoder's cosine,
  # MaxSim over its token states and exact term matching, weighted as the blend step chose
  # (written here by hand from its --combine table: change both together)
  # shellcheck disable=SC2086  # IDF is a list of flags
  $PY -m crossrank_train.gated_bert --out "$WORK/init" --cosine-scale 10 --maxsim-scale 10 \
    --maxsim-idf --lexical-scale 2 $IDF ;;
mine)  # 7 negatives per positive: hits of the all-MiniLM-L6-v2 bi-encoder at ranks 3-30 where a
  # corpus is small enough to embed here (the mistakes the cross-attention must fix), BM25 ranks
  # 10-100 elsewhere; 1 random passage each
  # (DENSE= mines BM25 negatives everywhere, as runs 4 and 9 did)
  DENSE=${DENSE-"--retriever bi-encoder --window 3 30"}
  $CR mine --pairs "$DATA/nq-qed/train.jsonl.gz" $DENSE --negatives 7 --out "$WORK/groups/nq.jsonl"
  $CR mine --queries "$DATA/scifact/queries.jsonl" --qrels "$DATA/scifact/qrels/train.tsv" \
    --corpus "$DATA/scifact/corpus.jsonl.gz" $DENSE --negatives 7 --out "$WORK/groups/scifact.jsonl"
  $CR mine --queries "$DATA/nfcorpus/train.titles.preprocessed.queries.tsv" \
    --qrels "$DATA/nfcorpus/qrels/train.tsv" --corpus "$DATA/nfcorpus/corpus_preprocessed.jsonl.gz" \
    --min-grade 2 $DENSE --negatives 7 --out "$WORK/groups/nfcorpus.jsonl"
  $CR mine --wikiqa "$DATA/wikiqa/train.tsv" $DENSE --negatives 7 --out "$WORK/groups/wikiqa.jsonl"
  $CR mine --pairs "$DATA/squad-v1.1/train.jsonl.gz" --corpus "$DATA/squad-v1.1/corpus_train.jsonl.gz" \
    --max-queries 6000 --negatives 7 --out "$WORK/groups/squad.jsonl"
  $CR mine --pairs "$DATA/medquad/medquad.jsonl.gz" --max-queries 3000 --negatives 7 \
    --out "$WORK/groups/medquad.jsonl" ;;
mix)   # de-duplicated, at most 2 groups per query, capped per source, shuffled
  $PY -m crossrank_train.mix --out "$WORK/groups/mix.jsonl" --max-per-query 2 \
    "$WORK/groups/nq.jsonl:6000" "$WORK/groups/squad.jsonl:2000" "$WORK/groups/medquad.jsonl:1000" \
    "$WORK/groups/scifact.jsonl:900" "$WORK/groups/nfcorpus.jsonl:1500" "$WORK/groups/wikiqa.jsonl:800" ;;
train)
  # shellcheck disable=SC2086  # NF_DEV and RESUME are lists of flags
  $CR train --model "$WORK/init" --groups "$WORK/groups/mix.jsonl" --out "$WORK/train" \
    --loss lce --negatives 7 --batch-groups 4 --accumulation 2 --steps 500 --lr 2e-5 --head-lr 2e-3 \
    --gate-lr 1e-2 --max-length 192 --bf16 --save-every 50 --eval-every 50 $NF_DEV ${RESUME:-} ;;
nq)  # the seventh fine-tuning run (docs/model.md): LCE on NQ/QED train alone
  # (BM25 negatives, ranks 10-100), its first 200 queries held out as the dev set (train leaves
  # their groups out); NFCorpus dev checks that a checkpoint costs nothing elsewhere
  NQ_DEV="$DATA/nq-qed/train.jsonl.gz"
  $CR mine --pairs "$NQ_DEV" --negatives 7 --out "$WORK/groups/nq-bm25.jsonl"
  $CR eval --pairs "$NQ_DEV" --max-queries 200 --depth 30 --model "$WORK/init" --max-length 192 \
    --out "$WORK/nq-dev-step0.json"
  $CR train --model "$WORK/init" --groups "$WORK/groups/nq-bm25.jsonl" --out "$WORK/train-nq" \
    --loss lce --negatives 7 --batch-groups 4 --accumulation 2 --steps 150 --lr 2e-5 --head-lr 2e-3 \
    --gate-lr 1e-2 --max-length 192 --bf16 --save-every 50 --eval-every 50 \
    --dev-pairs "$NQ_DEV" --dev-max-queries 200 --dev-depth 30
  for ckpt in 000050 000100; do
    $CR eval --queries "$DATA/nfcorpus/dev.titles.preprocessed.queries.tsv" \
      --qrels "$DATA/nfcorpus/qrels/dev.tsv" --corpus "$DATA/nfcorpus/corpus_preprocessed.jsonl.gz" \
      --max-queries 100 --depth 30 --model "$WORK/train-nq/checkpoints/step-$ckpt/model" \
      --max-length 192 --out "$WORK/nf-dev-nq-$ckpt.json"
  done ;;
soup)  # the eighth (docs/model.md): WiSE-FT between step 0 and step nq's step
  # 100, no training; alphas judged on the same two dev sets
  for alpha in 0.25 0.5 0.75; do
    $CR interpolate --start "$WORK/init" --tuned "$WORK/train-nq/checkpoints/step-000100/model" \
      --alpha $alpha --out "$WORK/soup/a$alpha"
  done
  SOUPS="--model $WORK/soup/a0.25 --model $WORK/soup/a0.5 --model $WORK/soup/a0.75"
  # shellcheck disable=SC2086  # SOUPS is a list of flags
  $CR eval --queries "$DATA/nfcorpus/dev.titles.preprocessed.queries.tsv" \
    --qrels "$DATA/nfcorpus/qrels/dev.tsv" --corpus "$DATA/nfcorpus/corpus_preprocessed.jsonl.gz" \
    --max-queries 100 --depth 30 --model "$WORK/init" $SOUPS --max-length 192 \
    --out "$WORK/soup/nf-dev.json"
  # shellcheck disable=SC2086
  $CR eval --pairs "$DATA/nq-qed/train.jsonl.gz" --max-queries 200 --depth 30 $SOUPS \
    --max-length 192 --out "$WORK/soup/nq-dev.json" ;;
distill)  # the ninth (docs/model.md): LCE beside MarginMSE on the step-0
  # network's own scores (it stays the teacher while the labels move the student), on the first
  # 2,000 groups of the mix (run with DENSE= mine mix, as run 4 was)
  head -n 2000 "$WORK/groups/mix.jsonl" > "$WORK/groups/mix-2000.jsonl"
  $CR teach --groups "$WORK/groups/mix-2000.jsonl" --teacher "$WORK/init" \
    --max-query-tokens 64 --max-length 192 --out "$WORK/groups/taught.jsonl"
  # (DROPOUT=0: the tenth, the same without dropout)
  OUT="$WORK/train-distill${DROPOUT:+-dropout$DROPOUT}"
  # shellcheck disable=SC2086  # NF_DEV and RESUME are lists of flags
  $CR train --model "$WORK/init" --groups "$WORK/groups/taught.jsonl" --out "$OUT" \
    --loss lce --distill-weight 1 ${DROPOUT:+--dropout $DROPOUT} --negatives 7 --batch-groups 4 \
    --accumulation 2 --steps 200 --lr 2e-5 --head-lr 2e-3 --gate-lr 1e-2 --max-length 192 --bf16 \
    --save-every 50 --eval-every 50 $NF_DEV ${RESUME:-} ;;
export)
  $CR export --model "$CHECKPOINT" --out models/crossrank-minilm-l6 --name crossrank-minilm-l6 \
    --variants fp32 int8 fp16 --ship int8 fp16 --max-length 256 \
    --eval-queries "$DATA/trec-dl-2021/queries.tsv" --eval-qrels "$DATA/trec-dl-2021/qrels.txt" \
    --eval-corpus "$DATA/trec-dl-2021/passages.jsonl.gz" --eval-run "$DATA/trec-dl-2021/runs/BM25.top100.run" ;;
eval)
  $CR eval --queries "$DATA/trec-dl-2021/queries.tsv" --qrels "$DATA/trec-dl-2021/qrels.txt" \
    --corpus "$DATA/trec-dl-2021/passages.jsonl.gz" --run "$DATA/trec-dl-2021/runs/BM25.top100.run" \
    --model models/crossrank-minilm-l6 --bi-encoder --out "$WORK/eval-trec-dl-2021.json"
  $CR eval --queries "$DATA/scifact/queries.jsonl" --qrels "$DATA/scifact/qrels/test.tsv" \
    --corpus "$DATA/scifact/corpus.jsonl.gz" --depth 50 \
    --model models/crossrank-minilm-l6 --bi-encoder --out "$WORK/eval-scifact-test.json" ;;
classic)  # zero-shot on the classic collections (no part of them is in training or tuning):
  # BM25 top 100 re-ranked; Cranfield's grades run 1 (a complete answer) to 4, -1 for none
  $CR eval --queries "$DATA/vaswani/query-text.trec" --qrels "$DATA/vaswani/qrels" \
    --corpus "$DATA/vaswani/doc-text.trec.gz" \
    --model models/crossrank-minilm-l6 --bi-encoder --out "$WORK/eval-vaswani.json"
  $CR eval --queries "$DATA/cranfield/cran.qry" --qrels "$DATA/cranfield/cranqrel" \
    --grade-map 1=4,2=3,3=2,4=1,-1=0 --corpus "$DATA/cranfield/cran.all.1400.gz" \
    --model models/crossrank-minilm-l6 --bi-encoder --out "$WORK/eval-cranfield.json"
  $CR eval --queries "$DATA/cisi/CISI.QRY" --qrels "$DATA/cisi/CISI.REL" \
    --corpus "$DATA/cisi/CISI.ALL.gz" \
    --model models/crossrank-minilm-l6 --bi-encoder --out "$WORK/eval-cisi.json" ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac; done
