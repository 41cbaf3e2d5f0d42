"""numpy transcriptions of the flax cells the learned optimizers' references
use, shared by the transcription tests (written from flax's equations, not
from our modules)."""

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def ref_gru(p, h, x):
    """flax GRUCell (linen/recurrent.py, GRUCell.__call__), activation tanh:
    r = s(x Wir + bir + h Whr); z = s(x Wiz + biz + h Whz);
    n = tanh(x Win + bin + r (h Whn + bhn)); h' = (1 - z) n + z h."""
    r = sigmoid(x @ p["ir"]["kernel"] + p["ir"]["bias"] + h @ p["hr"]["kernel"])
    z = sigmoid(x @ p["iz"]["kernel"] + p["iz"]["bias"] + h @ p["hz"]["kernel"])
    n = np.tanh(x @ p["in"]["kernel"] + p["in"]["bias"] + r * (h @ p["hn"]["kernel"] + p["hn"]["bias"]))
    return (1.0 - z) * n + z * h
