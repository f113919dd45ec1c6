"""Instruction (generation) tasks: records to prompts, training sequences with completion-only targets.

A :class:`GenerationTask` reads three record layouts, detected per record:

* ``instruction`` / ``input`` (optional) / ``output``;
* ``prompt`` / ``completion``;
* chat ``messages``: a list of ``{"role", "content"}``; every assistant turn is a training target, and
  for generation the prompt is everything before the final assistant turn (whose text is the reference);
* ``text`` alone: plain language modelling, every token a target (a held-out text's loss, or continued
  pre-training); a text longer than ``max_length`` is cut at the right.

An optional user ``template`` (``{field}`` placeholders) builds the user turn from any fields instead;
the answer then comes from ``output`` or ``completion``. Several references per record (for ROUGE/BLEU)
come from a ``references`` list, or from an ``output`` that is a list (its first item is trained on).

Formatting
----------
With ``chat`` (the default) and a tokenizer that has a chat template, the user turn and the answer are
rendered by that template. The answer's tokens are what the template puts after the generation prompt,
up to and *including* its end-of-turn token (SmolLM2's ``<|im_end|>``), trailing whitespace dropped: the
model must learn to end its turn, or generation never stops. Without a chat template the prompt is the
record's text laid out as ``### Instruction / ### Input / ### Response`` (or the raw ``prompt``), and the
tokenizer's EOS token is appended to the answer.

The prompt and the answer are tokenized **separately** and concatenated, because that is what the model
sees at generation time (the prompt alone, tokenized, then its own tokens); tokenizing the joined text
could merge tokens across the boundary and train on a split the model never produces.

The EOS/pad trap
----------------
Many tokenizers (SmolLM2's included) use the EOS token as the pad token. Masking the labels by
``ids == pad_token_id`` -- the common collator shortcut -- then also masks every real EOS, and the model
never learns to stop. Here the targets are an explicit per-token mask built from the record structure,
never from token values, so the end token is always a target and padding never is.

Truncation
----------
A sequence longer than ``max_length`` loses tokens from the left (the oldest context first); the final
answer is never cut. If the final answer alone does not fit, that record is a :class:`DataError`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from lmtune.data import Dataset, Template
from lmtune.errors import DataError, LmtuneError

ROLES = ("system", "user", "assistant")


@dataclass
class TrainSequence:
    """One training sequence: token ids, the per-token target mask, and the record's task tag."""

    ids: list[int]
    targets: list[bool]
    task: str = ""

    @property
    def n_targets(self) -> int:
        return sum(self.targets)


@dataclass
class Prompt:
    """A generation prompt: token ids and the record's references (possibly empty)."""

    ids: list[int]
    references: list[str] = field(default_factory=list)


@dataclass
class GenerationTask:
    """Instruction tuning: the model continues a prompt with an answer; the loss covers the answer only.

    Parameters
    ----------
    template : str or None
        User turn built from record fields, e.g. ``"Summarize:\\n{text}"``; the answer is the record's
        ``output`` or ``completion``. ``None`` reads the standard layouts (instruction/input/output,
        prompt/completion, messages).
    chat : bool
        Use the model's chat template when it has one.
    system : str or None
        A system turn put before every conversation that has none (chat only). ``None`` leaves the
        chat template's own default.
    max_length : int
        Longest training sequence, prompt and answer together, in tokens.
    task_field : str
        Record field naming the record's task in a multi-task mixture (reported per task).
    """

    template: str | None = None
    chat: bool = True
    system: str | None = None
    max_length: int = 1024
    task_field: str = "task"
    _template: Template | None = field(init=False, repr=False, default=None)

    def __post_init__(self):
        if self.template is not None:
            self._template = Template(self.template)
        if self.max_length < 8:
            raise LmtuneError("max_length must be at least 8 tokens")

    def to_dict(self) -> dict:
        return {"type": "generation", "template": self.template, "chat": self.chat, "system": self.system,
                "max_length": self.max_length, "task_field": self.task_field}

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationTask":
        return cls(**{k: v for k, v in d.items() if k != "type"})

    # -- records to turns -----------------------------------------------------------------------------

    def turns(self, record: dict, where: tuple[str, int]) -> list[dict]:
        """The record as a conversation: a list of ``{"role", "content"}`` (system turns included)."""
        if self._template is not None:
            user = self._template.render(self._template.values(record, where))
            answer = self._answer(record, where, ("output", "completion"))
            turns = [{"role": "user", "content": user}] + ([{"role": "assistant", "content": answer}]
                                                            if answer is not None else [])
        elif "messages" in record:
            turns = self._messages(record["messages"], where)
        elif "instruction" in record:
            instruction = _text(record, "instruction", where)
            extra = record.get("input")
            if extra is not None and not isinstance(extra, str):
                raise DataError("expected a string", where[0], where[1], "input")
            user = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
            answer = self._answer(record, where, ("output",))
            turns = [{"role": "user", "content": user, "_input": extra or "", "_instruction": instruction}]
            turns += [{"role": "assistant", "content": answer}] if answer is not None else []
        elif "prompt" in record:
            answer = self._answer(record, where, ("completion",))
            turns = [{"role": "user", "content": _text(record, "prompt", where), "_raw": True}]
            turns += [{"role": "assistant", "content": answer}] if answer is not None else []
        else:
            raise DataError("expected the fields instruction/output, prompt/completion or messages "
                            "(or give a --template)", where[0], where[1])
        if self.system is not None and turns[0]["role"] != "system":
            turns = [{"role": "system", "content": self.system}] + turns
        return turns

    def _answer(self, record: dict, where, names: tuple[str, ...]) -> str | None:
        for name in names:
            if name in record:
                v = record[name]
                if isinstance(v, list):
                    if not v or not all(isinstance(x, str) for x in v):
                        raise DataError("expected a string or a non-empty list of strings", where[0], where[1], name)
                    v = v[0]
                if not isinstance(v, str) or not v.strip():
                    raise DataError("expected a non-empty string", where[0], where[1], name)
                return v
        return None

    def _messages(self, messages, where) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise DataError("expected a non-empty list of {role, content} objects", where[0], where[1], "messages")
        out = []
        for j, m in enumerate(messages):
            name = f"messages[{j}]"
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"expected {{\"role\": one of {list(ROLES)}, \"content\": a string}}",
                                where[0], where[1], name)
            out.append({"role": m["role"], "content": m["content"]})
        if all(m["role"] != "user" for m in out):
            raise DataError("the conversation has no user turn", where[0], where[1], "messages")
        return out

    def references(self, record: dict, where: tuple[str, int]) -> list[str]:
        """Every reference answer of a record (empty when it has none: generation only)."""
        refs = record.get("references")
        if refs is not None:
            if isinstance(refs, str):
                refs = [refs]
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                raise DataError("expected a string or a non-empty list of strings", where[0], where[1], "references")
            return list(refs)
        for name in ("output", "completion"):
            v = record.get(name)
            if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
                return list(v)
            if isinstance(v, str):
                return [v]
        turns = record.get("messages")
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
            return [str(turns[-1].get("content", ""))]
        return []

    # -- turns to text and tokens ---------------------------------------------------------------------

    def _use_chat(self, tokenizer) -> bool:
        return self.chat and bool(getattr(tokenizer, "chat_template", None))

    def _render(self, tokenizer, turns: list[dict], open_answer: bool) -> str:
        """Text of ``turns``; with ``open_answer``, followed by the opening of an assistant turn."""
        if self._use_chat(tokenizer):
            clean = [{"role": t["role"], "content": t["content"]} for t in turns]
            return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=open_answer)
        # Plain layout, one exchange: [system] instruction [input] "### Response:" (or a raw prompt).
        if sum(t["role"] == "assistant" for t in turns) > (0 if open_answer else 1):
            raise LmtuneError("multi-turn conversations need the model's chat template (drop --no-chat)")
        text = "".join(t["content"] + "\n\n" for t in turns if t["role"] == "system")
        user = [t for t in turns if t["role"] == "user"]
        if len(user) != 1:
            raise LmtuneError("multi-turn conversations need the model's chat template (drop --no-chat)")
        u = user[0]
        if u.get("_raw"):
            return text + u["content"]
        if "_instruction" in u:
            text += f"### Instruction:\n{u['_instruction']}\n\n" + (f"### Input:\n{u['_input']}\n\n"
                                                                      if u["_input"].strip() else "")
        else:
            text += f"### Instruction:\n{u['content']}\n\n"
        return text + "### Response:\n"

    def _tokens(self, tokenizer, text: str, first: bool) -> list[int]:
        special = first and not self._use_chat(tokenizer)
        return tokenizer(text, add_special_tokens=special)["input_ids"] if text else []

    def _answer_tokens(self, tokenizer, turns_before: list[dict], answer: dict,
                       prompt_text: str) -> tuple[list[int], str]:
        """The answer's tokens, ending with the end-of-turn (chat) or EOS token, and the text they stand for."""
        if self._use_chat(tokenizer):
            full = self._render(tokenizer, turns_before + [answer], open_answer=False)
            if not full.startswith(prompt_text):
                raise LmtuneError("the chat template does not render a conversation as its prompt followed by the "
                                  "answer; use --no-chat or a --template")
            tail = full[len(prompt_text):].rstrip()
            ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
            if not ids or ids[-1] not in end_token_ids(tokenizer):
                eos = tokenizer.eos_token_id
                ids = ids + ([eos] if eos is not None else [])
            return ids, tail
        raw = bool(turns_before and turns_before[0].get("_raw"))
        ids = tokenizer(answer["content"] if raw else answer["content"].strip(), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is None:
            raise LmtuneError("the tokenizer has no EOS token: the model could not learn to end an answer")
        return ids + [tokenizer.eos_token_id], answer["content"]

    def sequence(self, tokenizer, record: dict, where: tuple[str, int]) -> tuple[TrainSequence, bool]:
        """The training sequence of one record (every assistant turn a target) and whether it was cut."""
        if self._is_text(record):
            ids = tokenizer(_text(record, "text", where), add_special_tokens=True)["input_ids"]
            cut = len(ids) > self.max_length
            ids = ids[:self.max_length]
            tag = record.get(self.task_field)
            return TrainSequence(ids, [True] * len(ids), str(tag) if tag is not None else ""), cut
        turns = self.turns(record, where)
        if turns[-1]["role"] != "assistant":
            raise DataError("a training record needs an answer (output, completion, or a final assistant "
                            "message)", where[0], where[1])
        ids: list[int] = []
        targets: list[bool] = []
        consumed = ""  # the text the tokens so far stand for
        for i, t in enumerate(turns):
            if t["role"] != "assistant":
                continue
            prompt_text = self._render(tokenizer, turns[:i], open_answer=True)
            if not prompt_text.startswith(consumed):
                raise LmtuneError("the chat template renders earlier turns differently once later turns are added; "
                                  "multi-turn training needs a template that only appends (or use --no-chat)")
            context = self._tokens(tokenizer, prompt_text[len(consumed):], first=not ids)
            answer, answer_text = self._answer_tokens(tokenizer, turns[:i], t, prompt_text)
            ids += context + answer
            targets += [False] * len(context) + [True] * len(answer)
            if self._use_chat(tokenizer):
                consumed = prompt_text + answer_text  # exactly the text the tokens so far stand for
        cut = False
        if len(ids) > self.max_length:
            last_answer = len(targets) - targets[::-1].index(False) if False in targets else 0
            if len(ids) - last_answer >= self.max_length:
                raise DataError(f"the answer alone is longer than max_length={self.max_length} tokens; raise "
                                "--max-length", where[0], where[1])
            ids, targets, cut = ids[-self.max_length:], targets[-self.max_length:], True
        tag = record.get(self.task_field)
        return TrainSequence(ids, targets, str(tag) if tag is not None else ""), cut

    def encode(self, tokenizer, data: Dataset, default_task: str = "") -> list[TrainSequence]:
        """Training sequences for every record (all validated up front); cut ones are counted and warned."""
        out, n_cut = [], 0
        for i, rec in enumerate(data.records):
            seq, cut = self.sequence(tokenizer, rec, data.where(i))
            seq.task = seq.task or default_task
            out.append(seq)
            n_cut += cut
        if n_cut:
            warnings.warn(f"{data.path}: {n_cut} of {len(data)} records were longer than max_length="
                          f"{self.max_length} tokens and lost context tokens from the left", stacklevel=2)
        return out

    def _is_text(self, record: dict) -> bool:
        return self._template is None and "text" in record and not {"instruction", "prompt", "messages"} & set(record)

    def prompt(self, tokenizer, record: dict, where: tuple[str, int]) -> Prompt:
        """The generation prompt of a record: every turn before its final answer, with the answer opened."""
        if self._is_text(record):
            raise DataError("a plain text record (language modelling) has no prompt to generate from", *where, "text")
        turns = self.turns(record, where)
        if turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        ids = self._tokens(tokenizer, self._render(tokenizer, turns, open_answer=True), first=True)
        if len(ids) > self.max_length:
            ids = ids[-self.max_length:]
        return Prompt(ids, self.references(record, where))

    def prompts(self, tokenizer, data: Dataset) -> list[Prompt]:
        return [self.prompt(tokenizer, rec, data.where(i)) for i, rec in enumerate(data.records)]


def end_token_ids(tokenizer) -> set[int]:
    """Tokens that end an answer: EOS and, for chat models, the end-of-turn token."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(int(tid))
    return ids


def _text(record: dict, name: str, where) -> str:
    v = record.get(name)
    if not isinstance(v, str) or not v.strip():
        raise DataError("expected a non-empty string", where[0], where[1], name)
    return v


def task_from_dict(d: dict):
    """A task from its card entry, classification or generation."""
    from lmtune.tasks import ClassificationTask

    return GenerationTask.from_dict(d) if d.get("type") == "generation" else ClassificationTask.from_dict(d)
