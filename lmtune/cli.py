"""The ``lmtune`` command: argument parsing only; every command calls the library.

Option help for method parameters is read from the estimators' numpydoc docstrings, so the CLI and the
Python API describe each parameter in the same words.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

from lmtune.errors import LmtuneError


def _param_help(obj, name: str, default: str = "") -> str:
    """The description of parameter ``name`` in ``obj``'s numpydoc docstring (``default`` when absent)."""
    doc = inspect.getdoc(obj) or ""
    m = re.search(rf"^(?:[\w, ]*\b){re.escape(name)}\b[\w, ]* :.*\n((?:    .*\n?)+)", doc, re.M)
    text = " ".join(line.strip() for line in m.group(1).splitlines()) if m else default
    # argparse %-formats help strings, and reST literals read badly in a terminal.
    return text.replace("``", "").replace("%", "%%")


def _summary(obj) -> str:
    """The first line of ``obj``'s docstring, as plain text."""
    doc = inspect.getdoc(obj) or ""
    return doc.splitlines()[0].replace("``", "") if doc else ""


def _number(kind, low):
    """An argparse type: a finite ``kind`` (int or float) no smaller than ``low``.

    Checked while parsing, so a nonsensical value is a usage error naming the option, not a failure deep
    in the library (``range()`` with step 0 for ``--batch-size 0``).
    """
    def convert(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(v) or v < low:
            raise argparse.ArgumentTypeError(f"expected a number >= {low}, got {text!r}")
        return v
    convert.__name__ = kind.__name__  # what argparse calls the type in its messages
    return convert


def _task_args(p: argparse.ArgumentParser, required: bool = False, generate: bool = True) -> None:
    from lmtune.instruct import GenerationTask as G
    from lmtune.tasks import ClassificationTask as T

    g = p.add_argument_group("task")
    if generate:
        g.add_argument("--task", choices=["classify", "generate"], default="classify",
                       help="classify: label-token classification (--template, --label-words); generate: "
                            "instruction tuning, the loss on the answer tokens only.")
    g.add_argument("--template", required=required,
                   help=_param_help(T, "template") + (" Generation: " + _param_help(G, "template") if generate else ""))
    g.add_argument("--label-words", required=required, help=_param_help(T, "label_words"))
    g.add_argument("--label-field", default="label", help=_param_help(T, "label_field"))
    g.add_argument("--no-chat", action="store_true", help="Do not apply the model's chat template.")
    g.add_argument("--max-length", type=int, default=None,
                   help=_param_help(T, "max_length") + " Default: 512 (classify), 1024 (generate).")
    if generate:
        g.add_argument("--system", default=None, help="Generation: " + _param_help(G, "system"))


def _run_args(p: argparse.ArgumentParser,
              json_help: str = "Print one JSON object on stdout (no progress bars).") -> None:
    from lmtune.methods.base import LabelTokenClassifier as B

    p.add_argument("--batch-size", type=_number(int, 1), default=16,
                   help=_param_help(B, "batch_size", "Prompts per forward pass."))
    p.add_argument("--no-cache", action="store_true", help="Do not read or write the on-disk feature cache.")
    p.add_argument("--json", action="store_true", help=json_help)


TRAINING_OPTIONS = ("epochs", "lr", "grad_accum", "max_batch_tokens", "weight_decay", "warmup", "schedule", "clip",
                    "patience", "val", "val_metric", "seed", "max_steps", "gradient_checkpointing", "checkpoint_dir",
                    "resume", "pack")
CHOICES = {"schedule": ["cosine", "linear", "constant"], "val_metric": ["nll", "accuracy"],
           "init": ["default", "gaussian", "pissa"], "placement": ["both", "mlp"], "predictive": ["mc", "probit"],
           "prior_method": ["auto", "evidence", "val"]}


BAYES_MODES = ["laplace", "svgd", "exact"]


def _bayes_methods() -> dict[str, list[str]]:
    """Each --bayes mode and the methods that offer it (from their ``bayes_modes``)."""
    from lmtune.methods import METHODS

    return {m: [name for name, cls in METHODS.items() if m in getattr(cls, "bayes_modes", ())] for m in BAYES_MODES}


NONE_DEFAULT_TYPES = {"lr": float, "max_steps": int, "patience": int, "prior_precision": float, "kfac_samples": int,
                      "ggn_samples": int, "max_batch_tokens": int}


def _option_type(default, name: str = ""):
    """The argparse type of a constructor parameter, from its default value (or the table above)."""
    kind = NONE_DEFAULT_TYPES.get(name) if default is None else type(default)
    if kind is bool:
        return None
    if kind is int:
        return _number(int, 0)
    if kind is float:
        return _number(float, 0.0)
    return str


def _tuned_options() -> dict[str, tuple[object, list[str]]]:
    """Every option of the gradient-trained methods: name -> (documenting class, methods that take it)."""
    from lmtune.methods import METHODS
    from lmtune.methods.tuned import TunedClassifier

    out: dict[str, tuple[object, list[str]]] = {}
    for name, cls in METHODS.items():
        if issubclass(cls, TunedClassifier):
            for opt in cls.options:
                out.setdefault(opt, (cls, []))[1].append(name)
    return out


def _tuned_args(p: argparse.ArgumentParser) -> None:
    """Options of the gradient-trained methods (given only when set, so each method keeps its defaults)."""
    from lmtune.methods.tuned import TunedClassifier as T

    g = p.add_argument_group("training (gradient methods)")
    sig = inspect.signature(T.__init__).parameters
    for name in TRAINING_OPTIONS:
        _add_option(g, name, sig[name].default, T)
    g = p.add_argument_group("method options")
    for name, (cls, methods) in _tuned_options().items():
        default = inspect.signature(cls.__init__).parameters[name].default
        _add_option(g, name, default, cls, f" ({', '.join(methods)})")


def _add_option(g, name: str, default, cls, suffix: str = "") -> None:
    flag = "--" + name.replace("_", "-")
    text = _param_help(cls, name) + suffix.replace("%", "%%")
    if isinstance(default, bool):
        g.add_argument(flag, dest=name, action="store_true", default=None, help=text)
    else:
        g.add_argument(flag, dest=name, type=_option_type(default, name), choices=CHOICES.get(name), default=None,
                       help=text + (f" Default: {default}." if default is not None else ""))


def _decoding_args(g) -> None:
    from lmtune.generation import GenerationOptions as O

    g.add_argument("--max-new-tokens", type=_number(int, 1), default=128, help=_param_help(O, "max_new_tokens"))
    g.add_argument("--temperature", type=_number(float, 0.0), default=0.0,
                   help="0 decodes greedily (the default); above 0, samples from softmax(logits / temperature).")
    g.add_argument("--top-p", type=float, default=1.0, help=_param_help(O, "top_p"))
    g.add_argument("--top-k", type=_number(int, 1), default=None, help=_param_help(O, "top_k"))
    g.add_argument("--seed", type=int, default=0, help=_param_help(O, "seed"))
    g.add_argument("--stop", action="append", default=[], help="A stop string (repeat the option for several).")
    g.add_argument("--gen-batch-size", type=_number(int, 1), default=16, help=_param_help(O, "batch_size"))


def _decoding(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0,
            "temperature": args.temperature or 1.0, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
            "stop": tuple(args.stop), "batch_size": args.gen_batch_size}


def build_parser() -> argparse.ArgumentParser:
    from lmtune.methods import METHODS
    from lmtune.methods.closed_form import ClosedFormClassifier as CF
    from lmtune.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="lmtune", description=__import__("lmtune").__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=__import__("lmtune").__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    methods_help = "; ".join(f"{name}: {_summary(cls)}" for name, cls in METHODS.items()).replace("%", "%%")
    p = sub.add_parser("fit", help="Fit a method on labeled data and save a run folder.",
                       description=f"Methods: {methods_help}")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--model", default=DEFAULT_MODEL, help="Built-in name, Hugging Face folder, .gguf file or hub id.")
    p.add_argument("--train", required=True,
                   help="Training data: .jsonl, .csv, .tsv or builtin:NAME:SPLIT. With --task generate, several "
                        "sources with sampling weights: 'a.jsonl:2,b.jsonl:1'.")
    p.add_argument("--out", required=True, help="Run folder to write (replaced atomically if it is a run).")
    _task_args(p)
    g = p.add_argument_group("closed-form")
    g.add_argument("--lam", type=_number(float, 0.0), default=None, help=_param_help(CF, "lam"))
    g.add_argument("--criterion", choices=["gcv", "loo", "evidence"], default="gcv", help=_param_help(CF, "criterion"))
    g.add_argument("--smoothing", type=float, default=0.1, help=_param_help(CF, "smoothing"))
    g.add_argument("--no-intercept", action="store_true", help="Do not fit the per-label bias.")
    g = p.add_argument_group("Bayesian")
    g.add_argument("--bayes", choices=BAYES_MODES, default=None,
                   help="A posterior over the learned parameters, for predictions with uncertainty: "
                        + "; ".join(f"{m} ({', '.join(ms)})" for m, ms in _bayes_methods().items()) + ".")
    _tuned_args(p)
    _run_args(p)

    for name, what in (("eval", "Metrics of a run (or of the zero-shot model) on labeled data."),
                       ("predict", "One JSON line per record: the label and every label's probability.")):
        p = sub.add_parser(name, help=what, description=what)
        p.add_argument("run", nargs="?", help="A run folder written by `lmtune fit`.")
        p.add_argument("--data", required=True, help="Data: .jsonl, .csv, .tsv or builtin:NAME:SPLIT.")
        p.add_argument("--zero-shot", action="store_true", help="Use the base model (needs --template, --label-words).")
        p.add_argument("--model", default=None, help="Base model (default: the run's, or smollm2-135m).")
        _task_args(p, required=False)
        if name == "eval":
            _run_args(p)
            p.add_argument("--bins", type=_number(int, 1), default=15, help="ECE bins (equal width).")
            p.add_argument("--examples", type=_number(int, 0), default=5, help="Flip examples shown per kind.")
            g = p.add_argument_group("generation runs")
            g.add_argument("--metrics", default="rouge,bleu,exact",
                           help="Comma-separated: rouge (ROUGE-1/2/L), bleu (corpus BLEU), exact (exact match).")
            g.add_argument("--no-stem", action="store_true", help="ROUGE without Porter stemming.")
            g.add_argument("--no-base", action="store_true", help="Do not also score the base model.")
            _decoding_args(g)
        else:
            _run_args(p, json_help="No progress bars (the output is JSON lines either way).")
            p.add_argument("--out", default=None, help="Write the JSON lines to this file (atomically) instead of stdout.")

    what = "Answer every record with a generation run (or the base model): JSON lines, streamed."
    p = sub.add_parser("generate", help=what, description=what + " Each line: the record's line (and id), the "
                       "answer, its finish reason (eos, stop, length) and its number of new tokens.")
    p.add_argument("run", nargs="?", help="A run folder written by `lmtune fit --task generate`.")
    p.add_argument("--data", required=True, help="Records: .jsonl, .csv, .tsv or builtin:NAME:SPLIT.")
    p.add_argument("--zero-shot", action="store_true", help="Use the base model (with --task generate).")
    p.add_argument("--model", default=None, help="Base model (default: the run's, or smollm2-135m).")
    _task_args(p)
    _decoding_args(p)
    p.add_argument("--out", default=None, help="Write the JSON lines to this file (written as they come to "
                   "a partial file, renamed when complete) instead of stdout.")
    p.add_argument("--resume", action="store_true", help="With --out: keep the answers already in the partial "
                   "file of an interrupted run and generate only the rest.")
    p.add_argument("--json", action="store_true", help="No progress output (the output is JSON lines either way).")

    what = "Catastrophic forgetting: score the base model and a run on other tasks, and report the changes."
    p = sub.add_parser("forgetting", help=what, description=what + " The suite (YAML or JSON) lists "
                       "classification, generation, multiple-choice and language-modelling tasks; see "
                       "lmtune/forgetting.py. --suite builtin uses the built-in datasets.")
    p.add_argument("run", help="A run folder written by `lmtune fit`.")
    p.add_argument("--suite", required=True, help="Suite file (.yaml/.yml/.json), or builtin.")
    p.add_argument("--model", default=None, help="Base model (default: the run's).")
    p.add_argument("--out", default=None, help="Also write the report as JSON to this file (atomically).")
    p.add_argument("--json", action="store_true", help="Print the report as one JSON object.")

    p = sub.add_parser("merge", help="Fold a LoRA-family run into its base model's weights and save the model.",
                       description="Fold a LoRA-family run into its base model's weights. The output folder is a "
                                   "plain Hugging Face model and also a run folder for lmtune eval/predict.")
    p.add_argument("run", help="A lora or adalora run folder.")
    p.add_argument("--out", required=True, help="Folder for the merged model (replaced atomically if it is a run).")
    p.add_argument("--model", default=None, help="Base model (default: the run's).")

    p = sub.add_parser("spectrum", help="Singular values and energy rank of every LoRA update in a run.",
                       description="The spectrum of each trained update (alpha/r) B A of a lora run: how much of "
                                   "the rank it uses (the energy rank holds --share of ||BA||_F^2).")
    p.add_argument("run", help="A lora run folder (or any PEFT LoRA adapter folder).")
    p.add_argument("--share", type=_number(float, 0.0), default=0.9, help="Energy share (default 0.9).")
    p.add_argument("--plot", default=None, help="Write a PNG of the spectra and the energy rank per layer.")
    p.add_argument("--json", action="store_true", help="Print every module's spectrum as one JSON object.")

    p = sub.add_parser("demo", help="Zero-shot vs closed-form vs LoRA on the built-in reviews dataset.")
    p.add_argument("--no-lora", action="store_true", help="Skip the LoRA training (a few minutes on a CPU).")
    p.add_argument("--no-generate", action="store_true",
                   help="Skip the instruction-tuning part (LoRA on the built-in instructions, a few minutes).")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", default=None, help="Also save the fitted closed-form run here.")
    p.add_argument("--json", action="store_true", help="Print the results as one JSON object.")

    from lmtune.compare import compare

    what = "Fit several methods on the same data and compare quality, size, memory, training time and latency."
    p = sub.add_parser("compare", help=what, description=f"{what} Methods: {methods_help}")
    p.add_argument("--methods", required=True, help=f"Comma-separated, from: {', '.join(METHODS)}; NAME+MODE for a "
                   "method with a posterior (--bayes MODE), e.g. closed-form+exact. With --val, every method is also "
                   "reported temperature-scaled.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="Built-in name, Hugging Face folder, .gguf file or hub id.")
    p.add_argument("--train", required=True, help="Training data: .jsonl, .csv, .tsv or builtin:NAME:SPLIT.")
    p.add_argument("--test", required=True, help="Test data, same formats.")
    p.add_argument("--out", required=True, help="Report folder: report.md/.csv/.json, two plots, runs/<method>.")
    p.add_argument("--latency-examples", type=_number(int, 0), default=64,
                   help=_param_help(compare, "latency_examples"))
    p.add_argument("--forgetting", default=None, metavar="SUITE",
                   help="Also score every method on a forgetting suite (a file, or builtin): "
                        + _param_help(compare, "forgetting_suite"))
    _task_args(p, required=True, generate=False)
    _tuned_args(p)  # --val among them: validation data for the gradient methods
    _run_args(p, json_help="Print the whole comparison as one JSON object (no progress).")

    what = "Temperature-scale a run on validation data and save the calibrated run."
    p = sub.add_parser("calibrate", help=what, description=what + " The temperature minimises the validation NLL; "
                       "the new run predicts, evaluates and loads like the original.")
    p.add_argument("run", help="A run folder written by `lmtune fit`.")
    p.add_argument("--val", required=True, help="Labeled validation data (not the training data).")
    p.add_argument("--out", required=True, help="Run folder to write (replaced atomically if it is a run).")
    p.add_argument("--model", default=None, help="Base model (default: the run's).")
    _run_args(p, json_help="Print the calibration as one JSON object.")

    sub.add_parser("methods", help="List the available methods.")

    from lmtune.multiple_choice import evaluate_multiple_choice as MC

    p = sub.add_parser("bench", help="Benchmarks of a model (or of a run's adapted model): bench mmlu.")
    bench = p.add_subparsers(dest="bench", required=True)
    what = "MMLU-style multiple choice, each choice scored by its log-likelihood as lm-evaluation-harness does."
    q = bench.add_parser("mmlu", help=what, description=what + " Reports acc and acc_norm per subject, over all "
                         "questions (micro) and as the mean of subjects (macro).")
    q.add_argument("--data", required=True, help="Questions: .jsonl (question, choices, answer, subject), an MMLU "
                   ".csv (no header; the subject from <subject>_test.csv), a folder of them, or builtin:mcqa:test.")
    q.add_argument("--dev", default=None, help=_param_help(MC, "dev") + " Same formats; e.g. builtin:mcqa:dev.")
    q.add_argument("--k-shot", type=_number(int, 0), default=0, help=_param_help(MC, "k_shot") + " Default: 0.")
    q.add_argument("--format", dest="fmt", choices=["letters", "text"], default="letters", help=_param_help(MC, "fmt"))
    q.add_argument("--model", default=None, help=_param_help(MC, "model"))
    q.add_argument("--run", default=None, help=_param_help(MC, "run"))
    q.add_argument("--limit", type=_number(int, 1), default=None, help=_param_help(MC, "limit"))
    q.add_argument("--batch-size", type=_number(int, 1), default=8, help=_param_help(MC, "batch_size"))
    q.add_argument("--max-length", type=_number(int, 2), default=None, help=_param_help(MC, "max_length"))
    q.add_argument("--json", action="store_true", help="Print one JSON object on stdout.")
    return parser


def _task_from(args):
    from lmtune.instruct import GenerationTask
    from lmtune.tasks import ClassificationTask

    # A shell passes "...\n..." through as a backslash and an n: read \n and \t as the user meant them.
    template = args.template.replace("\\n", "\n").replace("\\t", "\t") if args.template else None
    if getattr(args, "task", "classify") == "generate":
        if args.label_words:
            raise LmtuneError("--label-words goes with --task classify; a generation task learns the answers' text")
        return GenerationTask(template, chat=not args.no_chat, system=args.system,
                              max_length=args.max_length or 1024)
    if not args.template or not args.label_words:
        raise LmtuneError("--template and --label-words are required here (or --task generate)")
    return ClassificationTask(template, args.label_words, label_field=args.label_field,
                              chat=not args.no_chat, max_length=args.max_length or 512)


def _common(args) -> dict:
    return {"batch_size": getattr(args, "batch_size", 16), "progress": False if args.json else None,
            "cache": not getattr(args, "no_cache", False)}


def _estimator_for(args):
    """The estimator an eval/predict command applies: a run folder, or the zero-shot model."""
    from lmtune.methods import ZeroShotClassifier, load_run
    from lmtune.models import DEFAULT_MODEL

    if args.zero_shot == bool(args.run):
        raise LmtuneError("give either a run folder or --zero-shot (with --template and --label-words)")
    if args.run and (args.template or args.label_words):
        # Ignoring them would evaluate a task other than the one the user just typed.
        raise LmtuneError("--template and --label-words go with --zero-shot; a run folder keeps the task it was "
                          "fitted with")
    if args.zero_shot:
        return ZeroShotClassifier(args.model or DEFAULT_MODEL, _task_from(args), **_common(args)).fit()
    return load_run(args.run, model=args.model, **_common(args))


def cmd_fit(args) -> int:
    from lmtune.data import open_data
    from lmtune.methods import METHODS
    from lmtune.methods.closed_form import ClosedFormClassifier
    from lmtune.runs import check_run_destination

    from lmtune.methods.tuned import TunedClassifier

    kwargs = _common(args)
    if args.task == "generate" and not issubclass(METHODS[args.method], TunedClassifier):
        tuned = [n for n, c in METHODS.items() if issubclass(c, TunedClassifier)]
        raise LmtuneError(f"--task generate trains an answer's text: use a gradient method ({', '.join(tuned)}), "
                          f"not {args.method}")
    if METHODS[args.method] is ClosedFormClassifier:
        kwargs.update(lam=args.lam, criterion=args.criterion, smoothing=args.smoothing,
                      fit_intercept=not args.no_intercept)
        # the posterior predictive, under the flags the LoRA posteriors use too; taken here so that
        # _tuned_kwargs does not refuse them as training options
        for name in ("predictive", "mc_samples", "seed"):
            if getattr(args, name, None) is not None:
                if not args.bayes:
                    raise LmtuneError(f"--{name.replace('_', '-')} applies to a posterior: add --bayes exact")
                kwargs[name] = getattr(args, name)
                setattr(args, name, None)
    kwargs.update(_tuned_kwargs(args))
    if args.bayes:
        if args.bayes not in getattr(METHODS[args.method], "bayes_modes", ()):
            offered = [m for m, ms in _bayes_methods().items() if args.method in ms]
            raise LmtuneError(f"--bayes {args.bayes} does not apply to --method {args.method}"
                              + (f" (it offers: {', '.join(offered)})" if offered else " (it has no posterior)"))
        kwargs["bayes"] = args.bayes
    task = _task_from(args)
    check_run_destination(args.out)  # before minutes of fitting, not after
    # Read the file here, not inside fit: a method that learns nothing from it (zero-shot) would
    # otherwise accept a malformed --train without a word.
    if args.task == "generate":
        from lmtune.mixture import parse_mixture

        data = parse_mixture(args.train)
    else:
        data = open_data(args.train)
    est = METHODS[args.method](args.model, task, **kwargs).fit(data)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every process trained the same model; one saves
        return 0
    path = est.save(args.out)
    card = json.loads((Path(path) / "card.json").read_text())
    if args.json:
        print(json.dumps(card))
    else:
        print(f"saved {args.method} run to {path}")
        fitted = card.get("fitted")
        if fitted:
            print(f"lambda {fitted['lam']:.4g} ({fitted['solver']}, condition number {fitted['condition_number']}), "
                  f"solve {fitted['solve_seconds'] * 1e3:.1f} ms, features {fitted['extract_seconds']:.1f} s")
            if fitted.get("evidence"):
                e = fitted["evidence"]
                print(f"evidence: log p(targets) {e['log_evidence']:.2f} at prior precision alpha {e['alpha']:.4g}, "
                      f"noise precision beta {e['beta']:.4g} ({e['gamma']:.1f} well-determined parameters per output)"
                      + ("; predictions use the exact posterior" if fitted.get("posterior") else ""))
        training = card.get("training")
        if training:
            last = training["train"]["history"][-1] if training["train"]["history"] else {}
            print(f"trained {training['trainable_params']:,} parameters "
                  f"({100 * training['trainable_share']:.3g}% of the model) in {training['train_seconds']:.1f} s, "
                  f"{training['train']['steps']} steps; last epoch loss {last.get('train_loss', float('nan')):.4f}"
                  + (f", best validation epoch {training['train']['best_epoch']}" if training["train"]["best_epoch"]
                     else ""))
        if card.get("train_metrics"):
            tm = card["train_metrics"]
            print(f"train accuracy {tm['accuracy']:.4f}, macro-F1 {tm['macro_f1']:.4f}, NLL {tm['nll']:.4f}")
    return 0


def _tuned_kwargs(args) -> dict:
    """The training and method options given on the command line, checked against the chosen method."""
    from lmtune.methods import METHODS
    from lmtune.methods.tuned import TunedClassifier

    cls = METHODS[args.method]
    given = {name: getattr(args, name) for name in (*TRAINING_OPTIONS, *_tuned_options())
             if getattr(args, name, None) is not None}
    tuned = issubclass(cls, TunedClassifier)
    wrong = [n for n in given if not tuned or (n not in TRAINING_OPTIONS and n not in cls.options)]
    if wrong:
        flags = ", ".join("--" + n.replace("_", "-") for n in wrong)
        raise LmtuneError(f"{flags} do{'es' if len(wrong) == 1 else ''} not apply to --method {args.method}")
    return given


def cmd_eval(args) -> int:
    from lmtune.data import open_data
    from lmtune.evaluate import evaluate
    from lmtune.report import metrics_text

    from lmtune.instruct import GenerationTask

    data = open_data(args.data)  # before the model loads: a malformed file fails in a moment, not a minute
    est = _estimator_for(args)
    if isinstance(est.task, GenerationTask):
        from lmtune.gen_eval import evaluate_generation
        from lmtune.report import generation_text

        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        ev = evaluate_generation(est, data, metrics=metrics, stem=not args.no_stem, base=not args.no_base,
                                 n_examples=args.examples, **_decoding(args))
        print(json.dumps(ev) if args.json else generation_text(ev))
        return 0
    ev = evaluate(est, data, n_bins=args.bins, n_examples=args.examples)
    print(json.dumps(ev) if args.json else metrics_text(ev))
    return 0


def cmd_generate(args) -> int:
    from lmtune.data import open_data
    from lmtune.gen_eval import generate_rows

    data = open_data(args.data)  # before the model loads, as in cmd_eval
    est = _estimator_for(args)
    if args.out is None:
        if args.resume:
            raise LmtuneError("--resume goes with --out (it continues a partial output file)")
        for row in generate_rows(est, data, **_decoding(args)):
            print(json.dumps(row, ensure_ascii=False), flush=True)
        return 0
    from lmtune.gen_eval import generate_file

    res = generate_file(est, data, args.out, resume=args.resume, progress=False if args.json else None,
                        **_decoding(args))
    if not args.json:
        print(f"wrote {res['n']} answers to {res['path']}" + (f" ({res['resumed']} kept from the partial file)"
                                                               if res["resumed"] else ""), file=sys.stderr)
    return 0


def cmd_predict(args) -> int:
    from lmtune.data import open_data, write_jsonl
    from lmtune.evaluate import predict_records

    data = open_data(args.data)  # before the model loads, as in cmd_eval
    rows = predict_records(_estimator_for(args), data)
    if args.out is None:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        write_jsonl(args.out, rows)
    return 0


def cmd_forgetting(args) -> int:
    from lmtune.forgetting import forgetting, read_suite
    from lmtune.methods import load_run
    from lmtune.report import forgetting_text

    suite = read_suite(args.suite)  # before the model loads: a bad suite fails at once
    res = forgetting(load_run(args.run, model=args.model, progress=False), suite)
    if args.out:
        from lmtune.runs import write_json

        write_json(args.out, res)
    print(json.dumps(res) if args.json else forgetting_text(res))
    return 0


def cmd_merge(args) -> int:
    from lmtune.merge import merge

    print(f"merged model saved to {merge(args.run, args.out, model=args.model)}")
    return 0


def cmd_spectrum(args) -> int:
    from lmtune.lowrank import analyze_adapter
    from lmtune.report import table

    if not 0 < args.share <= 1:
        raise LmtuneError(f"--share must lie in (0, 1], got {args.share}")
    res = analyze_adapter(args.run, share=args.share, plot=args.plot)
    if args.json:
        print(json.dumps(res))
        return 0
    rows = [{"module": k, **v} for k, v in res["summary"].items()]
    print(table(rows, [("module", "module"), ("modules", "count"), ("rank", "rank r"),
                       ("mean_energy_rank", f"mean rank for {args.share:.0%}"), ("min_energy_rank", "min"),
                       ("max_energy_rank", "max")]))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def cmd_demo(args) -> int:
    from lmtune.demo import run_demo
    from lmtune.report import METRIC_COLUMNS, flips_text, table

    log = (lambda *a: None) if args.json else (lambda msg: print(msg, file=sys.stderr))
    res = run_demo(args.model, progress=False if args.json else None, out=args.out, log=log, lora=not args.no_lora,
                   generate=not args.no_generate)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"\nmodel {res['model']} (loaded in {res['load_seconds']:.1f} s); train {res['train']} "
          f"(n={res['n_train']}), test {res['test']} (n={res['closed_form']['data']['n']})")
    print(f"template: {res['template']!r}\n")
    print(table(res["rows"], METRIC_COLUMNS))
    print()
    print(flips_text(res["closed_form"]["flips"]))
    if res["instruct"]:
        from lmtune.report import generation_text

        ev = res["instruct"]
        print(f"\ninstruction tuning (LoRA, {ev['train_seconds']:.0f} s of training), answers to the held-out "
              "instructions:\n")
        print(generation_text(ev))
    return 0


def cmd_compare(args) -> int:
    from lmtune.compare import check_methods, compare, route_options
    from lmtune.report import compare_table

    names = check_methods(args.methods)  # before the model loads: a typo fails at once
    given = {name: getattr(args, name) for name in (*TRAINING_OPTIONS, *_tuned_options())
             if getattr(args, name, None) is not None}
    val = given.pop("val", None)  # the comparison's own validation data (recorded in the report)
    options = route_options(given, names, TRAINING_OPTIONS)
    log = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr))
    res = compare(args.model, _task_from(args), args.train, args.test, names, val=val, options=options,
                  out=args.out, progress=False if args.json else None, latency_examples=args.latency_examples,
                  batch_size=args.batch_size, cache=not args.no_cache, forgetting_suite=args.forgetting, log=log)
    if args.json:
        print(json.dumps(res))
    else:
        print(compare_table(res["rows"]))
        print(f"\nreport, plots and runs in {args.out} (report.md explains each column)")
    return 0


def cmd_calibrate(args) -> int:
    from lmtune.calibration import calibrate_run
    from lmtune.data import open_data

    val = open_data(args.val)  # before the model loads
    ts = calibrate_run(args.run, val, args.out, model=args.model, **_common(args))
    if args.json:
        print(json.dumps({"run": str(ts.path_), **ts.card()}))
    else:
        print(f"temperature {ts.temperature_:.4g}" + (" (at the bound of the search)" if ts.at_bound_ else "")
              + f": validation NLL {ts.val_nll_['before']:.4f} -> {ts.val_nll_['after']:.4f}; saved to {ts.path_}")
    return 0


def cmd_bench(args) -> int:
    from lmtune.multiple_choice import evaluate_multiple_choice, report_text

    res = evaluate_multiple_choice(args.data, model=args.model, run=args.run, dev=args.dev, k_shot=args.k_shot,
                                   fmt=args.fmt, limit=args.limit, batch_size=args.batch_size,
                                   max_length=args.max_length)
    print(json.dumps(res) if args.json else report_text(res))
    return 0


def cmd_methods(args) -> int:
    from lmtune.methods import METHODS

    for name, cls in METHODS.items():
        print(f"{name:14s} {_summary(cls)}")
    return 0


COMMANDS = {"fit": cmd_fit, "eval": cmd_eval, "predict": cmd_predict, "generate": cmd_generate, "forgetting": cmd_forgetting, "merge": cmd_merge, "spectrum": cmd_spectrum,
            "demo": cmd_demo, "compare": cmd_compare, "calibrate": cmd_calibrate,
            "bench": cmd_bench, "methods": cmd_methods}


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"lmtune: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    if getattr(args, "json", False):  # stdout is one JSON object; keep stderr quiet too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return COMMANDS[args.command](args)
    except LmtuneError as e:
        print(f"lmtune: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of stdout went away (``lmtune predict ... | head``): nothing to report. Point stdout at
        # devnull so the interpreter's final flush does not fail again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file descriptor (an embedding host's stream)
            pass
        return 1
    except OSError as e:
        # The file system refused (permission denied, disk full, a folder where a file belongs): the
        # user's to fix, so one line, not a traceback.
        print(f"lmtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
