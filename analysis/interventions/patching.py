"""Do the candidate heads matter? Ablation and base<->instruct activation patching of single heads.

For the selected heads (the family's top candidates and seeded random controls of the same layers) and each
intervention, the prompt list is replicated once per head and run through the extraction's runner (same
batching, padding, pattern hooks and out-of-memory splitting), with one more hook on the heads' output before
the output projection (`blocks.<l>.attn.hook_z`, per query head) that intervenes on each row's own head, so
a forward pass covers several heads. Per prompt: the KL divergence of the next-token
distribution at the last position from the unpatched run, and the mean entropy of the layers after the
head. A candidate is tested against the other heads of its own layer (`control_test`): between-head variation,
one-sided, BH across candidates; effects within the metric's noise floor are exactly 0 and are not tested.
docs/method.md, "Interventions on heads", says why mean ablation, KL and same-layer controls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats

from analysis.core.errors import UserError
from analysis.core.layout import checkpoint_name
from analysis.extraction.runner import EncodedPrompt, EntropyRunner
from analysis.core.quantities import NEUTRAL, SELF, head_label, rfc
from analysis.statistics.resampling import (
    bootstrap_group_means,
    fdr_bh,
    group_means,
    percentile_ci,
    rng_for,
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


def interventions_for(variants) -> tuple[Intervention, ...]:
    """The interventions a family's checkpoints allow: for base and instruct every one of INTERVENTIONS; a family of
    a single checkpoint is mean-ablated only (never patched: there is no other variant; zero ablation is kept for
    the pairs only to compare with the original study's plan, and would double the stage's time on real weights)."""
    have = set(variants)
    if len(have) == 1:
        return tuple(iv for iv in INTERVENTIONS if iv.variant in have and iv.kind == "mean_ablation")
    return tuple(iv for iv in INTERVENTIONS if iv.variant in have and (iv.kind != "patch" or OTHER[iv.variant] in have))


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


def select_controls(heads: pd.DataFrame, top_k: int, max_controls: int, seed: int, family: str) -> pd.DataFrame:
    """Candidates (position <= top_k in the heads table, analysis/ranking.py) and, per candidate, the non-candidate
    heads of its own layer in (layer, head) order: all of them, or a seeded draw of `max_controls` where the layer
    has more (no score is compared, so float noise cannot change the choice). A candidate whose layer has fewer
    than two other heads gets no test (`control_test` says why).

    Returns rows (role, layer, head, candidate): role 'candidate' or 'control', candidate the label of
    the candidate a control stands beside (its own label for a candidate).
    """
    table = heads.sort_values(["position", "layer", "head"])
    cands = table[table["position"] <= top_k]
    others = table[table["position"] > top_k]
    rows = []
    for c in cands.itertuples():
        label = head_label(c.layer, c.head)
        rows.append({"role": "candidate", "layer": int(c.layer), "head": int(c.head), "candidate": label})
        pool = others[others["layer"] == c.layer].sort_values(["layer", "head"])
        if len(pool) > max_controls:
            pick = rng_for(seed, "patch_controls", family, label).choice(len(pool), size=max_controls, replace=False)
            pool = pool.iloc[np.sort(pick)]
        for r in pool.itertuples():
            rows.append({"role": "control", "layer": int(r.layer), "head": int(r.head), "candidate": label})
    return pd.DataFrame(rows, columns=["role", "layer", "head", "candidate"])


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
    clean = {v: clean_run(runners[v], encoded, unique, batch_size, definition, checkpoint_name(family, v)) for v in runners}
    lengths = np.array([len(e.input_ids) for e in encoded])
    n, n_sel = len(encoded), len(unique)
    replicated = [e for _ in unique for e in encoded]
    runs = {}
    for iv in interventions_for(runners):
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
    for iv in interventions_for(runners):
        own, other = clean[iv.variant], clean.get(OTHER[iv.variant])
        for i, (layer, head) in enumerate(unique):
            frames.append(pd.DataFrame({
                "intervention": iv.name, "variant": iv.variant, "kind": iv.kind,
                "layer": layer, "head": head,
                "prompt_id": prompts["prompt_id"].to_numpy(), "category": prompts["category"].to_numpy(),
                "kl": runs[iv.name]["kl"][i],
                "h_later_clean": later_entropy(own.entropy, layer),
                "h_later": later_entropy(runs[iv.name]["entropy"][i], layer),
                "h_later_other": (later_entropy(other.entropy, layer) if other is not None
                                  else np.full(len(prompts), np.nan)),
            }))
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "family", family)
    for col in ("layer", "head"):
        table[col] = table[col].astype("int32")
    return table, clean, runs


# Why a candidate's test, or a ratio, has no value (stored in the *_reason columns; the report prints
# "undefined (<reason>)" or, for an effect within the floor, "no effect").
NO_EFFECT = "no effect (within the noise floor)"
NO_LATER_LAYER = "no later layer"
TOO_FEW_CONTROLS = "fewer than 2 other heads in its layer"
NEUTRAL_WITHIN_FLOOR = "neutral effect within the noise floor"


def _metric_values(rows: pd.DataFrame, metric: str, floor: float) -> np.ndarray:
    """Per-prompt effect: KL, or |Δ later-layer mean entropy|; a value within `floor` (float32 noise: the same
    computation in differently padded batches, docs/method.md "Noise floor") is exactly 0."""
    if metric == "kl":
        value = rows["kl"].to_numpy(dtype=float)
    else:
        value = (rows["h_later"] - rows["h_later_clean"]).abs().to_numpy(dtype=float)
    return np.where(np.abs(value) <= floor, 0.0, value)


def control_test(effect: float, controls: np.ndarray, floor: float) -> dict:
    """A candidate's effect against the effects of the other heads of its layer (between-head variation).

    One-sided: does the candidate matter more than a head of its layer? Under the null the candidate is one
    more draw from the controls' distribution, so t = (effect - mean) / (s * sqrt(1 + 1/n)) has Student's t
    with n - 1 degrees of freedom (a prediction interval; scipy's two-sample t-test of one value against n),
    with s the controls' standard deviation, at least `floor` (heads cannot be told apart more finely than
    float noise). Beside it the exact rank p under exchangeability, (1 + #controls >= effect) / (n + 1), whose
    smallest attainable value 1 / (n + 1) is stated. An effect within the floor, or undefined, gets no test.
    """
    controls = np.asarray(controls, dtype=float)
    n = int(controls.size)
    out = {"n_controls": n, "control_mean": float(controls.mean()) if n else np.nan,
           "control_sd": float(controls.std(ddof=1)) if n > 1 else np.nan, "minus_controls": np.nan,
           "control_percentile": np.nan, "rank_p": np.nan, "rank_p_min": 1.0 / (n + 1), "t_stat": np.nan,
           "p_value": np.nan, "test_reason": None}
    if not np.isfinite(effect):
        out["test_reason"] = NO_LATER_LAYER
    elif abs(effect) <= floor:
        out["test_reason"] = NO_EFFECT
    elif n < 2:
        out["test_reason"] = TOO_FEW_CONTROLS
    else:
        s = max(out["control_sd"], floor)
        t = (effect - out["control_mean"]) / (s * np.sqrt(1.0 + 1.0 / n))
        out.update(minus_controls=effect - out["control_mean"],
                   control_percentile=100.0 * float(np.mean(controls < effect)),
                   rank_p=(1.0 + float(np.sum(controls >= effect))) / (n + 1), t_stat=float(t),
                   p_value=float(stats.t.sf(t, n - 1)))
    return out


def summarise(per_prompt: pd.DataFrame, selection: pd.DataFrame, *, seed: int, n_resamples: int,
              confidence: float, noise_floor: dict[str, float]) -> pd.DataFrame:
    """Per (intervention, metric, head): effect on self-referent and neutral prompts with prompt-bootstrap
    intervals, specificity = self / neutral effect, the change of RFC over the later layers (and the other
    variant's RFC there), and for candidates the test against the other heads of their layer (`control_test`,
    on the self-referent effect), BH across the family's candidates with a test (per intervention and metric).
    Effects within the metric's noise floor are exactly 0 and get no p, q or percentile (`test_reason` says
    why a candidate has none; `specificity_reason` why a specificity is undefined)."""
    family = str(per_prompt["family"].iloc[0])
    chosen = set(zip(selection["layer"].astype(int), selection["head"].astype(int)))
    per_prompt = per_prompt[[(int(l), int(h)) in chosen for l, h in zip(per_prompt["layer"], per_prompt["head"])]]
    rows_out = []
    for iv in [iv for iv in INTERVENTIONS if iv.name in set(per_prompt["intervention"])]:
        sub = per_prompt[per_prompt["intervention"] == iv.name]
        first = sub[(sub["layer"] == sub["layer"].iloc[0]) & (sub["head"] == sub["head"].iloc[0])]
        categories = first["category"].to_numpy()
        # one bootstrap of prompt indices per intervention, shared by every head (paired across heads)
        indices = stratified_bootstrap_indices(categories, n_resamples, rng_for(seed, "patch_boot", family, iv.name))
        effects: dict[tuple[str, int, int], float] = {}
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
                floor = noise_floor[metric]
                v = _metric_values(rows.reset_index(), metric, floor)
                means, boot = group_means(v, categories), bootstrap_group_means(v, categories, indices)
                e_self, e_neutral = float(means[SELF][0]), float(means[NEUTRAL][0])
                effects[(metric, int(layer), int(head))] = e_self
                lo, hi = percentile_ci(boot[SELF], confidence) if np.isfinite(v).all() else (np.nan, np.nan)
                reason = (NO_LATER_LAYER if not np.isfinite(e_neutral)
                          else NEUTRAL_WITHIN_FLOOR if e_neutral <= floor else None)
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = boot[SELF] / boot[NEUTRAL]
                s_lo, s_hi = (np.nan, np.nan) if reason or not np.isfinite(ratio).all() else percentile_ci(ratio, confidence)
                rows_out.append({
                    "family": family, "intervention": iv.name, "variant": iv.variant, "kind": iv.kind,
                    "metric": metric, "layer": int(layer), "head": int(head),
                    "effect_self": e_self, "effect_self_lo": float(lo), "effect_self_hi": float(hi),
                    "effect_neutral": e_neutral,
                    "no_effect": bool(np.isfinite(e_self) and abs(e_self) <= floor),
                    "specificity": np.nan if reason else e_self / e_neutral,
                    "specificity_lo": float(s_lo), "specificity_hi": float(s_hi), "specificity_reason": reason,
                    "rfc_later_clean": rfc_clean, "rfc_later": rfc_patched,
                    "rfc_later_other": float(rfc(m_other[SELF], m_other[NEUTRAL])[0]),
                    "delta_rfc_later": rfc_patched - rfc_clean,
                    "delta_rfc_later_lo": float(d_lo), "delta_rfc_later_hi": float(d_hi),
                })
        cands = selection[selection["role"] == "candidate"]
        controls = selection[selection["role"] == "control"]
        for metric in METRICS:
            tests = []
            for c in cands.itertuples():
                mine = controls[controls["candidate"] == c.candidate]
                ctrl = np.array([effects[(metric, int(r.layer), int(r.head))] for r in mine.itertuples()])
                tests.append((int(c.layer), int(c.head),
                              control_test(effects[(metric, int(c.layer), int(c.head))], ctrl, noise_floor[metric])))
            tested = [i for i, (_, _, t) in enumerate(tests) if np.isfinite(t["p_value"])]
            q = fdr_bh(np.array([tests[i][2]["p_value"] for i in tested])) if tested else np.array([])
            q_of = dict(zip(tested, q))
            for i, (layer, head, test) in enumerate(tests):
                test["q_value"] = float(q_of[i]) if i in q_of else np.nan
                for row in rows_out:
                    if (row["intervention"], row["metric"], row["layer"], row["head"]) == (iv.name, metric, layer, head):
                        row.update(test)
    table = pd.DataFrame(rows_out)
    roles = selection.groupby(["layer", "head"])["role"].agg(lambda r: "candidate" if "candidate" in set(r) else "control")
    table["role"] = [roles[(l, h)] for l, h in zip(table["layer"], table["head"])]
    for col in TEST_COLUMNS:
        if col not in table:
            table[col] = None if col == "test_reason" else np.nan
    return table


# What `control_test` adds to a candidate's rows (empty for controls).
TEST_COLUMNS = ("n_controls", "control_mean", "control_sd", "minus_controls", "control_percentile", "rank_p",
                "rank_p_min", "t_stat", "p_value", "q_value", "test_reason")
