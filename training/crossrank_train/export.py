"""Export a Hugging Face checkpoint into a crossrank model directory: a sequence classifier
with one or two labels, or a causal LM as an LLM reranker (see heads.py for the logit each
yields, families.py for what is known of each family).

The ``fp32`` graph must match torch to ``1e-4`` in every logit (the parity gate); onnxruntime's
transformer optimizer then fuses it (Attention, SkipLayerNorm, BiasGelu, RMS norms, as far as it
knows the family; the report lists what it fused), and the reduced
variants are derived from the fused graph: ``int8`` (dynamic quantisation, for CPU) and
``fp16`` (for GPU, inputs and outputs kept fp32), each admitted only if it ranks a sample like
fp32 does (see agreement.py). Metadata is written last: a failed export leaves no
``crossrank.json``, so nothing half-checked can be served.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.onnx_model import OnnxModel
from onnxruntime.transformers.optimizer import optimize_model
from tokenizers import Tokenizer
from tqdm import tqdm
from transformers import AutoConfig

from crossrank.model.collate import pad_pairs
from crossrank.model.model_dir import (
    METADATA_FILE,
    TOKENIZER_FILE,
    Activation,
    ModelDir,
    ModelMetadata,
    PromptTemplate,
    load_model_dir,
    write_calibration,
    write_metadata,
)
from crossrank.model.tokenization import PairEncoder, pair_encoder
from crossrank_train.agreement import RankingCase, check_agreement, ranking_agreement
from crossrank_train.calibration import CalibrationError, LabelledLogits, fit_platt
from crossrank_train.encoding import batch_feeds
from crossrank_train.evaluate import measure
from crossrank_train.families import checkpoint_window, optimizer_model_type
from crossrank_train.heads import ClassifierHead, Head, TwoLabelScore, YesNoHead
from crossrank_train.models import (
    CheckpointError,
    load_causal_lm,
    load_cross_encoder,
    read_provenance,
    tokenizer_file,
)
from crossrank_train.provenance import git_commit
from crossrank_train.readers import Qrels
from crossrank_train.scoring import OnnxScorer, served_limits

log = logging.getLogger(__name__)

OPSET = 17
FP32_FILE = "model.onnx"
VARIANT_FILES = {"fp32": FP32_FILE, "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
UNFUSED_FILE = "model.unfused.onnx"
PARITY_TOLERANCE = 1e-4
# The parity check runs torch too, so it takes a slice of the sample: enough queries and
# passages for padded batches of mixed lengths, few enough to take seconds.
PARITY_QUERIES = 8
PARITY_PASSAGES = 16
# An LLM's window can be tens of thousands of tokens, and one warm-up batch that long would need
# memory for its whole attention matrix: unless told otherwise, pairs are cut where
# Qwen3-Reranker's own recipe cuts them.
LLM_DEFAULT_MAX_LENGTH = 8192


class ParityError(RuntimeError):
    """An exported graph disagrees with the torch model beyond the allowed tolerance."""


def export_onnx(
    model: torch.nn.Module, out_file: Path, sample_length: int = 16, head: Head | None = None
) -> list[str]:
    """Write ``model``'s logit (``head``'s; a one-label classifier's by default) as ONNX (opset
    17, dynamic batch and sequence); returns its input names."""
    head = head or ClassifierHead(1)
    # The wrapper, like a new module, would be in training mode, and the exporter puts that mode
    # back on every submodule after tracing, dropout included.
    wrapper = head.module(model.eval())
    names = head.input_names(model)
    batch, length = 2, sample_length
    ids = torch.ones((batch, length), dtype=torch.long)
    mask = torch.ones((batch, length), dtype=torch.long)
    types = torch.zeros((batch, length), dtype=torch.long)
    args = (ids, mask, types)[: len(names)]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["logits"] = {0: "batch"}
    # The TorchScript exporter: its graphs are the ones onnxruntime's transformer optimizer fuses.
    torch.onnx.export(
        wrapper,
        args,
        str(out_file),
        input_names=names,
        output_names=["logits"],
        dynamic_axes=axes,
        opset_version=OPSET,
        dynamo=False,
    )
    wrapper.eval()
    return names


def onnx_logits(model_file: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in wanted})[0].reshape(-1)


def parity_feeds(
    tokenizer: PairEncoder, cases: Sequence[RankingCase], token_types: bool
) -> list[dict[str, np.ndarray]]:
    """Padded batches of real pairs from the sample, encoded as the service encodes them."""
    batches = []
    for case in cases[:PARITY_QUERIES]:
        pairs = tokenizer.encode(case.query, case.passages[:PARITY_PASSAGES]).pairs
        batches.append(batch_feeds(pad_pairs(pairs), token_types))
    return batches


def check_parity(
    model: torch.nn.Module,
    model_file: Path,
    batches: Sequence[dict[str, np.ndarray]],
    tolerance: float = PARITY_TOLERANCE,
    head: Head | None = None,
) -> float:
    """Max |logit difference| between torch and the ONNX file; raises ParityError over tolerance."""
    head = head or ClassifierHead(1)
    delta = max(
        float(np.max(np.abs(head.reference(model, feeds) - onnx_logits(model_file, feeds))))
        for feeds in batches
    )
    if not delta <= tolerance:
        raise ParityError(
            f"{model_file.name} does not compute what the torch model computes: max |Δlogit| "
            f"{delta:.3g} > {tolerance:g} over {len(batches)} batches of sample pairs"
        )
    return delta


def fuse(source: Path, target: Path, config: Any) -> dict[str, int]:
    """onnxruntime's transformer fusions for the family (its generic ones for a family the
    optimizer does not know); returns the count of each fused operator."""
    model_type, known = optimizer_model_type(config.model_type)
    fused = optimize_model(
        str(source),
        model_type=model_type,
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
    )
    fused.save_model_to_file(str(target))
    counts = {op: n for op, n in fused.get_fused_operator_statistics().items() if n}
    if known and model_type == "bert" and not counts.get("Attention"):
        log.warning("no Attention was fused: was the model loaded with eager attention?")
    return counts


def quantize_int8(fp32: Path, target: Path, exclude: Sequence[str] = ()) -> None:
    """``exclude``: node names kept in fp32 (``python -m bench.int8_exclusions`` weighs them),
    beside the MatMuls by a weight vector, which per-channel scales cannot quantise."""
    # Per-channel weight scales: on a MiniLM-L6 cross-encoder they raised the agreement with
    # fp32 (mean top-10 overlap 0.76 -> 0.87, Kendall tau 0.81 -> 0.91) at the same size and
    # speed as one scale per tensor. The fused graph's contrib ops carry no type information
    # for the quantiser, which then cannot tell their tensors' types; they are all float here.
    quantize_dynamic(
        fp32,
        target,
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_exclude=[*exclude, *vector_matmuls(onnx.load(str(fp32)).graph)],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


NORMS = (
    "SkipLayerNormalization",
    "LayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization",
    "RMSNormalization",
)


def head_nodes(graph: onnx.GraphProto) -> list[str]:
    """The nodes outside the encoder: all but those its last layer norm depends on (the pooling,
    similarities and classifier that turn its states into the logit, and whatever they take
    from the inputs alone)."""
    producer = {output: node for node in graph.node for output in node.output}
    norms = [n for n in graph.node if n.op_type in NORMS]
    if not norms:
        return []
    encoder: set[str] = set()
    stack = [norms[-1]]
    while stack:
        node = stack.pop()
        if node.name not in encoder:
            encoder.add(node.name)
            stack.extend(producer[name] for name in node.input if name in producer)
    return [node.name for node in graph.node if node.name not in encoder]


def vector_matmuls(graph: onnx.GraphProto) -> list[str]:
    """MatMuls by a weight vector (an LLM reranker's yes - no direction): per-channel int8 has
    no channels to scale there, and the one product that makes the score stays exact."""
    vectors = {t.name for t in graph.initializer if len(t.dims) == 1}
    return [n.name for n in graph.node if n.op_type == "MatMul" and vectors & set(n.input)]


def convert_fp16(fp32: Path, target: Path) -> None:
    # keep_io_types: the service feeds int64 ids and reads fp32 logits whatever the variant.
    # The head stays fp32: it is a sliver of the FLOPs, and in fp16 the similarities a scale of
    # 10 multiplies (cosines, MaxSim, BM25 sums) lose the third digit that orders close passages.
    model = OnnxModel(onnx.load(str(fp32)))
    model.convert_float_to_float16(keep_io_types=True, node_block_list=head_nodes(model.graph()))
    model.save_model_to_file(str(target))


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    """Save without truncation/padding: the service sets both from the metadata."""
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    tokenizer.no_truncation()
    tokenizer.no_padding()
    tokenizer.save(str(out_dir / TOKENIZER_FILE))


def _judge_variants(
    out: Path,
    variants: Sequence[str],
    tokenizer: PairEncoder,
    sample: Sequence[RankingCase],
    qrels: Qrels | None,
) -> tuple[dict[str, Any], dict[str, list[np.ndarray]]]:
    """Score the sample with every variant; gate the reduced ones against fp32. Returns the
    report and each variant's scores, by case."""
    scores = {}
    for variant in variants:
        # In the CPU service's batches: the gate and the metrics judge int8 as it is served.
        scorer = OnnxScorer(out / VARIANT_FILES[variant], tokenizer, served_limits())
        cases = tqdm(sample, desc=f"scoring the sample ({variant})", unit="query")
        scores[variant] = [scorer.score(case.query, case.passages) for case in cases]
    report: dict[str, Any] = {"agreement": {}}
    for variant in variants:
        if variant != "fp32":
            agreement = ranking_agreement(scores["fp32"], scores[variant])
            report["agreement"][variant] = agreement.as_record()
            log.info("%s vs fp32: %s", variant, agreement)
            check_agreement(variant, agreement)
    if qrels is not None:
        judged = {case.qid: qrels[case.qid] for case in sample}
        report["metrics"] = {
            variant: measure(
                judged,
                {
                    case.qid: dict(zip(case.pids, map(float, s), strict=True))
                    for case, s in zip(sample, scores[variant], strict=True)
                },
            )
            for variant in variants
        }
    return report, scores


def _calibrate(
    model: ModelDir,
    sample: Sequence[RankingCase],
    scores: dict[str, list[np.ndarray]],
    qrels: Qrels,
    calibration_set: str,
) -> ModelDir:
    """Fit a calibration per variant on the sample's judged candidates, each on that variant's
    own logits (int8's move with its quantisation); a variant whose logits do not rise with
    relevance is left uncalibrated."""
    labels = np.asarray(
        [int(qrels[case.qid].get(pid, 0) > 0) for case in sample for pid in case.pids],
        dtype=np.int64,
    )
    for variant, scored in scores.items():
        data = LabelledLogits(np.concatenate(scored).astype(np.float64), labels)
        try:
            calibration = fit_platt(data, calibration_set, variant)
        except CalibrationError as exc:
            log.warning("%s stays uncalibrated: %s", variant, exc)
            continue
        log.info("calibration of %s on %s: %s", variant, calibration_set, calibration)
        model = write_calibration(model.path, calibration)
    return model


def export_model_dir(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    name: str,
    max_query_tokens: int = 64,
    max_length: int = 512,
    activation: Activation = Activation.SIGMOID,
    training: dict[str, Any] | None = None,
    variants: Sequence[str] = ("fp32",),
    fused: bool = False,
    sample: Sequence[RankingCase] | None = None,
    qrels: Qrels | None = None,
    ship: Sequence[str] | None = None,
    head: Head | None = None,
    prompt: PromptTemplate | None = None,
    calibration_set: str | None = None,
) -> ModelDir:
    """Write a model directory of ``model``'s ``head`` logit (a one-label classifier's by
    default; an LLM reranker's pairs are ``prompt``'s text) with ``variants`` (fp32 always
    among them); with ``ship``, only those variants stay in it (fp32 is still exported: it is
    the reference of every gate).

    With a ``sample`` of queries and candidates, the fp32 graph passes the parity gate and the
    reduced variants the agreement gate on it (both raise on failure); with ``qrels`` for the
    sample's qids, each variant's nDCG@10/RR@10/R@100 on it go into the metadata too, and (named
    by ``calibration_set``) the calibration is fitted on the sample's judged candidates.
    Without a sample only fp32 can be written, unchecked (the tests' tiny models).
    """
    out = Path(out_dir)
    unknown = set(variants) - set(VARIANT_FILES)
    if unknown or "fp32" not in variants:
        raise ValueError(f"variants must include fp32 and be among {sorted(VARIANT_FILES)}")
    if sample is None and set(variants) != {"fp32"}:
        raise ValueError("int8 and fp16 are judged on a sample of queries: give one")
    # Before the directory is touched: exporting over a model directory the repository tracks
    # (models/) would otherwise record the commit as dirty because of this very export.
    head = head or ClassifierHead(1)
    report: dict[str, Any] = {
        "git_commit": git_commit(),
        "head": head.record(),
        "parity_max_abs_logit_delta": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    # An earlier export's metadata would make this directory servable even if this one fails.
    (out / METADATA_FILE).unlink(missing_ok=True)
    write_tokenizer(tokenizer, out)
    pair_tokenizer = pair_encoder(out / TOKENIZER_FILE, prompt, max_query_tokens, max_length)
    token_types = "token_type_ids" in head.input_names(model)
    feeds = parity_feeds(pair_tokenizer, sample, token_types) if sample else []

    exported = out / (UNFUSED_FILE if fused else FP32_FILE)
    export_onnx(model, exported, head=head)
    if feeds:
        delta = check_parity(model, exported, feeds, head=head)
        report["parity_max_abs_logit_delta"]["exported"] = delta
    if fused:
        optimizer_type, known = optimizer_model_type(model.config.model_type)
        report["optimizer"] = {
            "model_type": model.config.model_type,
            "optimizer_model_type": optimizer_type,
            "known_to_optimizer": known,
        }
        report["fused_operators"] = fuse(exported, out / FP32_FILE, model.config)
        exported.unlink()
        if feeds:
            delta = check_parity(model, out / FP32_FILE, feeds, head=head)
            report["parity_max_abs_logit_delta"]["fused"] = delta
    if "int8" in variants:
        quantize_int8(out / FP32_FILE, out / VARIANT_FILES["int8"])
    if "fp16" in variants:
        convert_fp16(out / FP32_FILE, out / VARIANT_FILES["fp16"])
    scores: dict[str, list[np.ndarray]] = {}
    if sample:
        judged, scores = _judge_variants(out, variants, pair_tokenizer, sample, qrels)
        report |= judged
    shipped = [v for v in variants if ship is None or v in ship]
    if not shipped:
        raise ValueError(f"none of the shipped variants {ship} is among {list(variants)}")
    for variant in set(variants) - set(shipped):
        (out / VARIANT_FILES[variant]).unlink()
    write_metadata(
        out,
        ModelMetadata(
            name=name,
            max_query_tokens=max_query_tokens,
            max_length=max_length,
            activation=activation,
            variants={v: VARIANT_FILES[v] for v in shipped},
            prompt=prompt,
            training={**(training or {}), "export": report},
        ),
    )
    model_dir = load_model_dir(out)
    if sample and qrels is not None and calibration_set is not None:
        model_dir = _calibrate(model_dir, sample, scores, qrels, calibration_set)
    return model_dir


def _checkpoint_head(
    checkpoint: str | Path,
    config: Any,
    tokenizer: Tokenizer,
    *,
    prompt: PromptTemplate | None,
    two_label_score: TwoLabelScore | None,
    positive_label: int,
    yes_no: tuple[str, str],
) -> tuple[torch.nn.Module, Head]:
    """The network and the logit it is exported for: a causal LM (whose pairs need a prompt
    template) or a sequence classifier (whose pairs need the tokenizer's pair template)."""
    causal = any(name.endswith("ForCausalLM") for name in config.architectures or [])
    if causal:
        if prompt is None:
            raise ValueError(
                f"{checkpoint} is a causal LM ({config.architectures[0]}): an LLM reranker "
                "needs its prompt template (--prompt)"
            )
        if two_label_score is not None:
            raise ValueError("a causal LM scores by its yes/no logits, not by two labels")
        head = YesNoHead(tokenizer, *yes_no)
        return load_causal_lm(checkpoint), head
    if prompt is not None:
        raise ValueError(
            f"{checkpoint} is no causal LM ({config.architectures}): a prompt template is for "
            "LLM rerankers"
        )
    if not tokenizer.post_processor or not tokenizer.post_processor.num_special_tokens_to_add(True):
        raise CheckpointError(
            f"{checkpoint}'s {TOKENIZER_FILE} has no pair template (its post_processor adds no "
            "special tokens to a pair), so the pairs the model was trained on cannot be built"
        )
    head = ClassifierHead(config.num_labels, two_label_score, positive_label)
    return load_cross_encoder(checkpoint, num_labels=head.labels), head


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    sample: Sequence[RankingCase],
    sample_source: str,
    qrels: Qrels | None = None,
    variants: Sequence[str] = tuple(VARIANT_FILES),
    activation: Activation | None = None,
    max_query_tokens: int | None = None,
    max_length: int | None = None,
    ship: Sequence[str] | None = None,
    two_label_score: TwoLabelScore | None = None,
    positive_label: int = 1,
    prompt: PromptTemplate | None = None,
    yes_no: tuple[str, str] = ("yes", "no"),
) -> ModelDir:
    """A local Hugging Face checkpoint directory -> a fused, gated model directory.

    A sequence classifier's pairs follow its tokenizer's pair template; with two labels,
    ``two_label_score`` says how they make a score (heads.py). A causal LM is exported as an LLM
    reranker: ``prompt`` builds its pairs, ``yes_no`` names the words whose logits it compares.

    Token limits default to what training recorded, else to the checkpoint's window (its
    position table, capped by its tokenizer's ``model_max_length``; an LLM's at
    LLM_DEFAULT_MAX_LENGTH) with a query budget of 64 tokens or a quarter of it. The activation
    is the one the head implies (sigmoid for softmax and yes/no probabilities, the identity for
    a logit difference); else sigmoid for a BCE-trained model (its logits are log-odds) but the
    identity for LCE/MarginMSE, whose logits only mean something relative to each other, or the
    activation the checkpoint's provenance names. A checkpoint not trained by crossrank is taken
    as BCE-trained, as public cross-encoders are.
    """
    provenance = read_provenance(checkpoint)
    config = AutoConfig.from_pretrained(str(checkpoint), local_files_only=True)
    tokenizer = Tokenizer.from_file(str(tokenizer_file(checkpoint)))
    model, head = _checkpoint_head(
        checkpoint,
        config,
        tokenizer,
        prompt=prompt,
        two_label_score=two_label_score,
        positive_label=positive_label,
        yes_no=yes_no,
    )
    if head.activation is not None:
        if activation not in (None, head.activation):
            raise ValueError(
                f"activation {activation} contradicts the score chosen ({head.record()}), "
                f"which implies {head.activation}"
            )
        activation = head.activation
    if activation is None and "activation" in provenance:
        # Recorded by a checkpoint whose logits are no log-odds though it was never trained
        # (the gated model's step 0: scaled similarities, up to 30 and more, which a sigmoid
        # would flatten into ties at 1.0).
        activation = Activation(provenance["activation"])
    if activation is None:
        bce = provenance.get("loss", "bce") == "bce"
        activation = Activation.SIGMOID if bce else Activation.IDENTITY
    window = checkpoint_window(checkpoint, config)
    if isinstance(head, YesNoHead) and window:
        window = min(window, LLM_DEFAULT_MAX_LENGTH)
    max_length = max_length or provenance.get("max_length") or window or 512
    max_query_tokens = max_query_tokens or provenance.get(
        "max_query_tokens", min(64, max_length // 4)
    )
    return export_model_dir(
        model,
        tokenizer,
        out_dir,
        name=name,
        max_query_tokens=max_query_tokens,
        max_length=max_length,
        activation=activation,
        training={
            **provenance,
            "base_model": provenance.get("base_model", str(checkpoint)),
            "checkpoint": str(checkpoint),
            "checkpoint_window": window,
            "export_sample": sample_source,
        },
        variants=variants,
        fused=True,
        sample=sample,
        qrels=qrels,
        ship=ship,
        head=head,
        prompt=prompt,
        calibration_set=sample_source,
    )
