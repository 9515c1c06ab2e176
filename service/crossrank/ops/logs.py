"""Log output: text for people, JSON lines for log pipelines (``log_format``), both carrying the
id of the request a record was logged for.

The request id is the one thing kept in a context variable: it labels log records written
anywhere while a request is served (a library's warning included), which no argument could
reach. Nothing a request holds or needs travels this way.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson

LogFormat = Literal["text", "json"]

# Set by the HTTP layer for the time a request is served (crossrank.http.context).
current_request_id: ContextVar[str | None] = ContextVar("crossrank_request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being served, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id.get()
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a caller passed as ``extra={"fields": {...}}``."""
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, the record's fields,
    and the traceback of an exception (in the log only: no response ever carries one)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        line.update(_fields(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            text += f" id={request_id}"
        return text + "".join(f" {k}={v}" for k, v in _fields(record).items())


def handler(log_format: LogFormat, stream: TextIO = sys.stderr) -> logging.Handler:
    out = logging.StreamHandler(stream)
    out.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    out.addFilter(RequestIdFilter())
    return out


def configure(log_format: LogFormat) -> None:
    """Every logger (uvicorn's included) writes through one handler on the root logger, and so
    do Python's warnings, which would otherwise print plain text to stderr."""
    logging.basicConfig(level=logging.INFO, handlers=[handler(log_format)], force=True)
    logging.captureWarnings(True)
