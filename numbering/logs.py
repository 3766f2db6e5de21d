"""JSON log lines for workers (``NUMBERING_LOG_FORMAT=json``).

One JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
and, when the line concerns one request, ``key``, ``sequence``, ``task_id`` and
``queue`` as fields of their own, so a log search for a request key finds every line
about it. Tracebacks go in ``exception``.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

__all__ = ["REQUEST_FIELDS", "JsonFormatter"]

#: Fields a log call may pass in ``extra=`` to tie the line to one request.
REQUEST_FIELDS = ("key", "sequence", "task_id", "queue")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in REQUEST_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)
