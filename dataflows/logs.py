"""Structured logs: one JSON object per line, ``extra`` fields included.

    >>> import logging, io
    >>> stream = io.StringIO()
    >>> handler = logging.StreamHandler(stream); handler.setFormatter(JsonFormatter())
    >>> log = logging.getLogger("doc"); log.addHandler(handler); log.propagate = False
    >>> log.warning("sink retry", extra={"attempt": 2})
    >>> '"attempt":2' in stream.getvalue() and '"msg":"sink retry"' in stream.getvalue()
    True
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone

import msgspec

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode() if _is_encodable(entry) else repr(entry)


def _is_encodable(entry: dict) -> bool:
    try:
        _encoder.encode(entry)
    except (TypeError, msgspec.EncodeError):
        return False
    return True


def configure_logging() -> None:
    """JSON logs on stderr at ``LOG_LEVEL`` (default INFO), once per process."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())
