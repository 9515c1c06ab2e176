"""BM25 over an in-memory corpus (bm25s): the first stage for mining and for evaluation."""

from __future__ import annotations

import bm25s

from crossrank_train.readers import Run


class Bm25Index:
    def __init__(self, corpus: dict[str, str]) -> None:
        self.pids = list(corpus)
        self._retriever = bm25s.BM25()
        self._retriever.index(bm25s.tokenize(list(corpus.values()), stopwords="en"))

    def search(self, queries: dict[str, str], k: int) -> Run:
        """Top ``k`` passages per query, as a run. Passages sharing no term with the query
        (score 0) are left out: bm25s would fill the list with them in arbitrary order."""
        qids = list(queries)
        docs, scores = self._retriever.retrieve(
            bm25s.tokenize([queries[q] for q in qids], stopwords="en"),
            k=min(k, len(self.pids)),
        )
        return {
            qid: {
                self.pids[doc]: float(score)
                for doc, score in zip(docs[row], scores[row], strict=True)
                if score > 0
            }
            for row, qid in enumerate(qids)
        }
