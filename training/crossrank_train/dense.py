"""Exact cosine search with a bi-encoder: a first stage for mining negatives where it errs.

BM25 negatives are easy for a cross-encoder that starts as the all-MiniLM-L6-v2 bi-encoder (its
LCE loss starts near 0.2 and training has nothing to learn). The passages the bi-encoder itself
ranks high without being judged relevant are exactly the mistakes the cross-attention should fix.
"""

from __future__ import annotations

import torch

from crossrank_train.readers import Run
from crossrank_train.scoring import BiEncoderScorer

# Queries scored against the whole corpus at once: bounds the score matrix's memory.
QUERY_CHUNK = 1024


class DenseIndex:
    def __init__(self, corpus: dict[str, str], encoder: BiEncoderScorer) -> None:
        self.pids = list(corpus)
        self.encoder = encoder
        self.embeddings = encoder.embed(list(corpus.values()), desc="embedding corpus")

    def search(self, queries: dict[str, str], k: int) -> Run:
        """Top ``k`` passages per query by cosine similarity, as a run."""
        qids = list(queries)
        vectors = self.encoder.embed([queries[q] for q in qids], desc="embedding queries")
        k = min(k, len(self.pids))
        run: Run = {}
        for start in range(0, len(qids), QUERY_CHUNK):
            scores, rows = torch.topk(vectors[start : start + QUERY_CHUNK] @ self.embeddings.T, k)
            for offset, qid in enumerate(qids[start : start + QUERY_CHUNK]):
                run[qid] = {
                    self.pids[row]: float(score)
                    for row, score in zip(
                        rows[offset].tolist(), scores[offset].tolist(), strict=True
                    )
                }
        return run
