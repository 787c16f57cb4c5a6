"""How large is float32 noise? Identical computations run in differently composed (padded) batches.

Each of the suite's checkpoints runs the English prompts twice, once alone (batch size 1, no padding) and once
in length-sorted batches of `extract.batch_size` (padded). Every quantity the inference tests is computed from
both runs; their difference is noise only, since the model, prompts and code are the same. The largest
difference per quantity is what `selfref noise-floor` prints; params.yaml's floors (`stats.noise_floor`,
`patch.noise_floor`) were set from it once, with a safety margin (docs/method.md, "Noise floor").
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from analysis.models import checkpoints
from analysis.core.config import Config
from analysis.extraction.runner import encode_prompts, open_checkpoint
from analysis.interventions.patching import PATCH_CATEGORIES, kl_divergence, later_entropy
from analysis.core.prompts import load_prompts
from analysis.core.quantities import NEUTRAL, SELF, SOURCE_LANGUAGE, rfc

QUANTITIES = ("entropy", "layer_entropy", "rfc", "diff_self_neutral", "kl", "entropy_later")


def _quantities(entropy: np.ndarray, categories: np.ndarray) -> dict[str, np.ndarray]:
    """Per-layer profiles of one run: mean entropy per category and layer, RFC and H_self - H_neutral."""
    layer = entropy.mean(axis=2)
    h_self, h_neutral = layer[categories == SELF].mean(axis=0), layer[categories == NEUTRAL].mean(axis=0)
    return {"rfc": rfc(h_self, h_neutral), "diff_self_neutral": h_self - h_neutral}


def measure_checkpoint(config: Config, name: str, prompt_texts: list[str], prompts) -> dict[str, float]:
    """Largest |run alone - run padded| of every quantity for one checkpoint (definition: the headline one)."""
    paths = config.paths
    ckpt = config.checkpoint(name)
    manifest = checkpoints.read_manifest(paths, name)
    folder = checkpoints.local_dir(manifest, ckpt.demo, prompt_texts, paths)
    settings = dataclasses.replace(config.extract, device="cpu")
    loaded = open_checkpoint(folder, checkpoint=name, settings=settings)
    encoded = encode_prompts(loaded.tokenizer, prompts, "raw", settings)
    reducer = {"logits": lambda batch, log_probs: {"log_probs": log_probs}}
    definition = config.stats.headline_definition
    alone = loaded.runner.run(encoded, 1, progress=False, **reducer)
    padded = loaded.runner.run(encoded, config.extract.batch_size, progress=False, **reducer)
    a, b = alone[definition], padded[definition]
    categories = prompts["category"].to_numpy()
    qa, qb = _quantities(a, categories), _quantities(b, categories)
    kl = kl_divergence(torch.as_tensor(alone["log_probs"], dtype=torch.float64),
                       torch.as_tensor(padded["log_probs"], dtype=torch.float64)).numpy()
    later = [np.abs(later_entropy(a, layer) - later_entropy(b, layer)) for layer in range(a.shape[1] - 1)]
    return {"entropy": float(np.abs(a - b).max()),
            "layer_entropy": float(np.abs(a.mean(axis=2) - b.mean(axis=2)).max()),
            "rfc": float(np.abs(qa["rfc"] - qb["rfc"]).max()),
            "diff_self_neutral": float(np.abs(qa["diff_self_neutral"] - qb["diff_self_neutral"]).max()),
            "kl": float(np.abs(kl).max()),
            "entropy_later": float(np.max(later)) if later else 0.0}


def measure(config: Config) -> dict[str, dict[str, float]]:
    """Per checkpoint of the active suite, the largest batch-composition difference of every quantity."""
    every = load_prompts(config.paths.prompts, config.prompts.min_per_category)
    prompts = every[(every["language"] == SOURCE_LANGUAGE) & every["category"].isin(PATCH_CATEGORIES)]
    prompts = prompts.reset_index(drop=True)
    corpus = checkpoints.tokenizer_corpus(config.paths, config.prompts.min_per_category)
    return {c.name: measure_checkpoint(config, c.name, corpus, prompts) for c in config.checkpoints}
