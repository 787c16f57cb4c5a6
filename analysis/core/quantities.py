"""The study's vocabulary and formulas, written once: categories, variants, entropy definitions, prompt
formats, and the per-layer coefficients RFC and RSI with their instruct - base changes.

Every other module imports these names; see docs/method.md for what each quantity means and why.
"""

from __future__ import annotations

import numpy as np

# Prompt categories, in the order tables and figures list them.
SELF, NEUTRAL, THIRD, CONFOUNDER = "self_referent", "neutral", "third_person", "confounder"
CATEGORIES = (SELF, NEUTRAL, THIRD, CONFOUNDER)

# Prompt languages (ISO 639-1: English, Simplified Chinese, Spanish); English is the source every translation
# renders (data/prompts.csv `source_id`) and the language of the headline numbers.
LANGUAGES = ("en", "zh", "es")
SOURCE_LANGUAGE = "en"

# The two checkpoints of a family.
VARIANTS = ("base", "instruct")

# Entropy definitions (docs/method.md, "Entropy definitions") and their column in the entropy tables.
DEFINITIONS = ("raw", "no_bos", "normalised")
ENTROPY_COLUMNS = {"raw": "entropy", "no_bos": "entropy_no_bos", "normalised": "entropy_normalised"}

# Where a head looks (docs/method.md, "Where heads look"): attention mass on the first token and on the
# person-marker tokens, and their column in the entropy tables.
MASS_COLUMNS = {"first": "mass_first", "marker": "mass_marker"}

# How a prompt is fed: alone (the original study) or inside the family's instruct chat template.
PROMPT_FORMATS = ("raw", "chat")

# How the residual stream after a layer is pooled over the user's tokens of a prompt for the probes
# (docs/method.md, "What the residual stream encodes"): their mean, and the last of them.
POOLS = ("mean", "last")

# The per-layer coefficients computed from category means, and their changes (instruct - base).
RATIOS = ("rfc", "rsi", "diff_self_neutral")
DELTAS = {"delta_rfc": "rfc", "delta_rsi": "rsi", "delta_diff": "diff_self_neutral"}


def rfc(h_self: np.ndarray, h_neutral: np.ndarray) -> np.ndarray:
    """Role-Focus Coefficient 1 - H_self / H_neutral; > 0 means self-referent attention is more focused."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - np.asarray(h_self) / np.asarray(h_neutral)


def rsi(h_self: np.ndarray, h_neutral: np.ndarray, h_confounder: np.ndarray) -> np.ndarray:
    """Role-Sensitivity Index (H_confounder - H_self) / H_neutral."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.asarray(h_confounder) - np.asarray(h_self)) / np.asarray(h_neutral)


def layer_ratios(means: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """RFC, RSI and the plain difference H_self - H_neutral from category means (any shape, e.g. [resamples, layers]).

    The plain difference stands beside every ratio: RFC divides by H_neutral, which can be tiny
    in sink-dominated layers (docs/method.md, "Ratios of small numbers").
    """
    return {"rfc": rfc(means[SELF], means[NEUTRAL]),
            "rsi": rsi(means[SELF], means[NEUTRAL], means[CONFOUNDER]),
            "diff_self_neutral": np.asarray(means[SELF]) - np.asarray(means[NEUTRAL])}


def deltas(base: dict[str, np.ndarray], instruct: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ΔRFC, ΔRSI and Δ(H_self - H_neutral), instruct - base, from two `layer_ratios` results."""
    return {name: instruct[ratio] - base[ratio] for name, ratio in DELTAS.items()}


def original_class(delta_rfc: np.ndarray, near_zero: float) -> np.ndarray:
    """The original study's rule on ΔRFC, no test: compression below -near_zero, gain above
    +near_zero, else near_zero (docs/method.md)."""
    d = np.asarray(delta_rfc, dtype=float)
    return np.where(d < -near_zero, "compression", np.where(d > near_zero, "gain", "near_zero"))


def did(base_means: dict[str, np.ndarray], instruct_means: dict[str, np.ndarray]) -> np.ndarray:
    """Difference in differences of mean entropy: (instruct - base) on self-referent minus on neutral prompts."""
    return (instruct_means[SELF] - base_means[SELF]) - (instruct_means[NEUTRAL] - base_means[NEUTRAL])


def head_label(layer: int, head: int) -> str:
    """A head's name in tables, metrics and the report: `L<layer>H<head>`, both 0-based."""
    return f"L{int(layer)}H{int(head)}"


def relative_depth(n_layers: int) -> np.ndarray:
    """(l + 0.5) / L for each layer l: where families of different depth are compared."""
    return (np.arange(n_layers) + 0.5) / n_layers


def choice_rows(frame, definition: str, prompt_format: str, language: str | None = SOURCE_LANGUAGE):
    """The rows of a stats table (layers, deltas, heads, cross_family) for one entropy definition, prompt format and
    prompt language (English, the headline language, unless asked; None: every language; tables without a
    `language` column are English)."""
    keep = (frame["definition"] == definition) & (frame["format"] == prompt_format)
    if "language" in frame.columns and language is not None:
        keep &= frame["language"] == language
    return frame[keep]


# Why a test of a change has no p: the change is within the noise floor (params `stats.noise_floor`,
# docs/method.md "Noise floor"); stored in the `p_reason` columns, printed "undefined (<reason>)".
NO_CHANGE = "no change (within the noise floor)"


# Code names as the report's words (legends, axes, table cells): one map for charts, tables and text.
WORDS = {
    SELF: "self-referent", NEUTRAL: "neutral", THIRD: "third person", CONFOUNDER: "confounder (user)",
    "compression": "compression", "gain": "gain", "no_change": "no change", "near_zero": "near zero",
    "raw": "raw", "no_bos": "without first token", "normalised": "length-normalised", "chat": "chat template",
    "mean_ablation@base": "mean ablation in base", "zero_ablation@base": "zero ablation in base",
    "mean_ablation@instruct": "mean ablation in instruct", "zero_ablation@instruct": "zero ablation in instruct",
    "patch_base_into_instruct": "base patched into instruct", "patch_instruct_into_base": "instruct patched into base",
    "split_half_r": "split-half r", "spearman_brown": "Spearman–Brown", "entropy_later": "later layers' entropy",
    "candidate": "candidate", "control": "control head", "null_check": "top-ranked (no candidate)",
    "en": "English", "zh": "Chinese", "es": "Spanish", "none": "none",
}


def words(code) -> str:
    """A code name (category, class, definition, intervention, language, ...) as the report writes it."""
    return WORDS.get(str(code), str(code))
