#!/usr/bin/env bash
# Serves a local Hugging Face cross-encoder checkpoint with Infinity (torch, CPU, fp32), offline,
# in the foreground: `exec`s the server so that a harness can Popen it and SIGTERM it.
# Usage: bench/peers/infinity_serve.sh MODEL_DIR PORT [extra infinity_emb v2 flags...]
# INFINITY_PEER_ENGINE=optimum serves an ONNX file at MODEL_DIR's top level instead (see below).
# Ready when GET http://HOST:PORT/health answers 200 (the port opens only after the model is loaded).
# Rerank: POST /rerank {"query": str, "documents": [str], "raw_scores": bool, "top_n": int?}
# Env knobs: INFINITY_PEER_DEVICE (cpu), INFINITY_PEER_DTYPE (float32), INFINITY_PEER_HOST (127.0.0.1), OMP_NUM_THREADS (2), INFINITY_PEER_BATCH_SIZE (32),
#            INFINITY_PEER_WARMUP (0; 1 runs Infinity's startup warm-up, ~25 s on 2 cores and
#            a ~16k-token batch that inflates peak RSS).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 MODEL_DIR PORT [extra infinity_emb v2 flags...]" >&2
    exit 2
fi
MODEL_DIR="$(cd "$1" && pwd)"
PORT="$2"
shift 2

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${INFINITY_VENV:-$(cd "$HERE/.." && pwd)/.venv-infinity}"
if [[ ! -x "$VENV/bin/infinity_emb" ]]; then
    echo "no Infinity venv at $VENV: run bench/peers/infinity_setup.sh first" >&2
    exit 1
fi

# Fully offline: nothing is downloaded, no telemetry is sent.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export DO_NOT_TRACK=1 INFINITY_ANONYMOUS_USAGE_STATS=0 HF_HUB_DISABLE_TELEMETRY=1
# Infinity would otherwise create ./.infinity_cache in the working directory if it ever needed it.
export INFINITY_HOME="${INFINITY_HOME:-$VENV/infinity-home}"
# torch intra-op threads (torch's default is the number of cores; Infinity never overrides it).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"

if [[ "${INFINITY_PEER_WARMUP:-0}" == 1 ]]; then WARMUP=--model-warmup; else WARMUP=--no-model-warmup; fi

MODEL_ID="$MODEL_DIR"
if [[ "${INFINITY_PEER_ENGINE:-torch}" == optimum ]]; then
    # The optimum engine serves an ONNX file of the directory (one with "quantize" in its name
    # first, on CPU). Infinity 0.0.78 finds it by globbing the directory and hands optimum 2.x
    # that path, which optimum matches against bare file names only: given an absolute or
    # relative directory it fails ("Could not find any ONNX files with target file name
    # /dir/model.onnx"). From inside the directory, as ".", the glob yields bare names.
    cd "$MODEL_DIR"
    MODEL_ID=.
fi

exec "$VENV/bin/infinity_emb" v2 \
    --model-id "$MODEL_ID" \
    --served-model-name "$(basename "$MODEL_DIR")" \
    --engine "${INFINITY_PEER_ENGINE:-torch}" \
    --device "${INFINITY_PEER_DEVICE:-cpu}" \
    --dtype "${INFINITY_PEER_DTYPE:-float32}" \
    --batch-size "${INFINITY_PEER_BATCH_SIZE:-32}" \
    --no-bettertransformer \
    --no-compile \
    --no-vector-disk-cache \
    "$WARMUP" \
    --host "${INFINITY_PEER_HOST:-127.0.0.1}" \
    --port "$PORT" \
    --log-level warning \
    "$@"
