"""Where along post-training does the change happen? Statistics of families with more than two training stages.

A family's checkpoints are ordered training stages, base first and instruct last (e.g. base -> sft -> dpo ->
instruct). Every stage is contrasted with base and with the stage before it, with the same paired bootstrap,
permutation test and BH control as base -> instruct (analysis.statistics.layers.contrast_statistics). The
consecutive steps add up to the total change instruct - base, resample by resample (all contrasts use the
same prompt draws), so the share of the total contributed by each step has a bootstrap interval. Per head,
the difference in differences of each step (analysis.statistics.heads.head_scores) and the step where each head
changes most. Raw prompts must tokenise identically at every stage (docs/method.md, "Training stages").
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.core.config import StatsSettings, staged_families
from analysis.core.errors import UserError
from analysis.statistics.heads import head_scores
from analysis.statistics.layers import (FamilyArrays, contrast_statistics, family_arrays, metric_value,
                                       resampling_draws, stage_ratios)
from analysis.core.quantities import DELTAS, head_label, relative_depth
from analysis.core.ranking import rounded
from analysis.statistics.resampling import percentile_ci

# How two stages are compared: each stage against base, and each stage against the one before it.
CONTRASTS = ("vs_base", "step")
TOKEN_COLUMNS = ("n_tokens", "input_ids_sha1")
STAGE_DELTA_COLUMNS = (["definition", "family", "contrast", "step", "from_stage", "to_stage", "layer", "n_layers",
                        "depth"] + [f"{d}{s}" for d in DELTAS for s in ("", "_lo", "_hi")]
                       + ["rfc_from", "rfc_to", "p_value", "q_value", "p_reason", "layer_class", "p_value_diff", "q_value_diff"])
SHARE_QUANTITIES = ("delta_rfc", "delta_diff")
STAGE_SHARE_COLUMNS = (["definition", "family", "step", "from_stage", "to_stage", "n_steps"]
                       + [f"{k}{q}{s}" for q in SHARE_QUANTITIES for k in ("mean_", "share_", "total_mean_")
                          for s in ("", "_lo", "_hi")]
                       + [f"share_{q}_reason" for q in SHARE_QUANTITIES] + ["total_excludes_zero", "largest_step"])
# Why a share has no value (the report prints "undefined (<reason>)").
NO_TOTAL_CHANGE = "the total change is within the noise floor"
STAGE_HEAD_COLUMNS = ["definition", "family", "step", "from_stage", "to_stage", "layer", "head", "delta_self",
                      "delta_neutral", "did", "did_log_ratio", "p_value", "q_value", "p_reason", "total_did", "share_did",
                      "candidate", "largest_step"]


def check_tokenisation(entropy: pd.DataFrame, stages: dict[str, tuple[str, ...]], prompt_format: str) -> None:
    """Refuse a family whose stages tokenise a prompt differently (a later stage may add tokens to the
    tokenizer): its entropies would not be comparable position by position."""
    if TOKEN_COLUMNS[1] not in entropy.columns:
        raise UserError(f"the {prompt_format} entropy tables lack {TOKEN_COLUMNS[1]} (written by an older version); "
                        "re-extract them with `dvc repro`")
    present = list(TOKEN_COLUMNS)
    for family, order in stages.items():
        rows = entropy[entropy["family"] == family].drop_duplicates(["variant", "prompt_id"])
        wide = rows.pivot(index="prompt_id", columns="variant", values=present)
        for column in present:
            values = wide[column][list(order)]
            differs = values.ne(values[order[0]], axis=0).any(axis=1)
            if differs.any():
                pid = differs.index[differs][0]
                detail = ", ".join(f"{s}: {values.at[pid, s]}" for s in order)
                raise UserError(f"family {family}: prompt {pid} ({prompt_format} format) tokenises differently across "
                                f"its stages ({column} {detail}; {int(differs.sum())} prompt(s) in all); the stages "
                                "need one tokenizer: check the checkpoints in params.yaml")


def _pairs(order: tuple[str, ...]) -> list[tuple[str, int, str, str]]:
    """(contrast, step number, from, to) of every stage against base and of every consecutive step."""
    out = [("vs_base", i, order[0], order[i]) for i in range(1, len(order))]
    return out + [("step", i, order[i - 1], order[i]) for i in range(1, len(order))]


def _shares(definition: str, family: str, order: tuple[str, ...], steps: dict[str, dict[str, np.ndarray]],
            boot: dict[str, dict[str, np.ndarray]], confidence: float, floors: dict[str, float]) -> pd.DataFrame:
    """One row per consecutive step: its mean change over layers, the total's, and its share of the total, for
    ΔRFC (a ratio whose denominator H_neutral can drift between steps) and for Δ(H_self - H_neutral) (additive:
    the planted split of demo_stages is exact in it).

    Shares are ratios of means over layers, resample by resample (the steps of one resample add up to its
    total exactly, so the shares of a resample sum to 1). A total within the quantity's noise floor
    (`stats.noise_floor`) leaves every share undefined (NaN, `share_<q>_reason`); a step whose own mean change is
    within the floor has share exactly 0."""
    total = {q: sum(steps[s][q] for s in order[1:]) for q in SHARE_QUANTITIES}
    total_boot = {q: sum(boot[s][q] for s in order[1:]) for q in SHARE_QUANTITIES}
    rows = []
    for i, stage in enumerate(order[1:], start=1):
        row = {"definition": definition, "family": family, "step": i, "from_stage": order[i - 1], "to_stage": stage,
               "n_steps": len(order) - 1}
        for q in SHARE_QUANTITIES:
            mean, mean_boot = steps[stage][q].mean(), boot[stage][q].mean(axis=1)
            tot, tot_boot = total[q].mean(), total_boot[q].mean(axis=1)
            defined = abs(tot) > floors[q]
            with np.errstate(divide="ignore", invalid="ignore"):
                share = (0.0 if abs(mean) <= floors[q] else mean / tot) if defined else np.nan
                share_boot = np.where(tot_boot != 0, mean_boot / np.where(tot_boot != 0, tot_boot, 1.0), np.nan)
                share_boot = np.where(np.abs(mean_boot) <= floors[q], 0.0, share_boot)  # no change: share 0, not -0
            row[f"mean_{q}"] = mean
            row[f"mean_{q}_lo"], row[f"mean_{q}_hi"] = percentile_ci(mean_boot, confidence)
            row[f"share_{q}"] = share
            row[f"share_{q}_reason"] = None if defined else NO_TOTAL_CHANGE
            if defined and np.isfinite(share_boot).all():
                row[f"share_{q}_lo"], row[f"share_{q}_hi"] = percentile_ci(share_boot, confidence)
            else:
                row[f"share_{q}_lo"] = row[f"share_{q}_hi"] = np.nan
            row[f"total_mean_{q}"] = tot
            row[f"total_mean_{q}_lo"], row[f"total_mean_{q}_hi"] = percentile_ci(tot_boot, confidence)
        row["total_excludes_zero"] = bool(row["total_mean_delta_rfc_lo"] > 0 or row["total_mean_delta_rfc_hi"] < 0)
        rows.append(row)
    frame = pd.DataFrame(rows)
    largest = np.abs(frame["mean_delta_rfc"].to_numpy())
    frame["largest_step"] = (largest == largest.max()) & (largest.max() > 0)
    return frame[STAGE_SHARE_COLUMNS]


def _step_heads(arrays: FamilyArrays, definition: str, order: tuple[str, ...], signs: np.ndarray,
                candidates: pd.DataFrame, top_k: int, decimals: int, floor: float) -> pd.DataFrame:
    """Per consecutive step and head: the head's difference in differences with its permutation p and BH q
    across the family's heads; its share of the total (base -> instruct) did, which the steps add up to; the
    step where it changes most; `candidate` for the top-k heads of heads.parquet."""
    frames = []
    for i, stage in enumerate(order[1:], start=1):
        scores = head_scores(arrays.stages[order[i - 1]][definition], arrays.stages[stage][definition],
                             arrays.categories, signs, top_k=top_k, decimals=decimals, floor=floor)
        scores.insert(0, "to_stage", stage)
        scores.insert(0, "from_stage", order[i - 1])
        scores.insert(0, "step", i)
        frames.append(scores)
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "family", arrays.family)
    table.insert(0, "definition", definition)
    total = table.groupby(["layer", "head"])["did"].transform("sum")
    table["total_did"] = total
    with np.errstate(divide="ignore", invalid="ignore"):
        table["share_did"] = np.where(total != 0, table["did"] / total.where(total != 0, 1.0), np.nan)
    top = candidates[candidates["top_k"]]
    keys = set(zip(top["layer"], top["head"]))
    table["candidate"] = [(l, h) in keys for l, h in zip(table["layer"], table["head"])]
    # the step with the largest |did| at rank precision, the earlier step where tied (analysis/core/ranking.py)
    size = pd.Series(rounded(table["did"].abs(), decimals), index=table.index)
    biggest = size.groupby([table["layer"], table["head"]]).transform("max")
    first = table.assign(size=size).sort_values("step").groupby(["layer", "head"])["size"].idxmax()
    table["largest_step"] = table.index.isin(first) & (biggest > 0)
    return table[STAGE_HEAD_COLUMNS]


def stage_statistics(entropy: pd.DataFrame, stages: dict[str, tuple[str, ...]], heads: pd.DataFrame,
                     settings: StatsSettings, prompt_format: str) -> dict[str, pd.DataFrame]:
    """Stage tables of one prompt format for the families with more than two stages.

    entropy: the format's entropy table (every stage); stages: family -> stages in training order; heads: the
    format's heads.parquet rows (base -> instruct), whose top-k heads are the candidates followed per step.
    Returns {"stage_deltas", "stage_shares", "stage_heads"} (empty tables when no family has intermediate stages).
    """
    staged = staged_families(stages)
    tables = {"stage_deltas": [], "stage_shares": [], "stage_heads": []}
    if staged:
        subset = entropy[entropy["family"].isin(list(staged))]
        if prompt_format == "raw":
            check_tokenisation(subset, staged, prompt_format)
        families = family_arrays(subset, list(settings.definitions), staged)
        indices, signs = resampling_draws(families, settings)
        for definition in settings.definitions:
            for family, arrays in families.items():
                order = staged[family]
                tables["stage_deltas"].append(_family_contrasts(arrays, definition, order, indices[arrays.design],
                                                                signs[arrays.design], settings, tables))
                rows = heads[(heads["definition"] == definition) & (heads["family"] == family)]
                tables["stage_heads"].append(_step_heads(arrays, definition, order, signs[arrays.design], rows,
                                                         settings.top_k_heads, settings.rank_decimals,
                                                         settings.noise_floor["delta_diff"]))
    columns = {"stage_deltas": STAGE_DELTA_COLUMNS, "stage_shares": STAGE_SHARE_COLUMNS,
               "stage_heads": STAGE_HEAD_COLUMNS}
    return {k: pd.concat(v, ignore_index=True) if v else pd.DataFrame(columns=columns[k]) for k, v in tables.items()}


def _family_contrasts(arrays: FamilyArrays, definition: str, order: tuple[str, ...], indices: np.ndarray,
                      signs: np.ndarray, settings: StatsSettings, tables: dict[str, list]) -> pd.DataFrame:
    """stage_deltas rows of one family and definition; appends its stage_shares rows to `tables`."""
    cats = arrays.categories
    prompt = {s: arrays.stages[s][definition].mean(axis=2) for s in order}  # [P, L]: mean over query heads
    ratios = {s: stage_ratios(prompt[s], cats, indices)[:2] for s in order}
    n_layers = arrays.n_layers
    frames, step_point, step_boot = [], {}, {}
    for contrast, step, a, b in _pairs(order):
        columns, resampled = contrast_statistics((prompt[a], *ratios[a]), (prompt[b], *ratios[b]), cats, signs,
                                                 settings)
        frame = {"definition": definition, "family": arrays.family, "contrast": contrast, "step": step,
                 "from_stage": a, "to_stage": b, "layer": np.arange(n_layers), "n_layers": n_layers,
                 "depth": relative_depth(n_layers), **columns,
                 "rfc_from": ratios[a][0]["rfc"], "rfc_to": ratios[b][0]["rfc"]}
        frames.append(pd.DataFrame(frame)[STAGE_DELTA_COLUMNS])
        if contrast == "step":
            step_point[b] = {q: columns[q] for q in SHARE_QUANTITIES}
            step_boot[b] = {q: resampled[q] for q in SHARE_QUANTITIES}
    tables["stage_shares"].append(_shares(definition, arrays.family, order, step_point, step_boot,
                                          settings.confidence, settings.noise_floor))
    return pd.concat(frames, ignore_index=True)


def stage_metrics(shares: pd.DataFrame, stage_heads: pd.DataFrame) -> dict:
    """metrics.json `stages.<family>` of the headline rows: per step (keyed by the stage it ends at) its mean
    ΔRFC and Δ(H_self - H_neutral) and each one's share of its total with intervals (None with a `_reason` where
    undefined), the step with the largest change, and for each candidate head the step where its did changes
    most."""
    out: dict = {}
    for family, rows in shares.groupby("family", sort=False):
        entry = {}
        for row in rows.itertuples():
            entry[row.to_stage] = {f"{k}{q}{s}": metric_value(getattr(row, f"{k}{q}{s}")) for q in SHARE_QUANTITIES
                                   for k in ("mean_", "share_") for s in ("", "_lo", "_hi")}
            for q in SHARE_QUANTITIES:
                reason = getattr(row, f"share_{q}_reason")
                entry[row.to_stage][f"share_{q}_reason"] = reason if isinstance(reason, str) else None
        largest = rows[rows["largest_step"]]
        entry["largest_step"] = str(largest["to_stage"].iloc[0]) if len(largest) else None
        heads = stage_heads[(stage_heads["family"] == family) & stage_heads["candidate"] & stage_heads["largest_step"]]
        entry["head_steps"] = {head_label(r.layer, r.head): str(r.to_stage)
                               for r in heads.sort_values(["layer", "head"]).itertuples()}
        out[str(family)] = entry
    return out
