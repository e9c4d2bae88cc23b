"""Diffusion support: the embedded offline digits model, its image operations and metrics.

Needs the `diffusion` extra (diffusers). See :mod:`dsas.diffusion.digits` for the model and its reproducibility
contract, :mod:`dsas.diffusion.metrics` for the scores.
"""

from dsas.diffusion.classifier import DigitsClassifier, load_digits_classifier
from dsas.diffusion.digits import NULL_CLASS, DigitsDiffusion, NoisedBatch, load_digits_model
from dsas.diffusion.images import blur, load_real_digits
from dsas.diffusion.metrics import (
    blur_score,
    concept_score,
    feature_similarity,
    image_similarity,
    predict_class,
)

__all__ = [
    "NULL_CLASS",
    "DigitsClassifier",
    "DigitsDiffusion",
    "NoisedBatch",
    "blur",
    "blur_score",
    "concept_score",
    "feature_similarity",
    "image_similarity",
    "load_digits_classifier",
    "load_digits_model",
    "load_real_digits",
    "predict_class",
]
