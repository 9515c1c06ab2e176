"""sentence-transformers' own fast exports of a plain checkpoint, made as its documentation tells a
user to (``CrossEncoder(..., backend=...)``, then its ``export_*`` functions), into a copy of the
checkpoint that ``bench.side_by_side --st-exports`` serves them from. Runs in the peers' venv:

    bench/.venv-st-peers/bin/python -m bench.peers.st_export runs/bench/minilm-l6-ce \\
        runs/bench/minilm-l6-ce-st

Writes ``onnx/model.onnx`` (optimum's export), ``onnx/model_O3.onnx``
(``export_optimized_onnx_model``, level O3: the fusions and GELU approximation meant for CPUs),
``onnx/model_qint8_<arch>.onnx`` (``export_dynamic_quantized_onnx_model``, the configuration of
this CPU's instruction set: avx512_vnni, avx512 or avx2) and ``openvino/openvino_model.xml``
(``backend="openvino"``); with ``--calibration DIR`` also
``openvino/openvino_model_qint8_quantized.xml``, the static (calibrated) OpenVINO int8 export
(``export_static_quantized_openvino_model``, which needs the ``datasets`` package). It calibrates
on a dataset by name, by default GLUE SST-2 from the Hugging Face hub, which this machine cannot
reach; ``DIR`` is a local folder that ``datasets.load_dataset`` reads instead, holding a
``train.jsonl`` with a ``text`` field (bench/README.md: 300 TREC DL passages). sentence-transformers
calibrates a cross-encoder on single texts padded to 384 tokens, not on pairs.

The source must be the Hugging Face checkpoint (config.json, weights): given a crossrank model
directory (crossrank.json, model.onnx, no config.json) sentence-transformers fails in
transformers' AutoConfig with "Unrecognized model in DIR. Should have a `model_type` key in its
config.json" (bench/README.md, "Peers at their best").
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from sentence_transformers import (
    CrossEncoder,
    export_dynamic_quantized_onnx_model,
    export_optimized_onnx_model,
    export_static_quantized_openvino_model,
)

from crossrank.model.variant_choice import read_cpu_flags


def quantization_arch(flags: frozenset[str]) -> str:
    """optimum's dynamic-quantisation preset for this CPU (the names it accepts)."""
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a Hugging Face cross-encoder directory")
    parser.add_argument("out", type=Path, help="the copy that receives the exports")
    parser.add_argument("--calibration", type=Path, help="a local dataset folder (train.jsonl)")
    args = parser.parse_args()
    shutil.copytree(args.checkpoint, args.out, dirs_exist_ok=True)
    out = str(args.out)

    onnx_model = CrossEncoder(out, backend="onnx", local_files_only=True)
    onnx_model.save_pretrained(out)  # onnx/model.onnx, which the next exports start from
    export_optimized_onnx_model(onnx_model, "O3", out)
    export_dynamic_quantized_onnx_model(onnx_model, quantization_arch(read_cpu_flags()), out)

    openvino_model = CrossEncoder(out, backend="openvino", local_files_only=True)
    openvino_model.save_pretrained(out)  # openvino/openvino_model.xml
    if args.calibration:
        export_static_quantized_openvino_model(
            openvino_model,
            None,
            out,
            dataset_name=str(args.calibration),
            dataset_config_name="default",
            dataset_split="train",
            column_name="text",
        )
    for file in sorted(args.out.rglob("*")):
        if file.suffix in (".onnx", ".xml"):
            print(file.relative_to(args.out), f"{file.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
