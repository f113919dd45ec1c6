"""LoRA training throughput and memory: lmtune's training loop vs HF PEFT with the transformers ``Trainer``.

LoRA r=8, alpha=16, dropout 0.05 on ``q_proj`` and ``v_proj`` of the default model (SmolLM2-135M-Instruct,
float32), batch 8, the same records, seed and number of optimizer steps, the same torch thread count. Every
side runs in its **own subprocess**, so its peak resident memory is its own: imports, model load,
activations, optimizer. ``peak_rss_bytes`` is the process's high-water mark (``VmHWM``) over its whole
life up to the end of training; ``training_peak_rss_bytes`` the high-water mark from the start of training
(reset with ``/proc/self/clear_refs`` on every side, as lmtune's own ``PeakMemory`` does inside ``fit``).

* ``lmtune``: ``LoraClassifier(lm, task, rank=8, alpha=16, target="q_proj,v_proj", batch_size=8,
  epochs=1, max_steps=S).fit(records)``: lmtune's loop (``lmtune.training.train``) with its default
  length grouping; the forward runs the backbone and forms only the K=2 label-token logits at each prompt's
  last position (``lmtune.methods.tuned``).
* ``lmtune_gc``: the same with ``gradient_checkpointing=True`` (activation checkpointing: each layer's
  activations are recomputed in the backward pass instead of kept), lmtune's memory-saving option.
* ``lmtune_ga2`` (only when asked for in ``--sides``): the same with ``grad_accum=2``, each batch of 8 run as
  two micro-batches of 4 whose gradients add up to the batch's (the same optimizer steps; the activations
  of half a batch live at a time): the other way to trade speed for memory.
* ``lmtune_budget`` (only when asked for in ``--sides``): the same with ``max_batch_tokens=--token-budget``
  (576 by default, 8 prompts of 72 tokens): only the batches whose padded size exceeds the budget run as
  micro-batches, so the peak follows the budget instead of the longest batch.
* ``peer_cls``, classification the HF way: ``get_peft_model(AutoModelForCausalLM, LoraConfig(same))`` and
  ``transformers.Trainer`` on the same chat-formatted prompts (lmtune's exact token ids from
  ``task.encode``) with the answer word's token appended; labels are -100 except at the answer token;
  ``DataCollatorForSeq2Seq`` pads (right, labels with -100). Its loss is the standard causal-LM loss, with
  full-vocabulary logits at every position. Sampling ``group_by_length`` (HF's ``LengthGroupedSampler``),
  the peer's closest equivalent of lmtune's default length grouping (``--peer-sampling random`` turns it
  off). Same optimizer settings as lmtune's defaults: AdamW, lr 1e-3, no weight decay, 6% warmup, cosine,
  gradient clipping at 1.0.
* ``peer_lm``, the plain LM objective: the same Trainer and adapter, full-vocabulary LM loss over
  fixed-length sequences of ``--seq-len`` (128) tokens: the train split's review texts, tokenized, joined
  with EOS and cut into chunks (``default_data_collator``, labels = input ids, random sampling).
* ``lmtune_lm``, the same objective through lmtune: ``LoraClassifier(lm, GenerationTask(), <same LoRA and
  optimizer settings>, max_steps=S).fit(chunks)``, where ``chunks`` is a ``Dataset`` of ``{"text": ...}``
  records, one per peer chunk. Each text is the chunk's ids decoded; the parent checks with the peer's
  tokenizer, and the child again with lmtune's, that ``GenerationTask`` tokenizes every text back to the
  chunk's exact ids (BPE need not round-trip an arbitrary cut; it does for every chunk here, so no
  library hook is needed). The loss is :mod:`lmtune.lm_loss`: the final hidden states at the 127
  positions that predict a token go through the output layer, and each record's mean NLL is averaged
  over the batch. The peer's loss is the mean over all target tokens of the batch; every chunk has 127
  targets, so the two are the same number (checked on one batch of the base model: ``loss_check``).
  Unlike classification, every position is a target here, so lmtune cannot skip the vocabulary head.

The records: ``S x 8`` records drawn at random (seeded) from the built-in reviews train split, so each
side runs exactly one epoch over the same records (``--steps 55`` is the whole 440-record split). The
first optimizer step of every side is warm-up (lazy initialisation, allocator growth; both samplers put
the longest batch first) and is left out of the headline rates; rates including it are reported too.

**Lockstep.** All four processes load their model, then sleep; the parent lets them take one optimizer
step each in turn (lmtune, lmtune_gc, peer_cls, lmtune_lm, peer_lm, lmtune, ...). A side steps while the others sleep on a pipe,
so they never compete for the cores, and load from elsewhere falls on all sides alike instead of on
whichever ran during a burst. A step's time runs from the parent's ``go`` to the end of the optimizer step
(lmtune: ``lmtune.training.train``'s ``on_step`` callback; peer: ``TrainerCallback.on_step_end``), so it
includes batching, padding, forward, backward, clipping and AdamW on both sides. For every step the share of
the machine's CPU used by *other* processes is read from ``/proc/stat``; a run where it exceeds 5% is
flagged invalid (``interference.valid``): on 2 cores one busy foreign process makes steps 3 to 8x slower.

Model FLOP utilisation: the peak float32 matmul rate of the machine is measured in the same run
(``torch.mm`` of 2048x2048, best of several, before and after the sides). The FLOPs of one training step
(forward + backward of one batch) are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the same
8 records for both sides of an objective (classification: lmtune's batch of median padded length; LM: the
first 8 chunks; lmtune: a one-step
``fit`` through its real code; peer: the PEFT model's forward with labels and ``loss.backward()``), divided
by that batch's padded tokens, and multiplied by the padded tokens of the timed steps:
MFU = FLOPs / seconds / peak. CPU SDPA attention (``_scaled_dot_product_flash_attention_for_cpu``) has no
formula in torch's counter; the benchmark adds one (the same as torch's for the other SDPA kernels).

Throughput is reported as examples/s, tokens/s (real, non-padding tokens), padded tokens/s and target
tokens/s (tokens the loss predicts: 1 per classification record, seq-len - 1 per LM chunk).

Goals (issue 3): on a classification epoch over real-length records, lmtune >= 2x the peer's examples/s
and <= 0.5x its peak memory; on the plain LM objective, >= 1.2x the peer's tokens/s (``lmtune_lm`` vs
``peer_lm``; both sides train on the same tokens, so tokens/s and target tokens/s give the same ratio).

Usage: .venv/bin/python benchmarks/bench_training.py [--quick] [--steps 20] [--lm-steps 10] [--seq-len 128]
       [--peer-sampling group_by_length|random] [--sides lmtune,lmtune_gc,peer_cls,lmtune_lm,peer_lm] [--threads N]
       [--wait-idle S] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_wait_idle, emit, log, loadavg, save, start  # noqa: E402

GOAL_SPEED = 2.0
GOAL_MEMORY = 0.5
GOAL_LM = 1.2
MAX_FOREIGN = 0.05  # timed steps with more CPU used by other processes than this make the run invalid
BATCH = 8
TEMPLATE = "Review: {text}\nIs this review positive? Answer yes or no."
LABEL_WORDS = {"negative": "no", "positive": "yes"}
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
LR, WARMUP, CLIP = 1e-3, 0.06, 1.0  # lmtune LoraClassifier's defaults, given to the peer too
ISSUE_PEER = {"tokens_per_s": 155, "peak_rss_bytes": 3.4e9,
              "what": "peer measured in the issue: full-vocabulary LM loss at sequence length 128"}
# the issue's three goals ("met"); the checkpointed variant's memory is reported beside them
ISSUE_GOALS = ("classification_speed", "classification_memory", "lm_objective_speed")
DEFAULT_OUT = REPO / "benchmarks" / "results" / "training.json"


# ----------------------------------------------------------------------------------------------------
# Shared by every process.

def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int | None:
    return _status_bytes("VmRSS")


def process_peak_rss() -> int:
    """Peak resident set size of this process so far: ``VmHWM``, or ``ru_maxrss`` where there is none."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark to the current RSS (Linux ``clear_refs``), as lmtune's own
    ``PeakMemory`` does around a fit; done on every side so that their training peaks mean the same."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_snapshot() -> dict:
    """Wall clock, this process's CPU seconds (all threads), and the whole machine's busy CPU seconds."""
    busy = None
    try:
        f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        v = [int(x) for x in f]
        busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        pass
    return {"wall": time.perf_counter(), "own_cpu": time.process_time(), "busy": busy}


def window(a: dict, b: dict) -> dict:
    """Seconds between two snapshots, and the share of the machine's CPUs that this process and
    *other* processes used meanwhile (the other benchmark sides sleep while one steps)."""
    wall = b["wall"] - a["wall"]
    own = b["own_cpu"] - a["own_cpu"]
    ncpu = os.cpu_count() or 1
    out = {"seconds": wall, "own_cpu_share": own / wall / ncpu if wall > 0 else None, "foreign_cpu_share": None}
    if a["busy"] is not None and b["busy"] is not None and wall > 0:
        out["foreign_cpu_share"] = max(0.0, (b["busy"] - a["busy"] - own) / wall / ncpu)
    return out


class Gate:
    """A child's side of the lockstep: report a message to the parent, then wait for its ``go``."""

    def __init__(self, fds: str):
        r, w = (int(x) for x in fds.split(","))
        self.r = os.fdopen(r, "r")
        self.w = os.fdopen(w, "w", buffering=1)

    def wait(self, msg: str) -> dict:
        self.w.write(msg + "\n")
        self.w.flush()
        line = self.r.readline()
        if line.strip() != "go":
            raise SystemExit(f"benchmark child: expected 'go' from the parent, got {line!r}")
        return cpu_snapshot()


def peak_matmul_gflops(n: int = 2048, repeats: int = 10) -> dict:
    """Best-of-``repeats`` float32 ``torch.mm`` rate of an n x n product, in GFLOP/s."""
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return {"n": n, "repeats": repeats, "best_s": best, "gflops": 2 * n ** 3 / best / 1e9}


def flop_counter():
    """``FlopCounterMode`` that also counts CPU SDPA attention (torch has no formula for its CPU kernel)."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:
        def sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)
        mapping[fwd] = sdpa_cpu  # FlopCounterMode shape-wraps custom formulas itself
    if bwd is not None:
        def sdpa_cpu_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
        mapping[bwd] = sdpa_cpu_bwd
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


def rates(steps: list[dict], flops_per_padded_token: float | None, peak_gflops: float | None) -> dict:
    """Throughput over the steps after the first (the headline) and over all steps, and MFU."""
    def block(part):
        secs = sum(s["seconds"] for s in part)
        ex, tok, pad, tgt = (sum(s.get(k, 0) for s in part)
                             for k in ("examples", "tokens", "padded_tokens", "target_tokens"))
        foreign = [s["foreign_cpu_share"] for s in part if s.get("foreign_cpu_share") is not None]
        own = [s["own_cpu_share"] for s in part if s.get("own_cpu_share") is not None]
        out = {"steps": len(part), "seconds": secs, "examples": ex, "tokens": tok, "padded_tokens": pad,
               "target_tokens": tgt, "examples_per_s": ex / secs, "tokens_per_s": tok / secs,
               "padded_tokens_per_s": pad / secs, "target_tokens_per_s": tgt / secs,
               "seconds_per_step": secs / len(part),
               "foreign_cpu_share_mean": sum(foreign) / len(foreign) if foreign else None,
               "foreign_cpu_share_max": max(foreign) if foreign else None,
               "own_cpu_share_mean": sum(own) / len(own) if own else None}
        if flops_per_padded_token:
            flops = flops_per_padded_token * pad
            out.update(flops=flops, flops_per_step=flops / len(part), achieved_gflops=flops / secs / 1e9,
                       mfu=flops / secs / 1e9 / peak_gflops if peak_gflops else None)
        return out

    timed = steps[1:] if len(steps) > 1 else steps
    return {"excluding_first_step": block(timed), "all_steps": block(steps)}


# ----------------------------------------------------------------------------------------------------
# Child: lmtune.

def child_lmtune(spec: dict, objective: str, gate: Gate, checkpointing: bool = False, grad_accum: int = 1,
                 max_batch_tokens: int | None = None) -> dict:
    """lmtune's side: ``objective`` "cls" (label-token classification) or "lm" (plain LM on text chunks);
    ``checkpointing``: with activation checkpointing; ``grad_accum``: micro-batches per batch;
    ``max_batch_tokens``: the token budget of a micro-batch."""
    import torch

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    import lmtune
    import lmtune.training as training
    from lmtune.data import Dataset, open_data
    from lmtune.instruct import GenerationTask
    from lmtune.methods import LoraClassifier
    from lmtune.tasks import ClassificationTask

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lm = lmtune.load_model(spec["model"])
    load_s = time.perf_counter() - t0
    rss_after_load = current_rss()
    if objective == "cls":
        task = ClassificationTask(TEMPLATE, LABEL_WORDS)
        ds = open_data(spec["data"]).subset(spec["indices"])
        seqs = task.encode(lm.tokenizer, ds).input_ids
        if seqs != spec["input_ids"]:
            raise SystemExit("lmtune child: token ids differ from the parent's")
        n_steps = spec["steps"]
        n_targets = [1] * len(seqs)  # the label token
    else:
        # Text records whose tokenization is exactly the peer's chunks (checked by the parent with the
        # peer's tokenizer, and here again with the tokenizer lmtune loaded): GenerationTask reads them as
        # plain language modelling, every token a target.
        task = GenerationTask()
        ds = Dataset.from_records([{"text": t} for t in spec["lm_texts"]], name="<benchmark chunks>")
        enc = task.encode(lm.tokenizer, ds)
        seqs = [s.ids for s in enc]
        if seqs != spec["lm_chunks"]:
            raise SystemExit("lmtune_lm child: GenerationTask's token ids differ from the peer's chunks")
        n_steps = spec["lm_steps"]
        n_targets = [sum(s.targets[1:]) for s in enc]  # token 0 has no context: not predicted (as the peer)

    # Step ends through train()'s public on_step callback: wrap lmtune.training.train, which the
    # estimator's fit looks up at call time (chaining any on_step it passes itself). After each step the
    # process sleeps until the parent lets it run the next one.
    starts: list[dict] = []
    ends: list[dict] = []
    plain_train = training.train

    def gated_train(*a, **kw):
        inner = kw.get("on_step")

        def on_step(step):
            ends.append(cpu_snapshot())
            if inner is not None:
                inner(step)
            if step < n_steps:
                starts.append(gate.wait("step"))
            else:
                gate.wait("finished")

        kw["on_step"] = on_step
        return plain_train(*a, **kw)

    kw = dict(rank=LORA["r"], alpha=LORA["lora_alpha"], dropout=LORA["lora_dropout"],
              target=",".join(LORA["target_modules"]), batch_size=BATCH, epochs=1, lr=LR, warmup=WARMUP,
              clip=CLIP, seed=spec["seed"], progress=False, gradient_checkpointing=checkpointing,
              grad_accum=grad_accum, max_batch_tokens=max_batch_tokens)
    peak_before = process_peak_rss()
    starts.append(gate.wait("ready"))
    reset_peak_rss()
    training.train = gated_train
    try:
        est = LoraClassifier(lm, task, max_steps=n_steps, **kw).fit(ds)
    finally:
        training.train = plain_train
    training_peak = process_peak_rss()
    info = est.fit_info_
    hist = info["train"]["history"]
    steps = info["train"]["steps"]
    if len(ends) != steps or steps != n_steps:
        raise SystemExit(f"lmtune child: {len(ends)} step-end times, {steps} steps run, {n_steps} asked")
    step_windows = [window(a, b) for a, b in zip(starts, ends)]
    # Step 1's window also holds fit's set-up (adapter injection); its own time is the loop's (the
    # history's seconds count only the steps themselves) minus the later steps.
    loop_s = sum(h["seconds"] for h in hist)
    step_windows[0]["seconds"] = loop_s - sum(w["seconds"] for w in step_windows[1:])
    # The batches the loop ran: a pure function of (seed, epoch, lengths).
    lengths = [len(s) for s in seqs]
    batches = training.batch_order(len(seqs), BATCH, spec["seed"], 0, lengths)[:steps]
    for w, b in zip(step_windows, batches):
        w.update(examples=len(b), tokens=sum(lengths[i] for i in b), padded_tokens=len(b) * max(lengths[i] for i in b),
                 target_tokens=sum(n_targets[i] for i in b))

    # FLOPs of one training step, through lmtune's real code, on the same batch of 8 records as the peer.
    fb = spec["flop_batch"] if objective == "cls" else list(range(min(BATCH, len(seqs))))
    with flop_counter() as fc:
        LoraClassifier(lm, task, max_steps=1, **kw).fit(ds.subset(fb))
    flops = fc.get_total_flops()
    padded = len(fb) * max(lengths[i] for i in fb)
    loss_check = _loss_check(lm, [seqs[i] for i in fb]) if objective == "lm" else None
    return {
        "import_s": import_s, "model_load_s": load_s,
        "train_seconds_lmtune": info["train_seconds"], "history": hist,
        "trainable_params": info["trainable_params"], "steps": steps, "step_windows": step_windows,
        "peak_rss_bytes": max(peak_before, training_peak), "training_peak_rss_bytes": training_peak,
        "peak_rss_before_training_bytes": peak_before, "rss_after_load_bytes": rss_after_load,
        "fit_info_peak_rss_bytes": info.get("peak_rss_bytes"),
        "flop_step": {"records": fb, "padded_tokens": padded, "flops": flops,
                      "flops_per_padded_token": flops / padded},
        "torch_threads": torch.get_num_threads(), "final_train_loss": hist[-1]["train_loss"],
        "objective": objective, "loss_check": loss_check,
    }


def _loss_check(lm, batch: list[list[int]]) -> dict:
    """lmtune's LM loss (mean over records of each record's mean target NLL, :mod:`lmtune.lm_loss`) and
    transformers' (mean over all target tokens, ``model(input_ids, labels=input_ids).loss``) on one batch
    of the base model, in eval mode. For sequences of equal length every record has the same number of
    targets, so the two means are the same number; this measures how close they come in float32."""
    import torch

    from lmtune.lm_loss import completion_losses

    was = lm.model.training
    lm.model.eval()
    try:
        with torch.no_grad():
            per_record = completion_losses(lm, batch, [[True] * len(s) for s in batch])
            ids = torch.tensor(batch, device=lm.device)
            token_mean = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    finally:
        lm.model.train(was)
    a, b = float(per_record.mean()), float(token_mean)
    return {"records": len(batch), "lmtune_mean_of_record_means": a, "transformers_token_mean": b,
            "abs_diff": abs(a - b), "rel_diff": abs(a - b) / abs(b)}


# ----------------------------------------------------------------------------------------------------
# Child: the HF Trainer peer (no lmtune import).

def child_peer(spec: dict, objective: str, gate: Gate) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments, default_data_collator)

    import_s = time.perf_counter() - t0
    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["source"])
    model = AutoModelForCausalLM.from_pretrained(spec["source"], dtype=torch.float32)
    load_s = time.perf_counter() - t0
    rss_after_load = current_rss()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(spec["seed"])
    model = get_peft_model(model, LoraConfig(**LORA, bias="none", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    if objective == "cls":
        rows = [{"input_ids": ids + [spec["label_ids"][y]],
                 "labels": [-100] * len(ids) + [spec["label_ids"][y]]}
                for ids, y in zip(spec["input_ids"], spec["y"])]
        base_collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
        n_steps, sampling = spec["steps"], spec["peer_sampling"]
    else:
        rows = [{"input_ids": c, "labels": list(c)} for c in spec["lm_chunks"]]
        base_collator = default_data_collator
        n_steps, sampling = spec["lm_steps"], "random"

    batches: list[dict] = []

    def collator(features):
        out = base_collator(features)
        if "attention_mask" not in out:
            out["attention_mask"] = torch.ones_like(out["input_ids"])
        # Target tokens as transformers counts them (num_items_in_batch): labels other than -100 after
        # the one-position shift.
        batches.append({"examples": int(out["input_ids"].shape[0]), "tokens": int(out["attention_mask"].sum()),
                        "padded_tokens": int(out["input_ids"].numel()),
                        "target_tokens": int((out["labels"][:, 1:] != -100).sum())})
        return out

    begins: list[dict] = []
    starts: list[dict] = []
    ends: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            begins.append(cpu_snapshot())

        def on_step_end(self, args, state, control, **kw):
            ends.append(cpu_snapshot())
            if state.global_step < n_steps:
                starts.append(gate.wait("step"))
            else:
                gate.wait("finished")

    with tempfile.TemporaryDirectory(prefix="bench-training-peer-") as out_dir:
        args = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=BATCH, max_steps=n_steps, num_train_epochs=1,
            learning_rate=LR, weight_decay=0.0, lr_scheduler_type="cosine",
            warmup_steps=math.ceil(WARMUP * n_steps - 1e-9), max_grad_norm=CLIP, seed=spec["seed"],
            data_seed=spec["seed"], train_sampling_strategy=sampling, eval_strategy="no",
            save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                          processing_class=tok, callbacks=[Clock()])
        peak_before = process_peak_rss()
        gate.wait("ready")
        reset_peak_rss()
        res = trainer.train()
    training_peak = process_peak_rss()
    n = len(ends)
    if n != n_steps:
        raise SystemExit(f"peer child: {n} steps run, {n_steps} asked")
    # Step 1: from its on_step_begin (the first batch is fetched, the optimizer made); later steps: from
    # the parent's go after the previous step (the next batch's fetch and collation included).
    step_windows = [window(a, b) for a, b in zip([begins[0]] + starts, ends)]
    for w, b in zip(step_windows, batches[:n]):
        w.update(b)
    result = {
        "import_s": import_s, "model_load_s": load_s,
        "trainer_train_runtime_s": res.metrics.get("train_runtime"), "train_loss": res.training_loss,
        "trainable_params": trainable, "steps": n, "sampling": sampling, "step_windows": step_windows,
        "collator_calls": len(batches),
        "peak_rss_bytes": max(peak_before, training_peak), "training_peak_rss_bytes": training_peak,
        "peak_rss_before_training_bytes": peak_before, "rss_after_load_bytes": rss_after_load,
        "torch_threads": torch.get_num_threads(),
    }

    # FLOPs of one training step on a fixed batch: the peer's forward with labels, then backward.
    fb = spec["flop_batch"] if objective == "cls" else list(range(min(BATCH, len(rows))))
    batch = (DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100) if objective == "cls"
             else default_data_collator)([rows[i] for i in fb])
    model.train()
    with flop_counter() as fc:
        loss = model(**batch).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    flops = fc.get_total_flops()
    padded = int(batch["input_ids"].numel())
    result["flop_step"] = {"records": fb, "padded_tokens": padded, "flops": flops,
                           "flops_per_padded_token": flops / padded}
    return result


# ----------------------------------------------------------------------------------------------------
# Parent.

def prepare(args) -> dict:
    """Records, lmtune's token ids, the answer tokens, the LM chunks and the FLOP-count batch."""
    import numpy as np
    from transformers import AutoTokenizer

    from lmtune.data import open_data
    from lmtune.models import DEFAULT_MODEL, resolve
    from lmtune.tasks import ClassificationTask
    from lmtune.training import batch_order

    source, _ = resolve(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    data = "builtin:reviews:train"
    full = open_data(data)
    n = args.steps * BATCH
    if n > len(full):
        raise SystemExit(f"--steps {args.steps} needs {n} records; the train split has {len(full)} "
                         f"(at most {len(full) // BATCH} steps: one epoch)")
    rng = np.random.default_rng(args.seed)
    indices = sorted(rng.choice(len(full), n, replace=False).tolist()) if n < len(full) else list(range(n))
    ds = full.subset(indices)
    task = ClassificationTask(TEMPLATE, LABEL_WORDS)
    enc = task.encode(tok, ds)
    lengths = [len(s) for s in enc.input_ids]
    # FLOP-count batch: lmtune's batch of median padded length in this run.
    batches = batch_order(len(lengths), BATCH, args.seed, 0, lengths)
    full_batches = [b for b in batches if len(b) == BATCH]
    full_batches.sort(key=lambda b: max(lengths[i] for i in b))
    flop_batch = full_batches[len(full_batches) // 2]
    # LM objective: the split's review texts, each followed by EOS, concatenated and cut into chunks.
    stream = []
    for rec in full.records:
        stream += tok(rec["text"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    need = args.lm_steps * BATCH * args.seq_len
    reps = max(1, math.ceil(need / len(stream)))
    long_stream = (stream * reps)[:need]
    chunks = [long_stream[i:i + args.seq_len] for i in range(0, need, args.seq_len)]
    # lmtune's side reads the chunks as text records: each chunk decoded, with its EOS tokens written out.
    # Re-tokenized the way GenerationTask tokenizes a text record (special tokens on: this tokenizer adds
    # none, and "<|im_end|>" in the text parses back to its token), it must give the chunk's ids exactly;
    # BPE need not round-trip a cut at an arbitrary token, so this is checked, not assumed.
    texts = [tok.decode(c, skip_special_tokens=False, clean_up_tokenization_spaces=False) for c in chunks]
    bad = [i for i, (t, c) in enumerate(zip(texts, chunks)) if tok(t, add_special_tokens=True).input_ids != c]
    if bad:
        raise SystemExit(f"{len(bad)} of {len(chunks)} LM chunks (first: {bad[0]}) do not re-tokenize to their own "
                         f"ids; lmtune's side could not train on the peer's exact tokens (try another --seq-len)")
    return {
        "model": DEFAULT_MODEL, "source": source, "data": data, "indices": indices, "seed": args.seed,
        "token_budget": args.token_budget,
        "steps": args.steps, "lm_steps": args.lm_steps, "seq_len": args.seq_len, "threads": args.threads,
        "peer_sampling": args.peer_sampling, "input_ids": enc.input_ids, "y": [int(v) for v in enc.y],
        "label_ids": task.label_token_ids(tok), "flop_batch": flop_batch, "lm_chunks": chunks, "lm_texts": texts,
        "lm_stream_tokens": len(stream), "lm_stream_repeats": reps,
        "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)},
    }


SIDES = ("lmtune", "lmtune_gc", "peer_cls", "lmtune_lm", "peer_lm")
EXTRA_SIDES = ("lmtune_ga2", "lmtune_budget")  # run only when named in --sides


def run_lockstep(spec_path: Path, tmp: Path, sides: tuple[str, ...] = SIDES) -> dict:
    """Start every side in its own process and let them take optimizer steps in turn.

    Each child loads its model, reports ``ready`` and sleeps; the parent then lets one side run one
    optimizer step at a time, round-robin (lmtune, lmtune_gc, peer_cls, lmtune_lm, peer_lm, lmtune, ...), until every side has
    run all its steps. A side steps while the others sleep on a pipe read, so the sides do not compete for
    the 2 cores, and whatever else loads the machine meanwhile falls on all of them alike. The work after
    training (FLOP counting, writing results) then runs one side at a time.
    """
    procs, chans = {}, {}
    t_start = time.perf_counter()
    try:
        for side in sides:
            p2c_r, p2c_w = os.pipe()
            c2p_r, c2p_w = os.pipe()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--spec", str(spec_path),
                   "--child-out", str(tmp / f"{side}.json"), "--sync", f"{p2c_r},{c2p_w}"]
            procs[side] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, pass_fds=(p2c_r, c2p_w))
            os.close(p2c_r)
            os.close(c2p_w)
            chans[side] = (os.fdopen(p2c_w, "w", buffering=1), os.fdopen(c2p_r, "r"))

        def recv(side):
            line = chans[side][1].readline()
            if not line:
                raise SystemExit(f"{side} subprocess ended early (status {procs[side].wait()})")
            return line.strip()

        def go(side):
            chans[side][0].write("go\n")
            chans[side][0].flush()

        for side in sides:
            if recv(side) != "ready":
                raise SystemExit(f"{side}: unexpected message before training")
        log(f"all sides loaded in {time.perf_counter() - t_start:.1f} s; stepping in turn (load {loadavg()})")
        active, counts = list(sides), {s: 0 for s in sides}
        while active:
            for side in list(active):
                go(side)
                msg = recv(side)
                counts[side] += 1
                if msg == "finished":
                    active.remove(side)
                elif msg != "step":
                    raise SystemExit(f"{side}: unexpected message {msg!r}")
            log(f"steps done: {counts} (load {loadavg()})")
        raw = {}
        for side in sides:
            go(side)
            status = procs[side].wait()
            if status != 0:
                raise SystemExit(f"{side} subprocess failed with status {status}")
            raw[side] = json.loads((tmp / f"{side}.json").read_text())
            log(f"--- {side}: peak RSS {raw[side]['peak_rss_bytes'] / 2**30:.2f} GiB")
        return raw
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def summarise(res: dict, peak_gflops: float) -> dict:
    r = rates(res["step_windows"], res["flop_step"]["flops_per_padded_token"], peak_gflops)
    h = r["excluding_first_step"]
    return {"examples_per_s": h["examples_per_s"], "tokens_per_s": h["tokens_per_s"],
            "padded_tokens_per_s": h["padded_tokens_per_s"], "target_tokens_per_s": h["target_tokens_per_s"],
            "peak_rss_bytes": res["peak_rss_bytes"],
            "training_peak_rss_bytes": res["training_peak_rss_bytes"],
            "rss_after_load_bytes": res["rss_after_load_bytes"],
            "seconds": h["seconds"], "steps": res["steps"], "timed_steps": h["steps"],
            "flops_per_step": h.get("flops_per_step"), "mfu": h.get("mfu"), "achieved_gflops": h.get("achieved_gflops"),
            "foreign_cpu_share_mean": h["foreign_cpu_share_mean"], "foreign_cpu_share_max": h["foreign_cpu_share_max"],
            "rates": r, "raw": res}


def compare(sides: dict, ours: str, peer: str, key: str) -> dict | None:
    """Ratios of side ``ours`` to side ``peer``: ``key`` rate (timed steps and all steps), peak RSS, FLOPs."""
    if ours not in sides or peer not in sides:
        return None
    a, b = sides[ours], sides[peer]
    return {"rate": key, "ratio": a[key] / b[key],
            "ratio_all_steps": a["rates"]["all_steps"][key] / b["rates"]["all_steps"][key],
            "peak_rss": a["peak_rss_bytes"] / b["peak_rss_bytes"],
            "training_peak_rss": a["training_peak_rss_bytes"] / b["training_peak_rss_bytes"],
            "flops_per_padded_token": (a["raw"]["flop_step"]["flops_per_padded_token"]
                                       / b["raw"]["flop_step"]["flops_per_padded_token"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 classification steps, 3 LM steps")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps of batch 8 for the classification sides (default 20; 55 = the whole split)")
    ap.add_argument("--lm-steps", type=int, default=None, help="optimizer steps of the two LM-objective sides (default 10)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--token-budget", type=int, default=576,
                    help="max_batch_tokens of the lmtune_budget side (padded prompt tokens per micro-batch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every side (default: torch's)")
    ap.add_argument("--peer-sampling", choices=["group_by_length", "random"], default="group_by_length")
    ap.add_argument("--out", default=None, help=f"write the JSON here too (default {DEFAULT_OUT.relative_to(REPO)}; "
                                                "quick runs: nowhere)")
    ap.add_argument("--sides", default=",".join(SIDES),
                    help=f"comma-separated subset of {','.join(SIDES + EXTRA_SIDES)} (default: {','.join(SIDES)}; "
                         "a goal needs both its sides)")
    ap.add_argument("--child", choices=list(SIDES + EXTRA_SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--sync", help=argparse.SUPPRESS)
    add_wait_idle(ap)
    args = ap.parse_args()

    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        gate = Gate(args.sync)
        objective = "lm" if args.child.endswith("_lm") else "cls"
        res = (child_lmtune(spec, objective, gate, checkpointing=args.child == "lmtune_gc",
                            grad_accum=2 if args.child == "lmtune_ga2" else 1,
                            max_batch_tokens=spec["token_budget"] if args.child == "lmtune_budget" else None)
               if args.child.startswith("lmtune") else child_peer(spec, objective, gate))
        Path(args.child_out).write_text(json.dumps(res))
        return

    import torch

    chosen = tuple(x.strip() for x in args.sides.split(",") if x.strip())
    if not chosen or set(chosen) - set(SIDES + EXTRA_SIDES):
        ap.error(f"--sides: expected a comma-separated subset of {','.join(SIDES + EXTRA_SIDES)}, got {args.sides!r}")
    chosen = tuple(x for x in SIDES + EXTRA_SIDES if x in chosen)
    args.steps = args.steps or (4 if args.quick else 20)
    args.lm_steps = args.lm_steps or (3 if args.quick else 10)
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    env = start(args)
    spec = prepare(args)
    log(f"{len(spec['indices'])} records, prompts {spec['prompt_tokens']}, flop batch {spec['flop_batch']}")
    mm_before = peak_matmul_gflops()
    log(f"peak matmul: {mm_before['gflops']:.1f} GFLOP/s")

    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        tmp = Path(tmp)
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec))
        raw = run_lockstep(spec_path, tmp, chosen)
    mm_after = peak_matmul_gflops()
    peak = max(mm_before["gflops"], mm_after["gflops"])
    log(f"peak matmul after: {mm_after['gflops']:.1f} GFLOP/s")

    sides = {k: summarise(v, peak) for k, v in raw.items()}
    cls = compare(sides, "lmtune", "peer_cls", "examples_per_s")
    cls_gc = compare(sides, "lmtune_gc", "peer_cls", "examples_per_s")
    cls_ga = compare(sides, "lmtune_ga2", "peer_cls", "examples_per_s")
    cls_budget = compare(sides, "lmtune_budget", "peer_cls", "examples_per_s")
    lmo = compare(sides, "lmtune_lm", "peer_lm", "tokens_per_s")

    def goal(text, c, field, target, at_least):
        if c is None:
            return {"goal": text, "ratio": None, "met": None, "status": "not run (--sides)"}
        r = c[field]
        return {"goal": text, "ratio": r, "met": bool(r >= target if at_least else r <= target)}

    goals = {
        "classification_speed": goal(f"lmtune >= {GOAL_SPEED:g}x the peer's examples/s", cls, "ratio",
                                     GOAL_SPEED, True),
        "classification_memory": goal(f"lmtune peak RSS <= {GOAL_MEMORY:g}x the peer's", cls, "peak_rss",
                                      GOAL_MEMORY, False),
        "classification_memory_checkpointed": goal(f"lmtune with activation checkpointing: peak RSS <= "
                                                   f"{GOAL_MEMORY:g}x the peer's", cls_gc, "peak_rss", GOAL_MEMORY,
                                                   False),
        "lm_objective_speed": goal(f"lmtune >= {GOAL_LM:g}x the peer's tokens/s on the plain LM objective at "
                                   f"sequence length {args.seq_len}", lmo, "ratio", GOAL_LM, True),
    }
    if "lmtune_lm" in raw:
        goals["lm_objective_speed"]["loss_check"] = raw["lmtune_lm"]["loss_check"]
    foreign = {k: v["foreign_cpu_share_mean"] for k, v in sides.items()}
    valid = all(f is not None and f < MAX_FOREIGN for f in foreign.values())
    if not valid:
        log(f"WARNING: other processes used the CPUs during the timed steps ({foreign}); the timings are not "
            "comparable with an idle machine's")
    result = {
        "benchmark": "training",
        "model": spec["model"],
        "quick": args.quick,
        "config": {"sides": list(chosen), "lora": LORA, "batch_size": BATCH, "steps": args.steps, "lm_steps": args.lm_steps,
                   "seq_len": args.seq_len, "token_budget": args.token_budget, "seed": args.seed,
                   "threads": args.threads, "lr": LR,
                   "warmup": WARMUP, "schedule": "cosine", "clip": CLIP,
                   "peer_sampling": args.peer_sampling, "data": spec["data"], "n_records": len(spec["indices"]),
                   "prompt_tokens": spec["prompt_tokens"], "flop_batch": spec["flop_batch"],
                   "lm_stream_tokens": spec["lm_stream_tokens"], "lm_stream_repeats": spec["lm_stream_repeats"]},
        "peak_matmul": {"gflops": peak, "before": mm_before, "after": mm_after},
        "sides": {k: {kk: vv for kk, vv in v.items() if kk != "raw"} for k, v in sides.items()},
        "ratios": {"lmtune_vs_peer_cls": cls, "lmtune_gc_vs_peer_cls": cls_gc, "lmtune_lm_vs_peer_lm": lmo,
                   **({"lmtune_ga2_vs_peer_cls": cls_ga} if cls_ga is not None else {}),
                   **({"lmtune_budget_vs_peer_cls": cls_budget} if cls_budget is not None else {})},
        "interference": {"foreign_cpu_share_mean": foreign, "threshold": MAX_FOREIGN, "valid": valid,
                         "what": "share of the machine's CPUs used by other processes during the timed steps"},
        "issue_reference_peer": ISSUE_PEER,
        "goals": goals,
        "goal": f"classification epoch: lmtune >= {GOAL_SPEED:g}x the peer's examples/s and <= {GOAL_MEMORY:g}x "
                f"its peak RSS; plain LM objective: lmtune >= {GOAL_LM:g}x the peer's tokens/s",
        "met": (bool(all(goals[k]["met"] for k in ISSUE_GOALS))
                if all(goals[k]["met"] is not None for k in ISSUE_GOALS) else None),
        "raw": {k: v["raw"] for k, v in sides.items()},
        "environment": env,
    }
    emit(result)
    out = args.out or (None if args.quick else str(DEFAULT_OUT))
    if out:
        save(result, out)


if __name__ == "__main__":
    main()
