"""The residual stream after each layer, pooled over the user's tokens of each prompt (their mean and the last of
them), captured by hooks in the extraction pass (no second forward), and stored compactly and losslessly for
linear probes (docs/method.md, "What the residual stream encodes").

Storage: per layer and pool, the prompts' vectors are centred and written as their coordinates in the prompts' own
span (the SVD's U·S: k = min(P − 1, d) columns). Distances and inner products of centred vectors are kept exactly, so
any rotation-invariant probe (a logistic regression with an L2 penalty and an intercept, on features scaled by one
number per layer) fits the same on the coordinates as on the full vectors, and the file's size no longer grows with
the model width: P × k × layers × 2 pools × 2 bytes (float16), 37 MB for 540 prompts and 32 layers of 4096.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from analysis.core.artefacts import read_safetensors, write_safetensors
from analysis.core.errors import UserError
from analysis.core.quantities import POOLS

HOOK = "blocks.{layer}.hook_resid_post"  # TransformerBridge: the residual stream after block `layer`
STORED_DTYPE = np.float16
FORMAT_VERSION = "1"


def user_token_masks(tokenizer: Any, encoded: list[Any]) -> list[tuple[bool, ...]]:
    """Per prompt, the positions pooled: its counted query positions (the user's text) that are not special tokens
    (BOS, template markers): a BOS is the same vector for every prompt and would only dilute the mean."""
    special = set(tokenizer.all_special_ids)
    out = []
    for e in encoded:
        mask = tuple(bool(q) and t not in special for q, t in zip(e.query_mask, e.input_ids))
        if not any(mask):
            raise UserError(f"a prompt of {len(e.input_ids)} tokens has no user token that is not a special token")
        out.append(mask)
    return out


def pooled_residual_hooks(masks: list[tuple[bool, ...]], n_layers: int):
    """Batch hooks for EntropyRunner.run: per layer, the mean and the last of the pooled positions of
    `blocks.<l>.hook_resid_post`, in float32, as extras `resid_<pool>_<layer>` [batch, d_model]."""

    def batch_hooks(batch: list[int], ids: torch.Tensor, attention: torch.Tensor,
                    extras: dict[str, torch.Tensor]) -> list[tuple[str, Any]]:
        width = ids.shape[1]
        keep = torch.zeros((len(batch), width), dtype=torch.float32)
        for row, i in enumerate(batch):
            keep[row, : len(masks[i])] = torch.tensor(masks[i], dtype=torch.float32)
        last = torch.tensor([max(j for j, m in enumerate(masks[i]) if m) for i in batch])

        def hook(resid: torch.Tensor, hook: Any) -> None:
            layer = int(hook.name.split(".")[1])
            values = resid.float()
            weights = keep.to(values.device)
            extras[f"resid_mean_{layer}"] = (values * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
            extras[f"resid_last_{layer}"] = values[torch.arange(values.shape[0], device=values.device),
                                                   last.to(values.device)]

        return [(HOOK.format(layer=layer), hook) for layer in range(n_layers)]

    return batch_hooks


def pooled_arrays(values: dict[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    """pool -> [layers, prompts, d_model] float64 from the runner's extras."""
    out = {}
    for pool in POOLS:
        missing = [layer for layer in range(n_layers) if f"resid_{pool}_{layer}" not in values]
        if missing:
            raise UserError(f"no residual stream reached the hooks of layers {missing}")
        out[pool] = np.stack([values[f"resid_{pool}_{layer}"] for layer in range(n_layers)]).astype(np.float64)
        if not np.isfinite(out[pool]).all():
            raise UserError("non-finite values in the residual stream; try extract.dtype float32")
    return out


def span_coordinates(vectors: np.ndarray) -> np.ndarray:
    """[P, k] coordinates of the centred rows of `vectors` [P, d] in their own span (U·S of the SVD, k = min(P − 1,
    d), at least 1); each column's sign fixed so that its largest entry is positive. Gram matrix of centred rows kept."""
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    k = max(1, min(vectors.shape[0] - 1, vectors.shape[1]))
    scores = u[:, :k] * s[:k]
    flip = np.sign(scores[np.argmax(np.abs(scores), axis=0), np.arange(k)])
    return scores * np.where(flip == 0, 1.0, flip)


@dataclass
class ResidualSet:
    """One checkpoint's pooled residual stream: features[pool] [layers, prompts, k] (float32 after reading), with
    the prompt ids in order and the token ids fed (the bag-of-tokens baseline reads them)."""

    checkpoint: str
    prompt_ids: list[str]
    features: dict[str, np.ndarray]
    input_ids: list[list[int]]
    d_model: int

    @property
    def n_layers(self) -> int:
        return next(iter(self.features.values())).shape[0]


def compress(checkpoint: str, prompt_ids: list[str], pooled: dict[str, np.ndarray],
             input_ids: list[list[int]]) -> ResidualSet:
    """Every layer and pool in span coordinates (span_coordinates)."""
    features = {pool: np.stack([span_coordinates(layer) for layer in arrays]) for pool, arrays in pooled.items()}
    d_model = next(iter(pooled.values())).shape[2]
    return ResidualSet(checkpoint, list(prompt_ids), features, [list(map(int, x)) for x in input_ids], d_model)


def write_residuals(residuals: ResidualSet, path) -> None:
    """The residual file: per pool float16 [layers, prompts, k] divided by one scale per layer (float32, `scale_<pool>`,
    the root mean square of the layer's coordinates), the token ids padded with −1, and the prompt ids as metadata."""
    tensors = {}
    for pool, values in residuals.features.items():
        scale = np.sqrt(np.mean(values ** 2, axis=(1, 2)))
        scale = np.where(scale > 0, scale, 1.0)
        scaled = values / scale[:, None, None]
        tensors[pool] = scaled.astype(STORED_DTYPE)
        tensors[f"scale_{pool}"] = scale.astype(np.float32)
    width = max(len(x) for x in residuals.input_ids)
    ids = np.full((len(residuals.input_ids), width), -1, dtype=np.int32)
    for row, x in enumerate(residuals.input_ids):
        ids[row, : len(x)] = x
    tensors["input_ids"] = ids
    metadata = {"checkpoint": residuals.checkpoint, "prompt_ids": json.dumps(residuals.prompt_ids),
                "pools": json.dumps(list(residuals.features)), "d_model": str(residuals.d_model),
                "prompt_format": "raw", "format_version": FORMAT_VERSION,
                "content": "per pool [layer, prompt, k]: centred pooled residual stream after each layer in the "
                           "prompts' span coordinates, divided by scale_<pool>[layer]"}
    write_safetensors(tensors, metadata, path)


def read_residuals(path) -> ResidualSet:
    """A residual file as float32 features (scale applied)."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: written by another version of this project; rebuild it with `dvc repro`")
    features = {pool: tensors[pool].astype(np.float32) * tensors[f"scale_{pool}"][:, None, None]
                for pool in json.loads(metadata["pools"])}
    ids = [[int(t) for t in row if t >= 0] for row in tensors["input_ids"]]
    return ResidualSet(metadata["checkpoint"], json.loads(metadata["prompt_ids"]), features, ids,
                       int(metadata["d_model"]))
