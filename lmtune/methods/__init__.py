"""Adaptation methods, each behind the estimator contract of :mod:`lmtune.methods.base`.

``METHODS`` lists only finished methods; the CLI offers exactly these.
"""

from lmtune.methods.adapters import AdapterClassifier
from lmtune.methods.closed_form import ClosedFormClassifier
from lmtune.methods.peft_methods import AdaLoraClassifier, LoraClassifier, PromptTuningClassifier
from lmtune.methods.selective import FullClassifier, LastLayersClassifier, NormTuningClassifier
from lmtune.methods.zero_shot import ZeroShotClassifier

METHODS = {cls.method: cls for cls in (
    ZeroShotClassifier, ClosedFormClassifier, LoraClassifier, AdaLoraClassifier, PromptTuningClassifier,
    AdapterClassifier, LastLayersClassifier, NormTuningClassifier, FullClassifier)}

__all__ = ["METHODS", "AdaLoraClassifier", "AdapterClassifier", "ClosedFormClassifier", "FullClassifier",
           "LastLayersClassifier", "LoraClassifier", "NormTuningClassifier", "PromptTuningClassifier",
           "ZeroShotClassifier", "load_run"]


def load_run(path, model=None, **kwargs):
    """Load a fitted estimator from its run folder.

    Parameters
    ----------
    path : str or Path
        A folder written by an estimator's ``save``.
    model : LM or str, optional
        The base model; by default the one named in the run's card.
    **kwargs
        Passed to the estimator (``batch_size``, ``progress``, ``cache``).
    """
    import warnings
    from pathlib import Path

    from lmtune.errors import LmtuneError
    from lmtune.models import as_lm
    from lmtune.runs import read_card

    card = read_card(path)
    method = card.get("method")
    if method not in METHODS:
        raise LmtuneError(f"{path}: unknown method {method!r} in card.json; this lmtune knows {sorted(METHODS)}")
    lm = as_lm(model if model is not None else card["model"])
    if card.get("model_fingerprint") and card["model_fingerprint"] != lm.fingerprint:
        warnings.warn(f"{path} was fitted on model {card['model']!r} (fingerprint {card['model_fingerprint']}); "
                      f"{lm.name!r} has fingerprint {lm.fingerprint}: predictions may be meaningless", stacklevel=2)
    try:
        est = METHODS[method].from_card(card, Path(path), lm, **kwargs)
        if card.get("calibration"):  # a run saved by lmtune.calibration.TemperatureScaled
            from lmtune.calibration import TemperatureScaled

            est = TemperatureScaled.from_card(card, est)
        return est
    except (OSError, KeyError, TypeError, ValueError) as e:  # a missing or damaged file, a hand-edited card
        raise LmtuneError(f"{path}: damaged run folder ({type(e).__name__}: {e})") from None
