"""fp32 for CPUs, rebuilt at start-up from the fp16 variant a model directory ships for GPUs.

onnxruntime's CPU provider has few fp16 kernels: it runs an fp16 graph through Casts around its
operators, slower than the same graph in fp32. An fp32 file would double the directory's size;
widening the fp16 file's tensors gives the fp32 graph back with only its weights rounded to
fp16 (activations are fp32 again), at no cost on disk. ``python -m bench.variant_speed``
measures both the speed and what the rounding changes in the scores (bench/README.md, "the
variant `auto` serves").

The ``onnx`` package edits the graph: onnxruntime itself cannot, and widening is a change of
element type, which no converter offers (onnxconverter-common and onnxruntime.transformers only
narrow fp32 to fp16).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The variant name under which the rebuilt graph is served (it is never a file).
FP32_FROM_FP16 = "fp32-from-fp16"


def rebuild_fp32(fp16_file: Path) -> bytes:
    """The fp16 model's graph with every fp16 tensor, cast and type widened to fp32, serialised."""
    import onnx
    from onnx import TensorProto, numpy_helper

    def widen_tensor(tensor: onnx.TensorProto) -> None:
        if tensor.data_type != TensorProto.FLOAT16:
            return
        wide = numpy_helper.to_array(tensor).astype(np.float32)
        # Set in place: building a new tensor and copying it over is far slower for a model's
        # worth of weights.
        tensor.ClearField("int32_data")
        tensor.data_type = TensorProto.FLOAT
        tensor.raw_data = wide.tobytes()

    def widen_graph(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            widen_tensor(tensor)
        for info in (*graph.input, *graph.output, *graph.value_info):
            if info.type.tensor_type.elem_type == TensorProto.FLOAT16:
                info.type.tensor_type.elem_type = TensorProto.FLOAT
        for node in graph.node:
            for attribute in node.attribute:
                if node.op_type == "Cast" and attribute.name == "to":
                    if attribute.i == TensorProto.FLOAT16:
                        attribute.i = TensorProto.FLOAT
                elif attribute.type == onnx.AttributeProto.TENSOR:
                    widen_tensor(attribute.t)
                elif attribute.type == onnx.AttributeProto.GRAPH:
                    widen_graph(attribute.g)

    model = onnx.load(str(fp16_file))
    widen_graph(model.graph)
    return model.SerializeToString()
