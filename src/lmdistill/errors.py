"""Errors users see. Each one says what is wrong, where (file, line, key) and how to fix it."""

from __future__ import annotations

from pathlib import Path


class LmdistillError(Exception):
    """Base class: the CLI prints these as one clear message, without a traceback."""


class DataError(LmdistillError):
    """Bad input data, located by file, line and field where they are known."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.hint = hint
        where = []
        if self.path is not None:
            where.append(self.path if line is None else f"{self.path}:{line}")
        if field is not None:
            where.append(f"field '{field}'")
        text = (", ".join(where) + ": " if where else "") + message
        if hint:
            text += f" ({hint})"
        super().__init__(text)


class ConfigError(LmdistillError):
    """An invalid configuration, named by its key path (e.g. ``train.lr``)."""
