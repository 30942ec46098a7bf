"""Structured logs: one JSON object per line, so log pipelines need no parsing rules."""

from __future__ import annotations

import json
import logging
import sys
import time

MAX_CAUSES = 1024
"""Causes remembered by a Throttled logger; past that the memory starts over."""


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class Throttled:
    """A logger that writes each cause at most once per `interval` seconds, with the count of
    repeats it held back: a client sending the same bad request in a loop must not flood the
    log (each line is ~1 KB with a traceback) or the disk under it."""

    def __init__(self, name: str, interval: float = 60.0) -> None:
        self.logger = logging.getLogger(name)
        self.interval = interval
        self._last: dict[str, tuple[float | None, int]] = {}

    def warning(self, cause: str, message: str, *args: object) -> None:
        self._log(logging.WARNING, cause, message, args)

    def error(self, cause: str, message: str, *args: object, exc_info: bool = False) -> None:
        self._log(logging.ERROR, cause, message, args, exc_info)

    def _log(
        self, level: int, cause: str, message: str, args: tuple, exc_info: bool = False
    ) -> None:
        now = time.monotonic()
        last, held = self._last.get(cause, (None, 0))
        if last is not None and now - last < self.interval:
            self._last[cause] = (last, held + 1)
            return
        if len(self._last) >= MAX_CAUSES:
            self._last.clear()
        self._last[cause] = (now, 0)
        suffix = f" ({held} more like it in the last {self.interval:g} s)" if held else ""
        self.logger.log(level, message + suffix, *args, exc_info=exc_info)
