"""The segment-gated cross-encoder (gated_bert.py) built on an MPNet bi-encoder such as
all-mpnet-base-v2 (fetch_base.py).

The construction and the logit are gated_bert's; what differs is how MPNet places tokens:

* no token type embedding: the pair's ``token_type_ids`` (the template marks the passage with 1)
  only tell the segments apart, for the attention masks and the positions;
* absolute positions counted from ``padding_idx + 1`` (RoBERTa's scheme): they restart at each
  segment, so the passage's ``<s>`` gets the position it gets alone;
* a relative position bias per head, shared by the layers, bucketed from the distance between
  two tokens: distances within a segment are the same wherever the segment starts, so
  within-segment attention sees exactly the biases the bi-encoder saw.

Pairs are ``<s> query </s> <s> passage </s>`` (not MPNet's own pair template, ``</s></s>`` in
the middle): each segment is tokenized as the bi-encoder tokenizes a text alone. At step 0
(gates and head at 0) the logit's cosine is the bi-encoder's; ``python -m
crossrank_train.gated_mpnet --bi-encoder DIR --out DIR`` takes gated_bert's flags.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, MPNetConfig, MPNetModel
from transformers.models.mpnet.modeling_mpnet import (
    MPNetEmbeddings,
    MPNetEncoder,
    MPNetIntermediate,
    MPNetOutput,
)

from crossrank_train.gated_bert import (
    BiEncoderFamily,
    BM25Params,
    GatedBertForRanking,
    RankingTermsConfig,
    attention_biases,
    load_encoder_weights,
    ranking_config,
    segment_positions,
)
from crossrank_train.gated_bert import main as gated_main

SPECIAL_TOKENS = ("<s>", "</s>")


class GatedMPNetConfig(RankingTermsConfig, MPNetConfig):
    model_type = "crossrank-gated-mpnet"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # No embedding reads them, but the network takes the pair's token types (which segment
        # each token is in): export and the service feed them to a model of two types.
        self.type_vocab_size = 2


class GatedMPNetSelfAttention(nn.Module):
    """MPNet's self-attention (q, k, v, o) with gated_bert's per-head gate between
    within-segment and full attention."""

    def __init__(self, config: GatedMPNetConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.q = nn.Linear(config.hidden_size, config.hidden_size)
        self.k = nn.Linear(config.hidden_size, config.hidden_size)
        self.v = nn.Linear(config.hidden_size, config.hidden_size)
        self.o = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.cross_gate = nn.Parameter(torch.zeros(config.num_attention_heads))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_size).transpose(1, 2)

    def forward(
        self,
        hidden: torch.Tensor,
        segment_bias: torch.Tensor,
        full_bias: torch.Tensor,
        position_bias: torch.Tensor,
    ) -> torch.Tensor:
        q, k, v = (self._split(f(hidden)) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / self.head_size**0.5 + position_bias
        p_segment = torch.softmax(scores + segment_bias, dim=-1)
        p_full = torch.softmax(scores + full_bias, dim=-1)
        gate = self.cross_gate.view(1, -1, 1, 1).to(p_full.dtype)
        probs = self.dropout(p_segment + gate * (p_full - p_segment))
        context = (probs @ v).transpose(1, 2).reshape(hidden.shape)
        return self.o(context)


class GatedMPNetAttention(nn.Module):
    # ``self`` where MPNet says ``attn`` (the weights are renamed as they load): every tool
    # finds a gated model's gates at layer.attention.self.cross_gate.
    def __init__(self, config: GatedMPNetConfig) -> None:
        super().__init__()
        self.self = GatedMPNetSelfAttention(config)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, *biases: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.self(hidden, *biases)) + hidden)


class GatedMPNetLayer(nn.Module):
    def __init__(self, config: GatedMPNetConfig) -> None:
        super().__init__()
        self.attention = GatedMPNetAttention(config)
        self.intermediate = MPNetIntermediate(config)
        self.output = MPNetOutput(config)

    def forward(self, hidden: torch.Tensor, *biases: torch.Tensor) -> torch.Tensor:
        attended = self.attention(hidden, *biases)
        return self.output(self.intermediate(attended), attended)


class GatedMPNetEncoder(nn.Module):
    def __init__(self, config: GatedMPNetConfig) -> None:
        super().__init__()
        self.buckets = config.relative_attention_num_buckets
        self.layer = nn.ModuleList(GatedMPNetLayer(config) for _ in range(config.num_hidden_layers))
        self.relative_attention_bias = nn.Embedding(self.buckets, config.num_attention_heads)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """[1, heads, L, L]: MPNet's bias for every distance, bucketed by MPNet's own function."""
        positions = torch.arange(length, device=device)
        distance = positions[None, :] - positions[:, None]
        buckets = MPNetEncoder.relative_position_bucket(distance, num_buckets=self.buckets)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)


class GatedMPNetBody(nn.Module):
    def __init__(self, config: GatedMPNetConfig) -> None:
        super().__init__()
        self.embeddings = MPNetEmbeddings(config)
        self.encoder = GatedMPNetEncoder(config)


class GatedMPNetForRanking(GatedBertForRanking):
    config_class = GatedMPNetConfig

    @staticmethod
    def body(config: GatedMPNetConfig) -> nn.Module:  # type: ignore[override]
        return GatedMPNetBody(config)

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        embeddings = self.bert.embeddings
        start = embeddings.padding_idx + 1
        hidden = embeddings(
            input_ids=input_ids, position_ids=segment_positions(token_type_ids) + start
        )
        segment_bias, full_bias = attention_biases(attention_mask, token_type_ids, hidden.dtype)
        encoder = self.bert.encoder
        position_bias = encoder.position_bias(input_ids.shape[1], input_ids.device).to(hidden.dtype)
        for layer in encoder.layer:
            hidden = layer(hidden, segment_bias, full_bias, position_bias)
        return hidden

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GatedMPNetSelfAttention):
            module.cross_gate.zero_()
        elif isinstance(module, MPNetEmbeddings):
            # As gated_bert's BERT embeddings: a non-persistent buffer must not hold garbage.
            module.position_ids.copy_(torch.arange(module.position_ids.shape[-1]).expand((1, -1)))


AutoConfig.register(GatedMPNetConfig.model_type, GatedMPNetConfig)
AutoModelForSequenceClassification.register(GatedMPNetConfig, GatedMPNetForRanking)


def from_bi_encoder(
    mpnet_dir: str | Path,
    cosine_scale: float = 20.0,
    maxsim_scale: float = 0.0,
    *,
    maxsim_idf: bool = False,
    lexical_scale: float = 0.0,
    idf: tuple[torch.Tensor, float] | None = None,
    bm25: BM25Params | None = None,
) -> GatedMPNetForRanking:
    """gated_bert.from_bi_encoder for an MPNet bi-encoder (mean pooling, cosine)."""
    source = MPNetModel.from_pretrained(str(mpnet_dir), add_pooling_layer=False)
    config, table = ranking_config(
        GatedMPNetConfig,
        source.config,
        GatedMPNetForRanking,
        cosine_scale=cosine_scale,
        maxsim_scale=maxsim_scale,
        maxsim_idf=maxsim_idf,
        lexical_scale=lexical_scale,
        idf=idf,
        bm25=bm25,
    )
    model = GatedMPNetForRanking(config)
    weights = {
        name.replace(".attention.attn.", ".attention.self."): value
        for name, value in source.state_dict().items()
    }
    load_encoder_weights(model.bert, weights)
    if table is not None:
        with torch.no_grad():
            model.idf.copy_(table)
    return model.float()


MPNET = BiEncoderFamily(GatedMPNetForRanking, from_bi_encoder, *SPECIAL_TOKENS)


def main(argv: list[str] | None = None) -> int:
    """``python -m crossrank_train.gated_mpnet --bi-encoder DIR --out DIR``: gated_bert's
    step-0 command for an MPNet bi-encoder."""
    return gated_main(argv, MPNET)


if __name__ == "__main__":
    raise SystemExit(main())
