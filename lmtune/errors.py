"""Errors a person can act on: the CLI prints them as one line and exits non-zero, without a traceback."""

from __future__ import annotations


class LmtuneError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class DataError(LmtuneError, ValueError):
    """Bad input data, located by file, line and field.

    Parameters
    ----------
    message : str
        What is wrong and what was expected.
    path : str, optional
        The file.
    line : int, optional
        1-based line number (for CSV, the physical line of the record, counting the header as line 1).
    field : str, optional
        The record field concerned.
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.path, self.line, self.field, self.reason = path, line, field, message
        where = []
        if path is not None:
            where.append(str(path) + (f":{line}" if line is not None else ""))
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__((", ".join(where) + ": " if where else "") + message)
