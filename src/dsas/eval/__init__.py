"""Evaluation: generation, toxicity scoring, perplexity, multiple-choice accuracy and concept metrics.

Every metric takes a plain (model, tokenizer) and knows nothing about steering: evaluate a steered model by
calling it inside `with steerer.apply(model, strength=s):`.
"""

from dsas.eval.concept import concept_pattern, concept_rate, concept_words, false_steer_rate
from dsas.eval.generation import generate_continuations
from dsas.eval.multiple_choice import (
    MCQuestion,
    build_wiki_mc,
    load_mmlu_csv,
    mask_title,
    mc_accuracy,
    score_choices,
)
from dsas.eval.perplexity import (
    WikiRecord,
    load_wiki_paragraphs,
    load_wiki_records,
    perplexity,
    wiki_json_path,
)
from dsas.eval.toxicity import (
    HFClassifierScorer,
    ProfanityScorer,
    Scorer,
    get_scorer,
    score_toxicity,
    toxicity_rate,
    toxicity_summary,
)

__all__ = [
    "HFClassifierScorer",
    "MCQuestion",
    "ProfanityScorer",
    "Scorer",
    "WikiRecord",
    "build_wiki_mc",
    "concept_pattern",
    "concept_rate",
    "concept_words",
    "false_steer_rate",
    "generate_continuations",
    "get_scorer",
    "load_mmlu_csv",
    "load_wiki_paragraphs",
    "load_wiki_records",
    "mask_title",
    "mc_accuracy",
    "perplexity",
    "score_choices",
    "score_toxicity",
    "toxicity_rate",
    "toxicity_summary",
    "wiki_json_path",
]
