"""Read and validate labeled records (JSONL, CSV, TSV), fill prompt templates, write JSON lines.

Every record keeps the file and line it came from, so a problem found later (a missing field, an unknown
label) is reported where the user can fix it. Nothing here knows about models or tokens: see
:mod:`lmtune.tasks` for that.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from lmtune.errors import DataError, LmtuneError

BUILTIN_DATASETS = {"reviews": "reviews.jsonl", "instruct": "instruct.jsonl", "heldtext": "heldtext.jsonl",
                    "mcqa": "mcqa.jsonl"}


@dataclass
class Dataset:
    """Records read from one source, each with the 1-based line it started on.

    Attributes
    ----------
    records : list of dict
    lines : list of int
        ``lines[i]`` is where ``records[i]`` starts in ``path`` (for in-memory data, ``i + 1``).
    path : str
        The file, or a name such as ``"<memory>"``.
    """

    records: list[dict]
    lines: list[int]
    path: str = "<memory>"

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def __getitem__(self, i: int) -> dict:
        return self.records[i]

    @classmethod
    def from_records(cls, records: Iterable[dict], name: str = "<memory>") -> "Dataset":
        recs = []
        for i, r in enumerate(records):
            # Check before copying: dict() of a string or a list of pairs would fail, or succeed, obscurely.
            if not isinstance(r, Mapping):
                raise DataError(f"expected a mapping of field names to values, got {type(r).__name__}", name, i + 1)
            recs.append(dict(r))
        if not recs:
            raise DataError("no records", name)
        return cls(recs, list(range(1, len(recs) + 1)), name)

    def subset(self, indices: Iterable[int]) -> "Dataset":
        idx = list(indices)
        return Dataset([self.records[i] for i in idx], [self.lines[i] for i in idx], self.path)

    def where(self, i: int) -> tuple[str, int]:
        return self.path, self.lines[i]

    def content_hash(self) -> str:
        """SHA-256 of the records' canonical JSON: equal data, equal hash, whatever the file format."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
            h.update(b"\n")
        return h.hexdigest()


def read_records(path: str | Path) -> Dataset:
    """Read a ``.jsonl`` (one JSON object a line), ``.csv`` or ``.tsv`` file (a header row of field names).

    Raises
    ------
    DataError
        The file is missing, empty or not UTF-8, a line is not a JSON object, or a CSV row is malformed
        or has the wrong number of columns; the message names the file and line.
    """
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", str(p))
    if not p.is_file():
        raise DataError("not a file", str(p))
    suffix = p.suffix.lower()
    if suffix in {".jsonl", ".ndjson", ".json"}:
        ds = _read_jsonl(p, _read_text(p))
    elif suffix in {".csv", ".tsv"}:
        ds = _read_csv(p, _read_text(p), "\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(f"unknown file type {suffix!r}: expected .jsonl, .csv or .tsv", str(p))
    if not ds.records:
        raise DataError("the file has no records", str(p))
    return ds


def _read_text(p: Path) -> str:
    """The whole file as text: UTF-8, a leading byte-order mark dropped (spreadsheets write one)."""
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the file ({e.strerror})", str(p)) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # Decoding the whole file at once (not line by line) is what lets the error name its line.
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8", str(p),
                        line) from None


def _read_jsonl(p: Path, text: str) -> Dataset:
    records, lines = [], []
    # newline=None splits lines as a text-mode file does (\n, \r\n, \r) and, unlike str.splitlines,
    # not at U+2028 or other separators that JSON strings may hold unescaped.
    with io.StringIO(text, newline=None) as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg} at column {e.colno}); expected one JSON object per line",
                                str(p), n) from None
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object, got {type(obj).__name__}", str(p), n)
            records.append(obj)
            lines.append(n)
    return Dataset(records, lines, str(p))


def _read_csv(p: Path, text: str, delimiter: str) -> Dataset:
    records, lines = [], []
    kind = "TSV" if delimiter == "\t" else "CSV"
    # strict: a quote left open or text after a closing quote is an error, not a record silently
    # swallowing the lines after it.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header, start = None, 1
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                start = reader.line_num + 1
                continue
            if header is None:
                header = [h.strip() for h in row]
                if len(set(header)) != len(header) or any(not h for h in header):
                    raise DataError("the header row must name every column once", str(p), start)
            elif len(row) != len(header):
                raise DataError(f"expected {len(header)} columns ({', '.join(header)}), found {len(row)}",
                                str(p), start)
            else:
                records.append(dict(zip(header, row)))
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"not valid {kind} ({e}) in the record that starts on this line", str(p), start) from None
    return Dataset(records, lines, str(p))


def load_builtin(name: str = "reviews", split: str | None = None) -> Dataset:
    """The embedded dataset ``name`` (see ``lmtune/datasets/README.md``), optionally one ``split``."""
    if name not in BUILTIN_DATASETS:
        raise LmtuneError(f"unknown built-in dataset {name!r}: expected one of {sorted(BUILTIN_DATASETS)}")
    with resources.as_file(resources.files("lmtune.datasets") / BUILTIN_DATASETS[name]) as path:
        ds = read_records(path)
    ds.path = f"builtin:{name}"
    if split is None:
        return ds
    idx = [i for i, r in enumerate(ds.records) if r.get("split") == split]
    if not idx:
        raise LmtuneError(f"built-in dataset {name!r} has no split {split!r}")
    return ds.subset(idx)


def open_data(spec: str | Path) -> Dataset:
    """A file path, or ``builtin:NAME[:SPLIT]`` for an embedded dataset."""
    s = str(spec)
    if s.startswith("builtin:"):
        parts = s.split(":")
        if len(parts) > 3:
            raise LmtuneError(f"{s!r}: expected builtin:NAME or builtin:NAME:SPLIT")
        return load_builtin(parts[1], parts[2] if len(parts) > 2 else None)
    return read_records(s)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write one JSON object a line to ``path``, atomically.

    The lines go to a temporary file beside ``path`` that is renamed over it only once every row is
    written, so a failure part-way (bad data found while ``rows`` is consumed, a full disk) leaves an
    existing ``path`` as it was and no partial file behind.

    Raises
    ------
    LmtuneError
        ``path`` is a folder.
    """
    from lmtune.runs import atomic_write

    def write(tmp):
        with open(tmp, "x", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return atomic_write(path, write)


@dataclass(frozen=True)
class Template:
    """A prompt with ``{field}`` placeholders filled from a record (``{{`` and ``}}`` for literal braces).

    Attributes
    ----------
    text : str
    fields : tuple of str
        The placeholder names, in order of first appearance.
    """

    text: str
    fields: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        names = []
        try:
            parsed = list(string.Formatter().parse(self.text))
        except ValueError as e:
            raise LmtuneError(f"bad template {self.text!r}: {e}") from None
        for _, name, spec, conv in parsed:
            if name is None:
                continue
            if not name.isidentifier() or spec or conv:
                raise LmtuneError(f"bad template placeholder {{{name}}}: use plain field names such as {{text}}")
            if name not in names:
                names.append(name)
        if not names:
            raise LmtuneError(f"the template {self.text!r} has no {{field}} placeholder")
        object.__setattr__(self, "fields", tuple(names))

    def values(self, record: dict, where: tuple[str, int] = ("<memory>", 0)) -> dict[str, str]:
        """The record's values for the template fields, as strings; a missing or empty field is a DataError."""
        out = {}
        for name in self.fields:
            v = record.get(name)
            if v is None or (isinstance(v, str) and not v.strip()):
                raise DataError(f"missing or empty; the template needs {{{name}}}", where[0], where[1], name)
            out[name] = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        return out

    def render(self, values: dict[str, str]) -> str:
        return self.text.format(**values)
