"""Shared fixtures: a tiny Llama built from a config (fast tests), and one load of the real default model.

The tiny model is a real ``LlamaForCausalLM`` with random weights and a word-level tokenizer over the
built-in dataset's vocabulary, saved as a Hugging Face folder, so tests exercise the same loading path as
a user's local model. The feature cache points at a per-session folder; the dequantized copy of the real
model is shared with the user's cache so it is built once per machine, not once per test run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

_SESSION_CACHE = None

# The device the model fixtures load on: the CPU unless LMTUNE_TEST_DEVICE says otherwise
# (``LMTUNE_TEST_DEVICE=cuda make test`` runs the same suite through the CUDA paths).
TEST_DEVICE = os.environ.get("LMTUNE_TEST_DEVICE", "cpu")


def pytest_configure(config):
    global _SESSION_CACHE
    import tempfile

    from lmtune.models import cache_dir

    shared_models = cache_dir() / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    _SESSION_CACHE = Path(tempfile.mkdtemp(prefix="lmtune-test-cache-"))
    (_SESSION_CACHE / "models").symlink_to(shared_models, target_is_directory=True)
    os.environ["LMTUNE_CACHE"] = str(_SESSION_CACHE)


def pytest_unconfigure(config):
    import shutil

    if _SESSION_CACHE is not None:
        (_SESSION_CACHE / "models").unlink(missing_ok=True)
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) and a word-level tokenizer, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lmtune.data import load_builtin

    words = set()
    for rec in load_builtin("reviews"):
        words.update(re.findall(r"\w+|[^\w\s]", rec["text"].lower()))
    words.update("review is this positive answer yes or no maybe the a text question sentence".split())
    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|end|>", "<|assistant|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                     eos_token="</s>", additional_special_tokens=specials[4:])
    hf_tok.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    import lmtune

    return lmtune.load_model(str(tiny_model_dir), device=TEST_DEVICE)


@pytest.fixture(scope="session")
def real_lm():
    """The real default model, loaded once for every end-to-end test."""
    import lmtune

    return lmtune.load_model(lmtune.DEFAULT_MODEL, device=TEST_DEVICE)


@pytest.fixture
def review_task():
    from lmtune.tasks import ClassificationTask

    return ClassificationTask("Review: {text}\nIs this review positive? Answer yes or no.",
                              {"negative": "no", "positive": "yes"})


def load_benchmark(name: str):
    """A script of ``benchmarks/`` imported as a module (they are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
