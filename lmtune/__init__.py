"""lmtune: adapt an open LLM to a small labeled dataset, and measure which adaptation to trust.

The public API, re-exported::

    import lmtune
    lm = lmtune.load_model("smollm2-135m")
    task = lmtune.ClassificationTask("Review: {text}\\nIs this review positive?", "negative=no,positive=yes")
    head = lmtune.ClosedFormClassifier(lm, task).fit("builtin:reviews:train")
    report = lmtune.evaluate(head, "builtin:reviews:test")
    head.save("runs/sentiment"); head = lmtune.load_run("runs/sentiment")
"""

__version__ = "0.1.0"

from lmtune.calibration import TemperatureScaled, calibrate_run
from lmtune.data import Dataset, Template, load_builtin, open_data, read_records
from lmtune.errors import DataError, LmtuneError
from lmtune.evaluate import evaluate, predict_records
from lmtune.features import Features, cached_extract, extract
from lmtune.generation import Generation, GenerationOptions, generate, generate_jsonl, iter_generate
from lmtune.genmetrics import generation_report
from lmtune.merge import merge
from lmtune.methods import (METHODS, AdaLoraClassifier, AdapterClassifier, ClosedFormClassifier, FullClassifier,
                            LastLayersClassifier, LoraClassifier, NormTuningClassifier, PromptTuningClassifier,
                            ZeroShotClassifier, load_run)
from lmtune.models import DEFAULT_MODEL, LM, load_model
from lmtune.multiple_choice import Question, evaluate_multiple_choice, read_questions
from lmtune.switch import AdapterSwitch
from lmtune.tasks import ClassificationTask

__all__ = [
    "DEFAULT_MODEL", "LM", "METHODS", "AdaLoraClassifier", "AdapterClassifier", "AdapterSwitch",
    "ClassificationTask", "ClosedFormClassifier", "DataError", "Dataset", "Features", "FullClassifier",
    "Generation", "GenerationOptions",
    "LastLayersClassifier", "LmtuneError", "LoraClassifier", "NormTuningClassifier", "PromptTuningClassifier",
    "Question", "TemperatureScaled", "Template", "ZeroShotClassifier", "cached_extract", "calibrate_run", "evaluate",
    "evaluate_multiple_choice", "extract", "generate", "generate_jsonl", "generation_report", "iter_generate",
    "load_builtin", "load_model", "load_run", "merge",
    "open_data", "predict_records", "read_questions", "read_records",
]
