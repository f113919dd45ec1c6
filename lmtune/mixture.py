"""Multi-task mixing: several datasets trained together, with sampling weights, each record tagged by task.

A mixture is written ``"summarize.jsonl:2,translate.jsonl:1"``: each part is a data source (a file or
``builtin:NAME:SPLIT``) with an optional weight after its last colon. Without weights the mixture is
*proportional* (every record once per epoch, as if the files were concatenated).

With weights, an epoch still has as many examples as all parts together, ``N = sum(n_t)``, and part ``t``
supplies ``round(N * w_t / sum(w))`` of them: a small part with a large weight is repeated (reshuffled
each time it runs out), a large part with a small weight is subsampled. The draw is seeded and fixed for
the run (so a resumed run sees the same examples); the realised counts go into the run card.

Each record's task tag is its ``task`` field when it has one, else the name of its part (the file
stem, or the built-in name): per-task losses are reported under these tags.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmtune.data import Dataset, open_data
from lmtune.errors import LmtuneError


@dataclass
class Part:
    name: str
    data: Dataset
    weight: float | None


class Mixture:
    """Datasets with sampling weights (``None`` weights: proportional)."""

    def __init__(self, parts: list[Part]):
        if not parts:
            raise LmtuneError("a mixture needs at least one dataset")
        weighted = [p.weight is not None for p in parts]
        if any(weighted) and not all(weighted):
            raise LmtuneError("give a weight to every part of the mixture or to none "
                              f"(got {', '.join(f'{p.name}:{p.weight}' for p in parts)})")
        self.parts = parts
        self._seqs_of: list[int] = []

    @property
    def weighted(self) -> bool:
        return self.parts[0].weight is not None

    def __len__(self) -> int:
        return sum(len(p.data) for p in self.parts)

    def encode(self, task, tokenizer) -> list:
        """Training sequences of every part, in part order; each tagged with its task."""
        out = []
        for p in self.parts:
            out += task.encode(tokenizer, p.data, default_task=p.name)
        return out

    def order(self, seed: int) -> list[int]:
        """Indices into :meth:`encode`'s list making up one epoch's examples (see the module doc)."""
        sizes = [len(p.data) for p in self.parts]
        starts = np.cumsum([0] + sizes[:-1])
        if not self.weighted:
            return list(range(sum(sizes)))
        total, wsum = sum(sizes), sum(p.weight for p in self.parts)
        rng = np.random.default_rng(seed)
        out: list[int] = []
        for p, n, s in zip(self.parts, sizes, starts):
            count = int(round(total * p.weight / wsum))
            reps = -(-count // n) if count else 0
            draws = np.concatenate([rng.permutation(n) for _ in range(reps)])[:count] if reps else []
            out += [int(s + d) for d in draws]
        if not out:
            raise LmtuneError("the mixture weights leave no examples to train on")
        return out

    def describe(self, order: list[int]) -> list[dict]:
        """Per part: its name, records, weight and how many examples an epoch draws from it."""
        sizes = [len(p.data) for p in self.parts]
        bounds = np.cumsum(sizes)
        drawn = np.bincount(np.searchsorted(bounds, np.asarray(order), side="right"), minlength=len(sizes))
        return [{"name": p.name, "path": p.data.path, "records": n, "weight": p.weight, "per_epoch": int(d)}
                for p, n, d in zip(self.parts, sizes, drawn)]

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for p in self.parts:
            h.update(f"{p.name}:{p.weight}:{p.data.content_hash()}\n".encode())
        return h.hexdigest()


def _part_name(source: str) -> str:
    if source.startswith("builtin:"):
        return source.split(":")[1]
    return Path(source).stem


def parse_mixture(spec: str) -> Mixture:
    """``"a.jsonl:2,b.jsonl:1"`` (or one source without a weight) to a :class:`Mixture`, data read."""
    parts, names = [], set()
    for item in (x.strip() for x in str(spec).split(",")):
        if not item:
            raise LmtuneError(f"empty entry in the data list {spec!r}")
        source, weight = item, None
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:
                weight = None
            else:
                source = head
                if not weight > 0:
                    raise LmtuneError(f"{item!r}: a sampling weight must be a positive number")
        name = _part_name(source)
        while name in names:  # two files with one stem: keep both apart
            name += "'"
        names.add(name)
        parts.append(Part(name, open_data(source), weight))
    return Mixture(parts)


def as_mixture(data) -> Mixture:
    """A Mixture from a Mixture, a Dataset (one part) or a spec string."""
    if isinstance(data, Mixture):
        return data
    if isinstance(data, Dataset):
        return Mixture([Part(_part_name(data.path) if data.path != "<memory>" else "data", data, None)])
    return parse_mixture(data)
