"""Tasks turn records into token ids and targets: label-token classification.

A classification task is a prompt template, a map from label values to label words, and the choice of
applying the model's chat template. The model answers by its next token: each label is scored by the
logit of the first token of its word at the last prompt position, so the label words must start with
distinct tokens (checked up front).

Over-long prompts are shortened by cutting tokens from the *left* of the longest template field (the
record text), so the instruction and the question that follow it survive; the number of records
shortened is reported, never hidden.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from lmtune.data import Dataset, Template
from lmtune.errors import DataError, LmtuneError


def label_key(value) -> str:
    """Canonical string of a label value: ``1``, ``1.0`` and ``"1"`` are the same label."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def parse_label_words(spec: "str | dict | list") -> dict[str, str]:
    """``"0=no,1=yes"``, ``{"0": "no", "1": "yes"}`` or ``[("0", "no"), ...]`` to an ordered dict."""
    if isinstance(spec, str):
        pairs = []
        for part in spec.split(","):
            if "=" not in part:
                raise LmtuneError(f"--label-words: expected LABEL=WORD pairs separated by commas, got {part!r}")
            k, v = part.split("=", 1)
            pairs.append((k, v))
    elif isinstance(spec, dict):
        pairs = list(spec.items())
    else:
        pairs = list(spec)
    out: dict[str, str] = {}
    for k, v in pairs:
        k = label_key(k)
        if not k or not str(v).strip():
            raise LmtuneError(f"--label-words: empty label or word in {k!r}={v!r}")
        if k in out:
            raise LmtuneError(f"--label-words: label {k!r} is given twice")
        out[k] = str(v).strip()
    if len(out) < 2:
        raise LmtuneError("--label-words: a classification task needs at least two labels")
    return out


@dataclass
class Encoded:
    """Token ids of a dataset's prompts and, when labeled, the class index of each record.

    Attributes
    ----------
    input_ids : list of list of int
        One prompt per record, in record order.
    y : np.ndarray or None
        (N,) int64 class indices, or None for unlabeled data.
    n_truncated : int
        How many prompts were shortened to fit ``max_length``.
    """

    input_ids: list[list[int]]
    y: np.ndarray | None
    n_truncated: int = 0


@dataclass
class ClassificationTask:
    """Label-token classification.

    Parameters
    ----------
    template : str
        Prompt with ``{field}`` placeholders, e.g. ``"Review: {text}\\nIs this review positive?"``.
    label_words : str or dict
        Label value to answer word, e.g. ``"0=no,1=yes"``; the order fixes the class indices.
    label_field : str
        The record field holding the label.
    chat : bool
        Wrap the prompt in the model's chat template (when it has one) as a user turn and open the
        assistant turn, so the label word is the first token of the answer.
    max_length : int
        Longest prompt in tokens; longer ones lose tokens from the left of their longest field.
    """

    template: str
    label_words: "str | dict"
    label_field: str = "label"
    chat: bool = True
    max_length: int = 512
    _template: Template = field(init=False, repr=False)

    def __post_init__(self):
        self._template = Template(self.template)
        self.label_words = parse_label_words(self.label_words)
        if self.max_length < 8:
            raise LmtuneError("max_length must be at least 8 tokens")

    @property
    def labels(self) -> list[str]:
        return list(self.label_words)

    @property
    def n_classes(self) -> int:
        return len(self.label_words)

    def to_dict(self) -> dict:
        return {"type": "classification", "template": self.template, "label_words": dict(self.label_words),
                "label_field": self.label_field, "chat": self.chat, "max_length": self.max_length}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassificationTask":
        d = {k: v for k, v in d.items() if k != "type"}
        return cls(**d)

    # -- tokens ---------------------------------------------------------------------------------------

    def label_token_ids(self, tokenizer) -> list[int]:
        """First token of each label word; distinct across labels or a clear error."""
        ids, multi = [], []
        for label, word in self.label_words.items():
            toks = tokenizer.encode(word, add_special_tokens=False)
            if not toks:
                raise LmtuneError(f"--label-words: the word {word!r} for label {label!r} tokenizes to nothing")
            if len(toks) > 1:
                multi.append(word)
            ids.append(toks[0])
        seen: dict[int, str] = {}
        for (label, word), t in zip(self.label_words.items(), ids):
            if t in seen:
                raise LmtuneError(
                    f"--label-words: {word!r} (label {label!r}) and {self.label_words[seen[t]]!r} (label {seen[t]!r}) "
                    f"start with the same token {tokenizer.convert_ids_to_tokens(t)!r}; choose words whose first "
                    "tokens differ")
            seen[t] = label
        if multi:
            warnings.warn(f"label words {multi} span several tokens; only their first token is scored", stacklevel=2)
        return ids

    def targets(self, data: Dataset) -> np.ndarray:
        """(N,) class index per record; an absent or unknown label is a DataError at its line."""
        index = {k: i for i, k in enumerate(self.label_words)}
        y = np.empty(len(data), dtype=np.int64)
        for i, rec in enumerate(data.records):
            value = rec.get(self.label_field)
            # An empty CSV cell is an absent label, as an empty field is for the template.
            key = None if value is None else label_key(value)
            if not key:
                raise DataError(f"missing label (expected one of {self.labels})", *data.where(i), self.label_field)
            if key not in index:
                raise DataError(f"unknown label {key!r}: expected one of {self.labels} (from --label-words)",
                                *data.where(i), self.label_field)
            y[i] = index[key]
        return y

    def prompt(self, tokenizer, values: dict[str, str]) -> list[int]:
        text = self._template.render(values)
        if self.chat and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer(text, add_special_tokens=True)["input_ids"]

    def encode(self, tokenizer, data: Dataset, labeled: bool = True, progress: bool = False) -> Encoded:
        """Validate every record up front, then tokenize the prompts (shortening over-long ones)."""
        from tqdm.auto import tqdm

        values = [self._template.values(rec, data.where(i)) for i, rec in enumerate(data.records)]
        y = self.targets(data) if labeled else None
        ids, n_trunc = [], 0
        for i, v in enumerate(tqdm(values, desc="tokenize", unit="prompt", disable=not progress, leave=False)):
            toks = self.prompt(tokenizer, v)
            if len(toks) > self.max_length:
                toks = self._shorten(tokenizer, v, len(toks), data.where(i))
                n_trunc += 1
            ids.append(toks)
        if n_trunc:
            warnings.warn(f"{data.path}: {n_trunc} of {len(data)} prompts were longer than max_length="
                          f"{self.max_length} tokens and lost tokens from the left of their longest field",
                          stacklevel=2)
        return Encoded(ids, y, n_trunc)

    def _shorten(self, tokenizer, values: dict[str, str], length: int, where) -> list[int]:
        name = max(values, key=lambda k: len(values[k]))
        field_ids = tokenizer.encode(values[name], add_special_tokens=False)
        excess = length - self.max_length
        # Re-tokenization at the cut can merge differently, so cut, check, and cut a little more if needed.
        for _ in range(8):
            keep = len(field_ids) - excess
            if keep <= 0:
                raise DataError(f"the prompt does not fit max_length={self.max_length} tokens even with this "
                                "field emptied; raise --max-length or shorten the template", where[0], where[1], name)
            v = dict(values, **{name: tokenizer.decode(field_ids[-keep:])})
            toks = self.prompt(tokenizer, v)
            if len(toks) <= self.max_length:
                return toks
            excess += len(toks) - self.max_length
        raise DataError(f"could not shorten the prompt to {self.max_length} tokens", where[0], where[1], name)
