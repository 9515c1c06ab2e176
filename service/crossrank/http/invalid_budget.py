"""A per-key budget of invalid requests: a key whose bodies keep failing validation is refused
(429) from its headers alone until its budget refills.

A refusal for overload costs little, but an invalid body costs its whole read and parse before
the 422 can say what is wrong with it: a client looping on 1,000-passage bodies that fail
validation keeps the cores busy parsing, and every other key's requests wait behind that. Each
key has a token bucket (``invalid_burst`` tokens, refilled at ``invalid_per_s``); every 4xx a
scoring route answers it (bad JSON, a field at fault, an unknown model, a body too large) takes
a token, and a key with none left is refused before its body is read, with a Retry-After of
when the next token comes. A client that sends valid requests never meets it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from crossrank.core.errors import ErrorType, ServiceError

# The answers charged: the client's own mistakes (401 comes before the key is known; 429 and
# the 503s are the server's refusals, not the client's fault).
CHARGED = frozenset({400, 404, 408, 413, 422})


class InvalidBudget:
    def __init__(
        self, per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._per_s = per_s
        self._burst = burst
        self._clock = clock
        self._tokens: dict[str, tuple[float, float]] = {}  # key -> (tokens, when counted)

    @property
    def enabled(self) -> bool:
        return self._per_s > 0

    def _now_tokens(self, key: str) -> float:
        tokens, at = self._tokens.get(key, (self._burst, self._clock()))
        return min(self._burst, tokens + (self._clock() - at) * self._per_s)

    def refusal(self, key: str | None) -> ServiceError | None:
        """Why ``key`` is refused now (its budget spent), or None."""
        if key is None or not self.enabled or key not in self._tokens:
            return None
        tokens = self._now_tokens(key)
        if tokens >= 1:
            return None
        wait = math.ceil((1 - tokens) / self._per_s)
        return ServiceError(
            ErrorType.TOO_MANY_INVALID,
            f"this API key sent more than {self._burst} invalid requests at over "
            f"{self._per_s:g} a second: fix the requests, and retry in {wait} s",
            retry_after_s=wait,
        )

    def charge(self, key: str | None, status: int) -> None:
        """A scoring request of ``key`` was answered ``status``."""
        if key is None or not self.enabled or status not in CHARGED:
            return
        # One entry per configured key at most: the map stays as small as the key list.
        self._tokens[key] = (self._now_tokens(key) - 1, self._clock())
