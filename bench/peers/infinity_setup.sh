#!/usr/bin/env bash
# Creates bench/.venv-infinity: Infinity (infinity-emb) as a benchmark peer, torch on CPU.
# Idempotent: does nothing when the venv is complete with exactly these pins.
# Usage: bench/peers/infinity_setup.sh        (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${INFINITY_VENV:-$(cd "$HERE/.." && pwd)/.venv-infinity}"
PYTHON="${PYTHON:-python3}"
MARKER="$VENV/.infinity-setup-complete"

# infinity-emb[server,torch] 0.0.78 and its whole dependency closure, pinned exactly as verified
# together (python 3.11, 2-core CPU box). torch 2.13.0 resolves to the local +cpu wheel here.
# infinity-emb caps sentence-transformers <4 (hence transformers 4.x) and numpy <2.
# optimum[onnxruntime] (2.1.0, what infinity-emb's `optimum` extra resolves to beside transformers
# 4.57) for its optimum engine: optimum 1.x wants transformers < 4.43. BetterTransformer is gone
# from optimum >= 2 and is not used.
PINS=$(cat <<'PINS_EOF'
infinity-emb[server,torch]==0.0.78
torch==2.13.0
sentence-transformers==3.4.1
transformers==4.57.6
tokenizers==0.22.2
huggingface-hub==0.36.2
safetensors==0.8.0
numpy==1.26.4
scipy==1.17.1
scikit-learn==1.9.1
joblib==1.6.0
threadpoolctl==3.8.0
pillow==13.0.0
fastapi==0.165.0
starlette==1.10.0
pydantic==2.14.3
pydantic-core==2.50.4
annotated-doc==0.0.7
annotated-types==0.8.0
typing-inspection==0.4.5
typing-extensions==4.16.0
uvicorn[standard]==0.32.1
uvloop==0.23.0
httptools==0.9.0
watchfiles==1.3.0
websockets==17.4
python-dotenv==1.2.4
pyyaml==6.0.3
h11==0.16.0
anyio==4.16.0
idna==3.20
click==8.1.8
typer==0.12.5
shellingham==1.5.4
rich==13.9.4
markdown-it-py==4.3.0
mdurl==0.1.2
pygments==2.21.0
orjson==3.13.0
prometheus-fastapi-instrumentator==8.1.0
prometheus-client==0.26.0
posthog==7.91.1
backoff==2.2.1
distro==1.9.0
requests==2.34.2
urllib3==2.8.0
certifi==2026.10.18
charset-normalizer==3.5.2
opentelemetry-api==1.45.2
narwhals==2.29.0
filelock==4.2.11
fsspec==2026.9.0
hf-xet==1.8.0
packaging==26.3
regex==2026.11.15
tqdm==4.70.1
jinja2==3.1.6
markupsafe==3.0.4
networkx==3.6.1
sympy==1.14.0
mpmath==1.3.0
cloudpickle==3.1.2
optimum[onnxruntime]==2.1.0
optimum-onnx==0.1.0
onnxruntime==1.32.0
onnx==1.23.2
ml-dtypes==0.5.4
protobuf==7.36.2
flatbuffers==25.12.19
PINS_EOF
)
STAMP=$(printf '%s\n' "$PINS" | sha256sum | cut -c1-16)

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$STAMP" && -x "$VENV/bin/infinity_emb" ]]; then
    echo "infinity venv already complete: $VENV"
    exit 0
fi

echo "creating infinity venv: $VENV"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
REQ="$VENV/requirements-infinity.txt"
printf '%s\n' "$PINS" > "$REQ"
"$VENV/bin/python" -m pip install --disable-pip-version-check --quiet -r "$REQ"
"$VENV/bin/python" -m pip check
# Smoke test: the reranker code path imports (torch CPU + sentence-transformers CrossEncoder).
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 "$VENV/bin/python" -c '
import torch, infinity_emb
from infinity_emb.transformer.crossencoder.torch import CrossEncoderPatched
print("infinity_emb", infinity_emb.__version__, "torch", torch.__version__)
'
printf '%s\n' "$STAMP" > "$MARKER"
echo "infinity venv ready: $VENV"
