#!/usr/bin/env bash
# The GPU check kit (bench/README.md, "GPU check kit"), the one command: on a machine with an
# NVIDIA GPU and no internet, install the `gpu` extra into a venv of its own from the wheels it is
# handed (never from an index), then run bench/gpu_check.py: the service on --device cuda against
# the CPU service on a fixed request set (top-10 overlap, Kendall tau, max score difference), and
# the GPU bench (max_batch_tokens sweep, 1/4/16 clients, 1,000-passage requests). Results:
# OUT/gpu-check.md (tables and every figure as JSON), OUT/gpu-check-scores.json, OUT/server-*.log.
#
#   deploy/gpu-check.sh --wheels DIR --passages FILE --queries FILE [--out DIR] [options] [-- ARGS]
#
#   --wheels DIR        install from these wheels into --venv (pip --no-index --find-links DIR);
#                       without it, --venv must hold an earlier run's install
#   --base-python PY    a Python whose packages the venv sees after its own (the CUDA libraries,
#                       numpy, tokenizers, ... of a GPU image): --wheels then needs only what PY
#                       lacks; the venv is made from PY unless --python says otherwise
#   --python PY         the interpreter of the venv (default: python3, or --base-python)
#   --venv DIR          default: ${TMPDIR:-/tmp}/crossrank-gpu-venv
#   --device cuda|cpu   default cuda; cpu runs the same kit without a GPU
#   --model DIR         default: models/crossrank-minilm-l6
#   --passages FILE, --queries FILE   the workload's text (as bench.run's)
#   --out DIR           default: runs/gpu-check
#   --budget-s N        the whole run, install included (default 480); no kit section starts in
#                       its last 90 s, and the kit is stopped at the limit (finished sections stay)
#   -- ARGS             passed on to bench/gpu_check.py (sizes; see its --help)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() {
  echo "gpu-check: $*" >&2
  exit 2
}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
wheels="" python="" base_python="" venv="${TMPDIR:-/tmp}/crossrank-gpu-venv" device=cuda
model="$root/models/crossrank-minilm-l6" passages="" queries="" out="$root/runs/gpu-check"
budget=480
kit_args=()
while (($#)); do
  case "$1" in
    --wheels | --python | --base-python | --venv | --device | --model | --passages | --queries | \
      --out | --budget-s)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --wheels) wheels=$2 ;;
        --python) python=$2 ;;
        --base-python) base_python=$2 ;;
        --venv) venv=$2 ;;
        --device) device=$2 ;;
        --model) model=$2 ;;
        --passages) passages=$2 ;;
        --queries) queries=$2 ;;
        --out) out=$2 ;;
        --budget-s) budget=$2 ;;
      esac
      shift 2
      ;;
    --)
      shift
      kit_args=("$@")
      break
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ -n $passages && -n $queries ]] || die "--passages and --queries are required (see --help)"
[[ $device == cuda || $device == cpu ]] || die "--device is cuda or cpu, not $device"
[[ -z $wheels || -d $wheels ]] || die "--wheels $wheels is not a directory"
for file in "$passages" "$queries"; do
  [[ -f $file ]] || die "no such file: $file"
done
[[ -d $model ]] || die "no model directory at $model"
python=${python:-${base_python:-python3}}
# The kit runs from the repo root: every path the caller gave is made absolute first.
passages=$(realpath "$passages") queries=$(realpath "$queries") model=$(realpath "$model")
out=$(realpath -m "$out") venv=$(realpath -m "$venv")
[[ -z $wheels ]] && wheels_given=false || wheels_given=true
[[ $wheels_given == false ]] || wheels=$(realpath "$wheels")
cd "$root"

if [[ $device == cuda ]]; then
  gpus=$(nvidia-smi -L 2>/dev/null) || die "no NVIDIA GPU here: nvidia-smi is missing or failed"
  echo "$gpus"
fi

started=$SECONDS
if [[ $wheels_given == true ]]; then
  if [[ ! -x $venv/bin/python ]]; then
    echo "gpu-check: making the venv $venv from $python"
    # A Python without ensurepip (Debian's without python3-venv) still makes one without pip;
    # its own pip then installs into it (pip --python, pip >= 22.3).
    "$python" -m venv "$venv" 2>/dev/null || {
      rm -rf "$venv"
      "$python" -m venv --without-pip "$venv" || die "$python could not make a venv at $venv"
    }
  fi
  if [[ -n $base_python ]]; then
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    # Appended after the venv's own site-packages, as --system-site-packages would, with their
    # .pth files: the venv's onnxruntime-gpu shadows a CPU onnxruntime that PY may have.
    "$base_python" -c 'import site
for path in site.getsitepackages():
    print(f"import site; site.addsitedir({path!r})")' >"$site/crossrank-base-python.pth" ||
      die "could not read the site-packages of $base_python"
  fi
  # Only the handed wheels: no pip configuration (an index, find-links, constraints) applies.
  pip=(env PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip --isolated)
  "${pip[@]}" --version >/dev/null 2>&1 ||
    pip=(env PIP_CONFIG_FILE=/dev/null "$python" -m pip --isolated --python "$venv/bin/python")
  mapfile -t requirements < <("$python" -m bench.gpu_requirements)
  ((${#requirements[@]})) || die "$python could not read pyproject.toml (Python >= 3.11 needed)"
  echo "gpu-check: installing from $wheels: ${requirements[*]}"
  install=(install --no-index --find-links "$wheels" --only-binary=:all: --progress-bar off)
  if ! "${pip[@]}" "${install[@]}" "${requirements[@]}"; then
    # pip names the first requirement it cannot meet; each of the kit's own is tried alone, so
    # that one message lists them all (a missing dependency of theirs pip names above).
    missing=()
    for requirement in "${requirements[@]}"; do
      "${pip[@]}" "${install[@]}" --dry-run --no-deps "$requirement" >/dev/null 2>&1 ||
        missing+=("$requirement")
    done
    die "pip could not install the kit from $wheels; not there (nor in --base-python):" \
      "${missing[*]:-none of the kit requirements themselves, so a dependency named above}." \
      "bench/README.md ('GPU check kit') says which wheels to hand over"
  fi
elif [[ ! -x $venv/bin/python ]]; then
  die "no venv at $venv and no --wheels to make one from"
fi
install_s=$((SECONDS - started))

export PYTHONPATH="$root/service:$root${PYTHONPATH:+:$PYTHONPATH}"
# The CUDA and cuDNN libraries of pip's nvidia-* wheels (the `cuda,cudnn` extras of
# onnxruntime-gpu, or a GPU image's torch) are found by onnxruntime only on the library path.
nvidia_libs=$("$venv/bin/python" -c 'import glob, os, sys
print(":".join(d for p in sys.path for d in sorted(glob.glob(os.path.join(p, "nvidia", "*", "lib")))))')
export LD_LIBRARY_PATH="$nvidia_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$venv/bin/python" - "$device" <<'EOF' || die "the venv's onnxruntime cannot run on $device"
import sys

import onnxruntime as ort

providers = ort.get_available_providers()
print(f"gpu-check: onnxruntime {ort.__version__} from {ort.__file__}: {', '.join(providers)}")
if sys.argv[1] == "cuda" and "CUDAExecutionProvider" not in providers:
    sys.exit("no CUDAExecutionProvider: this is the CPU onnxruntime, or it shadows onnxruntime-gpu")
EOF

left=$((budget - install_s))
((left > 150)) || die "only $left s of the $budget s budget left after the install"
mkdir -p "$out"
status=0
timeout --kill-after=15 "$left" "$venv/bin/python" -m bench.gpu_check --device "$device" \
  --model "$model" --passages "$passages" --queries "$queries" --out "$out" \
  --budget-s $((left - 90)) --install-s "$install_s" "${kit_args[@]}" || status=$?
if [[ -f $out/gpu-check.md ]]; then
  sed '/^## Every figure/,$d' "$out/gpu-check.md"
fi
case $status in
  0) echo "gpu-check: every section ran and every comparison met its gate ($out)" ;;
  3) echo "gpu-check: a ranking comparison missed its gate ($out/gpu-check.md)" >&2 ;;
  4) echo "gpu-check: a section failed or was skipped ($out/gpu-check.md)" >&2 ;;
  124 | 137) echo "gpu-check: stopped at the $budget s limit; finished sections are in $out" >&2 ;;
  *) echo "gpu-check: the kit stopped with exit status $status: its output is above" >&2 ;;
esac
exit "$status"
