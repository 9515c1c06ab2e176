"""crossrank: online cross-encoder re-ranking."""

__version__ = "0.1.0"
