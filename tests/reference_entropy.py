"""An independent computation of attention entropies for the tests: transformers' eager attention, one
prompt at a time, entropies in float64 Python loops (no code shared with analysis/extraction/runner/entropy.py)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def eager_entropies(local_dir, prompts) -> dict[str, np.ndarray]:
    """[prompt, layer, head] entropies for `prompts`, a list of (input_ids, query_mask) pairs."""
    model = AutoModelForCausalLM.from_pretrained(local_dir, attn_implementation="eager").eval()
    out = {"raw": [], "no_bos": [], "normalised": []}
    for input_ids, query_mask in prompts:
        with torch.no_grad():
            attn = model(torch.tensor([list(input_ids)]), output_attentions=True).attentions
        counted = [q for q, m in enumerate(query_mask) if m]
        later = [q for q in counted if q >= 1]
        rows = {k: [] for k in out}
        for layer in attn:
            p = layer[0].double().numpy()  # [heads, query, key]
            raw, nob, norm = [], [], []
            for h in range(p.shape[0]):
                ent = {q: -sum(x * np.log(x) for x in p[h, q, : q + 1] if x > 0) for q in counted}
                raw.append(np.mean([ent[q] for q in counted]))
                norm.append(np.mean([ent[q] / np.log(q + 1) for q in later]))
                rest = []
                for q in later:
                    r = p[h, q, 1: q + 1]
                    r = r / r.sum() if r.sum() > 0 else r
                    rest.append(-sum(x * np.log(x) for x in r if x > 0))
                nob.append(np.mean(rest))
            rows["raw"].append(raw)
            rows["no_bos"].append(nob)
            rows["normalised"].append(norm)
        for k in out:
            out[k].append(rows[k])
    return {k: np.array(v) for k, v in out.items()}
