"""Do the candidate heads matter? Ablation and base<->instruct activation patching of single heads.

For the selected heads (the family's top candidates and seeded random controls of the same layers) and each
intervention, the prompt list is replicated once per head and run through the extraction's runner (same
batching, padding, pattern hooks and out-of-memory splitting), with one more hook on the heads' output before
the output projection (`blocks.<l>.attn.hook_z`, per query head) that intervenes on each row's own head, so
a forward pass covers several heads. Per prompt: the KL divergence of the next-token
distribution at the last position from the unpatched run, and the mean entropy of the layers after the
head. docs/method.md, "Interventions on heads", says why mean ablation, KL and random controls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from analysis.core.errors import UserError
from analysis.extraction.runner import EncodedPrompt, EntropyRunner
from analysis.core.quantities import NEUTRAL, SELF, head_label, rfc
from analysis.core.ranking import ordered
from analysis.statistics.resampling import (
    bootstrap_group_means,
    fdr_bh,
    group_means,
    paired_permutation_test,
    percentile_ci,
    rng_for,
    sign_flips,
    stratified_bootstrap_indices,
)

OTHER = {"base": "instruct", "instruct": "base"}


@dataclass(frozen=True)
class Intervention:
    """What replaces a head's output, in which variant's run: its neutral mean, zeros, or the other variant's."""

    name: str
    variant: str  # the run that is intervened on
    kind: str     # mean_ablation | zero_ablation | patch


INTERVENTIONS = (
    Intervention("mean_ablation@base", "base", "mean_ablation"),
    Intervention("zero_ablation@base", "base", "zero_ablation"),
    Intervention("mean_ablation@instruct", "instruct", "mean_ablation"),
    Intervention("zero_ablation@instruct", "instruct", "zero_ablation"),
    Intervention("patch_base_into_instruct", "instruct", "patch"),
    Intervention("patch_instruct_into_base", "base", "patch"),
)
# The prompts intervened on: the categories the effects and their specificity compare (English prompts only).
PATCH_CATEGORIES = (SELF, NEUTRAL)
# Per-prompt effect sizes summarised per head: KL of the next-token distribution, and the absolute change of
# the mean entropy of the layers after the head (what the planted structure of the demo is about).
METRICS = ("kl", "entropy_later")


def check_identical_ids(base: list[EncodedPrompt], instruct: list[EncodedPrompt], prompt_ids: list[str],
                        family: str) -> None:
    """Patching is position by position: refuse unless base and instruct tokenise every prompt identically."""
    for pid, b, i in zip(prompt_ids, base, instruct):
        if b.input_ids != i.input_ids or b.query_mask != i.query_mask:
            raise UserError(f"{family}: prompt {pid} tokenises differently in base and instruct "
                            f"({len(b.input_ids)} vs {len(i.input_ids)} tokens); activation patching needs "
                            "identical token ids (docs/method.md, \"Interventions on heads\"); use checkpoints "
                            "that share a tokenizer")


def select_controls(heads: pd.DataFrame, top_k: int, per_candidate: int, seed: int, family: str,
                    decimals: int) -> pd.DataFrame:
    """Candidates (position <= top_k in the heads table) and, per candidate, `per_candidate` seeded random non-candidate heads of the
    same layer with similar base entropy: the closer half of the layer's heads by |Δ base entropy| (at least
    `per_candidate`); a layer with too few heads is widened to its nearest layers. Entropy gaps are compared
    at `decimals` precision, ties by (layer, head) (analysis/core/ranking.py), so float noise cannot change the pool.

    Returns rows (role, layer, head, candidate): role 'candidate' or 'control', candidate the label of
    the candidate a control stands beside (its own label for a candidate).
    """
    table = heads.sort_values("position")
    cands = table[table["position"] <= top_k]
    others = table[table["position"] > top_k]
    if len(others) < per_candidate:
        raise UserError(f"{family}: {len(others)} non-candidate heads, fewer than patch.controls_per_candidate "
                        f"= {per_candidate}; lower patch.top_k or patch.controls_per_candidate")
    rows = []
    for c in cands.itertuples():
        label = head_label(c.layer, c.head)
        rows.append({"role": "candidate", "layer": int(c.layer), "head": int(c.head), "candidate": label})
        distance = (others["layer"] - c.layer).abs()
        pool = others[distance == 0]
        for d in sorted(set(distance)):
            if len(pool) >= per_candidate:
                break
            pool = others[distance <= d]
        pool = ordered(pool.assign(gap=(pool["base_entropy"] - c.base_entropy).abs()), "gap", decimals)
        near = pool.head(max(per_candidate, math.ceil(len(pool) / 2)))
        pick = rng_for(seed, "patch_controls", family, label).choice(len(near), size=per_candidate, replace=False)
        for r in near.iloc[np.sort(pick)].itertuples():
            rows.append({"role": "control", "layer": int(r.layer), "head": int(r.head), "candidate": label})
    return pd.DataFrame(rows)


def _as_heads(z: torch.Tensor, n_heads: int) -> torch.Tensor:
    """hook_z as [batch, pos, n_heads, d_head] (the bridge gives it flattened over heads)."""
    return z if z.dim() == 4 else z.view(*z.shape[:2], n_heads, -1)


def capture_hooks(heads: list[tuple[int, int]], n_heads: int, width: int):
    """Batch hooks that copy the listed heads' outputs [batch, width, n_sel, d_head] (zero-padded) into extras['z']."""
    by_layer: dict[int, list[int]] = {}
    for i, (layer, _) in enumerate(heads):
        by_layer.setdefault(layer, []).append(i)

    def make(batch, ids, attention, extras):
        def hook(z, hook):
            layer = int(hook.name.split(".")[1])
            zh = _as_heads(z, n_heads)
            if "z" not in extras:
                extras["z"] = torch.zeros((zh.shape[0], width, len(heads), zh.shape[-1]), dtype=torch.float32)
            for i in by_layer[layer]:
                extras["z"][:, : zh.shape[1], i] = zh[:, :, heads[i][1]].float().cpu()
            return z
        return [(f"blocks.{layer}.attn.hook_z", hook) for layer in by_layer]

    return make


def replace_hooks(heads: list[tuple[int, int]], n_prompts: int, n_heads: int, replacement: torch.Tensor):
    """Batch hooks for the head-replicated prompt list (row = copy * n_prompts + prompt, copy i intervenes on
    heads[i]): each row's head output is overwritten with replacement[copy, prompt] ([n_sel, n_prompts, width,
    d_head]), so one forward pass intervenes on several heads, one per row."""

    def make(batch, ids, attention, extras):
        rows = torch.as_tensor(batch)
        copy, prompt = rows // n_prompts, rows % n_prompts
        layer_of = torch.tensor([layer for layer, _ in heads])[copy]
        head_of = torch.tensor([head for _, head in heads])[copy]

        def hook(z, hook):
            pick = (layer_of == int(hook.name.split(".")[1])).nonzero().flatten()
            new = z.clone()
            view = _as_heads(new, n_heads)
            source = replacement[copy[pick], prompt[pick], : z.shape[1]]
            view[pick.to(z.device), :, head_of[pick].to(z.device)] = source.to(device=z.device, dtype=z.dtype)
            return new
        return [(f"blocks.{layer}.attn.hook_z", hook) for layer in sorted({int(x) for x in layer_of})]

    return make


def neutral_mean(z: np.ndarray, lengths: np.ndarray, is_neutral: np.ndarray) -> np.ndarray:
    """Mean-ablation replacement [n_prompts, width, d_head] for one head from its clean outputs z [n_prompts,
    width, d_head]: at position 0 the mean of position 0 over neutral prompts, at every later position the
    mean over all later (real) positions of the neutral prompts (prompts differ in length)."""
    n, width, d = z.shape
    real = np.arange(width)[None, :] < lengths[:, None]
    later = real & (np.arange(width)[None, :] >= 1) & is_neutral[:, None]
    first = z[is_neutral, 0].mean(axis=0)
    rest = z[later].mean(axis=0)
    out = np.broadcast_to(rest, (n, width, d)).copy()
    out[:, 0] = first
    return out.astype(np.float32)


def kl_divergence(clean: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(clean || other) per row of log-probabilities [n, vocab], in nats."""
    return (clean.exp() * (clean - other)).sum(dim=-1)


def later_entropy(entropy: np.ndarray, layer: int) -> np.ndarray:
    """Per prompt, the mean entropy over all heads of the layers after `layer` ([n_prompts, L, H]); NaN if none."""
    if layer + 1 >= entropy.shape[1]:
        return np.full(entropy.shape[0], np.nan)
    return entropy[:, layer + 1:].mean(axis=(1, 2))


@dataclass
class CleanRun:
    """One variant's unpatched run: entropies [prompt, layer, head], last-position log-probs, head outputs."""

    entropy: np.ndarray
    log_probs: np.ndarray
    z: np.ndarray  # [prompt, width, n_sel, d_head]


def clean_run(runner: EntropyRunner, encoded: list[EncodedPrompt], heads: list[tuple[int, int]], batch_size: int,
              definition: str, label: str) -> CleanRun:
    width = max(len(e.input_ids) for e in encoded)
    out = runner.run(encoded, batch_size, label=label, logits=lambda batch, log_probs: {"log_probs": log_probs},
                     progress=False, batch_hooks=capture_hooks(heads, runner.n_heads, width))
    return CleanRun(out[definition], out["log_probs"], out["z"])


def kl_from(clean_log_probs: np.ndarray, n_prompts: int):
    """Logit reducer: per row of the head-replicated prompt list, KL(clean run of its prompt || this run)."""
    clean = torch.as_tensor(clean_log_probs, dtype=torch.float64)

    def reduce(batch, log_probs):
        p = clean[torch.as_tensor(batch) % n_prompts].to(log_probs.device)
        return {"kl": kl_divergence(p, log_probs)}

    return reduce


def replacement_for(iv: Intervention, clean: dict[str, CleanRun], lengths: np.ndarray,
                    is_neutral: np.ndarray) -> torch.Tensor:
    """What replaces each selected head's output in `iv`: [n_sel, n_prompts, width, d_head]."""
    own = clean[iv.variant].z
    if iv.kind == "mean_ablation":
        out = np.stack([neutral_mean(own[:, :, i], lengths, is_neutral) for i in range(own.shape[2])])
    elif iv.kind == "zero_ablation":
        out = np.zeros((own.shape[2], own.shape[0], own.shape[1], own.shape[3]), dtype=np.float32)
    else:
        out = np.moveaxis(clean[OTHER[iv.variant]].z, 2, 0)
    return torch.as_tensor(np.ascontiguousarray(out))


def intervened_runs(runners: dict[str, EntropyRunner], encoded: list[EncodedPrompt], is_neutral: np.ndarray,
                    unique: list[tuple[int, int]], batch_size: int, definition: str,
                    family: str) -> tuple[dict[str, CleanRun], dict[str, dict[str, np.ndarray]]]:
    """The clean runs of both variants and, per intervention, the intervened runs of every selected head:
    entropies [n_sel, n_prompts, layer, head] and KL from the clean run [n_sel, n_prompts]. Each intervention
    is one pass over the prompt list replicated once per head (`batch_size` rows per forward pass)."""
    clean = {v: clean_run(runners[v], encoded, unique, batch_size, definition, f"{family}-{v}") for v in runners}
    lengths = np.array([len(e.input_ids) for e in encoded])
    n, n_sel = len(encoded), len(unique)
    replicated = [e for _ in unique for e in encoded]
    runs = {}
    for iv in INTERVENTIONS:
        runner = runners[iv.variant]
        out = runner.run(replicated, batch_size, label=f"{family} {iv.name}", progress=False,
                         logits=kl_from(clean[iv.variant].log_probs, n),
                         batch_hooks=replace_hooks(unique, n, runner.n_heads,
                                                   replacement_for(iv, clean, lengths, is_neutral)))
        runs[iv.name] = {"entropy": out[definition].reshape(n_sel, n, *out[definition].shape[1:]),
                         "kl": out["kl"].reshape(n_sel, n)}
    return clean, runs


def run_interventions(runners: dict[str, EntropyRunner], encoded: list[EncodedPrompt], prompts: pd.DataFrame,
                      heads: pd.DataFrame, batch_size: int, definition: str,
                      family: str) -> tuple[pd.DataFrame, dict[str, CleanRun], dict[str, dict[str, np.ndarray]]]:
    """Per (intervention, head, prompt): KL from the unpatched run and the later layers' mean entropy (intervened,
    clean, and the other variant's clean run).

    `runners` maps base/instruct to their runners; `encoded` are the prompts (identical ids in both);
    `heads` the output of `select_controls`. Returns the per-prompt table, the clean runs and the intervened
    runs (`intervened_runs`).
    """
    unique = sorted({(int(r.layer), int(r.head)) for r in heads.itertuples()})
    is_neutral = (prompts["category"] == NEUTRAL).to_numpy()
    clean, runs = intervened_runs(runners, encoded, is_neutral, unique, batch_size, definition, family)
    frames = []
    for iv in INTERVENTIONS:
        own, other = clean[iv.variant], clean[OTHER[iv.variant]]
        for i, (layer, head) in enumerate(unique):
            frames.append(pd.DataFrame({
                "intervention": iv.name, "variant": iv.variant, "kind": iv.kind,
                "layer": layer, "head": head,
                "prompt_id": prompts["prompt_id"].to_numpy(), "category": prompts["category"].to_numpy(),
                "kl": runs[iv.name]["kl"][i],
                "h_later_clean": later_entropy(own.entropy, layer),
                "h_later": later_entropy(runs[iv.name]["entropy"][i], layer),
                "h_later_other": later_entropy(other.entropy, layer),
            }))
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "family", family)
    for col in ("layer", "head"):
        table[col] = table[col].astype("int32")
    return table, clean, runs


def _metric_values(rows: pd.DataFrame, metric: str, effect_floor: float) -> np.ndarray:
    """Per-prompt effect: KL, or |Δ later-layer mean entropy| with changes below `effect_floor` set to 0 (the same
    computation in differently padded batches differs by ~1e-7 nats in float32; such noise is no effect)."""
    if metric == "kl":
        return rows["kl"].to_numpy(dtype=float)
    change = (rows["h_later"] - rows["h_later_clean"]).abs().to_numpy(dtype=float)
    return np.where(change < effect_floor, 0.0, change)


def summarise(per_prompt: pd.DataFrame, selection: pd.DataFrame, *, seed: int, n_resamples: int,
              n_permutations: int, confidence: float, effect_floor: float) -> pd.DataFrame:
    """Per (intervention, metric, head): effect on self-referent and neutral prompts with prompt-bootstrap
    intervals, specificity = self / neutral effect, the change of RFC over the later layers (and the other
    variant's RFC there), the candidate's percentile among the family's control heads, and a paired
    permutation p of (candidate - mean of its own controls) on self-referent prompts, BH across candidates."""
    family = str(per_prompt["family"].iloc[0])
    rows_out = []
    for iv in INTERVENTIONS:
        sub = per_prompt[per_prompt["intervention"] == iv.name]
        first = sub[(sub["layer"] == sub["layer"].iloc[0]) & (sub["head"] == sub["head"].iloc[0])]
        categories = first["category"].to_numpy()
        # one bootstrap of prompt indices per intervention, shared by every head (paired across heads)
        indices = stratified_bootstrap_indices(categories, n_resamples, rng_for(seed, "patch_boot", family, iv.name))
        signs = sign_flips(len(categories), n_permutations, rng_for(seed, "patch_perm", family, iv.name))
        values: dict[tuple[str, int, int], np.ndarray] = {}
        for (layer, head), rows in sub.groupby(["layer", "head"], sort=True):
            rows = rows.set_index("prompt_id").loc[first["prompt_id"]]
            clean = rows["h_later_clean"].to_numpy(dtype=float)
            patched = rows["h_later"].to_numpy(dtype=float)
            other = rows["h_later_other"].to_numpy(dtype=float)
            m_clean, m_patched, m_other = (group_means(x, categories) for x in (clean, patched, other))
            b_clean, b_patched = (bootstrap_group_means(x, categories, indices) for x in (clean, patched))
            delta = rfc(b_patched[SELF], b_patched[NEUTRAL]) - rfc(b_clean[SELF], b_clean[NEUTRAL])
            d_lo, d_hi = percentile_ci(delta, confidence) if np.isfinite(delta).all() else (np.nan, np.nan)
            rfc_clean = float(rfc(m_clean[SELF], m_clean[NEUTRAL])[0])
            rfc_patched = float(rfc(m_patched[SELF], m_patched[NEUTRAL])[0])
            for metric in METRICS:
                v = _metric_values(rows.reset_index(), metric, effect_floor)
                values[(metric, int(layer), int(head))] = v
                means, boot = group_means(v, categories), bootstrap_group_means(v, categories, indices)
                e_self, e_neutral = float(means[SELF][0]), float(means[NEUTRAL][0])
                lo, hi = percentile_ci(boot[SELF], confidence) if np.isfinite(v).all() else (np.nan, np.nan)
                undefined = not np.isfinite(e_neutral) or e_neutral < effect_floor
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = boot[SELF] / boot[NEUTRAL]
                s_lo, s_hi = (np.nan, np.nan) if undefined or not np.isfinite(ratio).all() else percentile_ci(ratio, confidence)
                rows_out.append({
                    "family": family, "intervention": iv.name, "variant": iv.variant, "kind": iv.kind,
                    "metric": metric, "layer": int(layer), "head": int(head),
                    "effect_self": e_self, "effect_self_lo": float(lo), "effect_self_hi": float(hi),
                    "effect_neutral": e_neutral,
                    "specificity": np.nan if undefined else e_self / e_neutral,
                    "specificity_lo": float(s_lo), "specificity_hi": float(s_hi),
                    "rfc_later_clean": rfc_clean, "rfc_later": rfc_patched,
                    "rfc_later_other": float(rfc(m_other[SELF], m_other[NEUTRAL])[0]),
                    "delta_rfc_later": rfc_patched - rfc_clean,
                    "delta_rfc_later_lo": float(d_lo), "delta_rfc_later_hi": float(d_hi),
                })
        # candidates against controls: percentile among the family's controls, paired test against its own
        is_self = categories == SELF
        for metric in METRICS:
            cands = selection[selection["role"] == "candidate"]
            controls = selection[selection["role"] == "control"]
            control_heads = sorted({(int(r.layer), int(r.head)) for r in controls.itertuples()})
            control_effects = np.array([np.mean(values[(metric,) + h][is_self]) for h in control_heads])
            control_effects = control_effects[np.isfinite(control_effects)]  # a last-layer head has no later layers
            ps = []
            for c in cands.itertuples():
                own = values[(metric, int(c.layer), int(c.head))][is_self]
                mine = controls[controls["candidate"] == c.candidate]
                ctrl = np.mean([values[(metric, int(r.layer), int(r.head))][is_self] for r in mine.itertuples()], axis=0)
                effect = float(np.mean(own))
                percentile = (100.0 * float(np.mean(control_effects < effect))
                              if np.isfinite(effect) and control_effects.size else np.nan)
                _, p = paired_permutation_test(ctrl[:, None], own[:, None], np.full(own.size, SELF),
                                               lambda b, i: i[SELF] - b[SELF], signs[:, is_self])
                ps.append((c.layer, c.head, percentile, float(p[0]), float(np.mean(own) - np.mean(ctrl))))
            q = fdr_bh(np.array([x[3] for x in ps]))
            for (layer, head, percentile, p, diff), qv in zip(ps, q):
                for row in rows_out:
                    if (row["intervention"], row["metric"], row["layer"], row["head"]) == (iv.name, metric, layer, head):
                        row.update({"control_percentile": percentile, "minus_controls": diff, "p_value": p,
                                    "q_value": float(qv)})
    table = pd.DataFrame(rows_out)
    roles = selection.groupby(["layer", "head"])["role"].agg(lambda r: "candidate" if "candidate" in set(r) else "control")
    table["role"] = [roles[(l, h)] for l, h in zip(table["layer"], table["head"])]
    for col in ("control_percentile", "minus_controls", "p_value", "q_value"):
        if col not in table:
            table[col] = np.nan
    return table
