"""An in-process LRU cache of pair logits, bounded in bytes, consulted before a request's pairs
are queued: a pair scored before never reaches the queue again.

A key is a digest of the tokenised pair (its input and token type ids) salted with the model, the
variant and the max length, so that one text cut differently, or scored by another model, never
hits. The value is the logit alone: calibration and activation apply after, per request.
"""

from __future__ import annotations

import hashlib
import sys
from collections import OrderedDict

import numpy as np

from crossrank.model.tokenization import EncodedPair
from crossrank.ops.metrics import ModelMetrics

DIGEST_BYTES = 16
# What one entry costs in memory: the key's bytes object, the float, and OrderedDict's link and
# hash-table slot (measured with sys.getsizeof; the table's share is an estimate, 40 bytes).
ENTRY_BYTES = sys.getsizeof(b"\0" * DIGEST_BYTES) + sys.getsizeof(0.0) + 56 + 40


class ScoreCache:
    def __init__(self, max_bytes: int, salt: str, metrics: ModelMetrics) -> None:
        self.max_entries = max_bytes // ENTRY_BYTES
        self._salt = salt.encode()
        self._metrics = metrics
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        metrics.score_cache_capacity.set(self.max_entries * ENTRY_BYTES)

    def key(self, pair: EncodedPair) -> bytes:
        digest = hashlib.blake2b(self._salt, digest_size=DIGEST_BYTES)
        digest.update(pair.input_ids.tobytes())
        digest.update(pair.token_type_ids.tobytes())
        return digest.digest()

    def keys(self, pairs: list[EncodedPair]) -> list[bytes]:
        return [self.key(p) for p in pairs]

    @property
    def bytes(self) -> int:
        return len(self._entries) * ENTRY_BYTES

    def get(self, keys: list[bytes]) -> list[float | None]:
        """The cached logit of each key (None: a miss); hits become the most recent."""
        found: list[float | None] = []
        for key in keys:
            logit = self._entries.get(key)
            if logit is not None:
                self._entries.move_to_end(key)
            found.append(logit)
        hits = sum(f is not None for f in found)
        self._metrics.score_cache_hits.inc(hits)
        self._metrics.score_cache_misses.inc(len(keys) - hits)
        return found

    def lookup(self, keys: list[bytes]) -> tuple[np.ndarray, list[int]]:
        """The logits the cache holds (0 where it misses) and the positions it misses."""
        logits = np.zeros(len(keys), dtype=np.float32)
        missing = []
        for i, logit in enumerate(self.get(keys)):
            if logit is None:
                missing.append(i)
            else:
                logits[i] = logit
        return logits, missing

    def put(self, keys: list[bytes], logits: list[float]) -> None:
        """Store, evicting the least recently used entries beyond the byte bound."""
        for key, logit in zip(keys, logits, strict=True):
            self._entries[key] = logit
            self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        self._metrics.score_cache_bytes.set(self.bytes)
