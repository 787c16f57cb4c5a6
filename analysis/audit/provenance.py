"""Where each number of metrics.json and reanalysis.json comes from: ONE registry, by key pattern.

`selfref explain KEY` prints the value, the artefact and column behind it, the function that computes it,
the params it depends on and the hashes of its stage's inputs from dvc.lock. data/README.md documents
the same keys; tests check that every key of the artefacts matches exactly one entry here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from analysis.core import config as config_mod
from analysis.core.artefacts import read_json
from analysis.core.errors import UserError
from analysis.core.layout import ProjectPaths, project_paths

ORIGINAL_PREFIX = "original."
PATCHING_PREFIX = "patching."  # data/patching/<family>.json, keys `patching.<family>.<key of the file>`
HEADLINE = ("stats.headline_definition", "stats.headline_format")
BOOT = ("stats.seed", "stats.n_resamples", "stats.confidence")
PERM = ("stats.seed", "stats.n_permutations", "stats.alpha")
FAM = r"families\.(?P<family>[A-Za-z0-9_]+)\."
LANGUAGE = r"languages\.(?P<language>[a-z]{2})\."  # metrics.json: the study of one translation language
PATCHING = r"patching\.(?P<family>[A-Za-z0-9_]+)\."
INTERVENTION = r"interventions\.(?P<intervention>[A-Za-z_@]+)\.(?P<metric>[a-z_]+)\."
CKPT = r"checkpoints\.(?P<family>[A-Za-z0-9_]+)\."  # metrics.json: a family of a single checkpoint
CONTRAST = r"language_contrasts\.(?P<family>[A-Za-z0-9_]+)\.(?P<language>[a-z]{2})\."


@dataclass(frozen=True)
class Source:
    """One family of keys: artefact (a ProjectPaths property), the table column it is computed from, the function, params."""

    pattern: str
    artefact: str
    column: str
    function: str
    params: tuple[str, ...]
    stage: str
    meaning: str


ENGLISH: tuple[Source, ...] = (
    Source(FAM + r"n_layers$", "metrics", "data/entropy/<family>/<checkpoint>/<format>.parquet: layer",
           "analysis.statistics.layers:family_arrays", (), "stats", "layers of the family's checkpoints"),
    Source(FAM + r"n_heads$", "metrics", "data/entropy/<family>/<checkpoint>/<format>.parquet: head",
           "analysis.statistics.layers:family_arrays", (), "stats", "query heads per layer"),
    Source(FAM + r"n_prompts\.(?P<category>\w+)$", "metrics", "data/entropy/<family>/<checkpoint>/<format>.parquet: category",
           "analysis.statistics.layers:family_metrics", (), "stats", "prompts of the category"),
    Source(FAM + r"mean_delta_rfc(_lo|_hi)?$", "metrics", "data/stats/deltas.parquet: delta_rfc (mean over layers)",
           "analysis.statistics.layers:family_metrics", HEADLINE + BOOT, "stats",
           "mean ΔRFC over layers; _lo/_hi: percentile interval of the prompt-bootstrap means"),
    Source(FAM + r"mean_delta_rfc_excl_low_neutral(_lo|_hi)?$", "metrics",
           "data/stats/deltas.parquet: delta_rfc where not low_neutral", "analysis.statistics.layers:family_metrics",
           HEADLINE + BOOT + ("stats.neutral_floor",), "stats", "mean ΔRFC over layers with H_neutral above the floor"),
    Source(FAM + r"mean_delta_diff(_lo|_hi)?$", "metrics", "data/stats/deltas.parquet: delta_diff (mean over layers)",
           "analysis.statistics.layers:family_metrics", HEADLINE + BOOT, "stats", "mean Δ(H_self − H_neutral) over layers"),
    Source(FAM + r"share_(compression|gain|no_change)$", "metrics", "data/stats/deltas.parquet: layer_class",
           "analysis.statistics.layers:family_layer_statistics", HEADLINE + PERM, "stats",
           "share of layers in the class (permutation test, BH across layers)"),
    Source(FAM + r"share_near_zero$", "metrics", "data/stats/deltas.parquet: near_zero",
           "analysis.statistics.layers:family_metrics", HEADLINE + ("stats.near_zero",), "stats",
           "share of layers with |ΔRFC| <= near_zero (the original study's rule)"),
    Source(FAM + r"share_below_minus_near_zero$", "metrics", "data/stats/deltas.parquet: original_class",
           "analysis.statistics.layers:family_metrics", HEADLINE + ("stats.near_zero",), "stats",
           "share of layers with ΔRFC < −near_zero (the original study's rule)"),
    Source(FAM + r"top_compression_layers\.rank_\d+$", "metrics", "data/stats/deltas.parquet: delta_rfc",
           "analysis.statistics.layers:top_compression_layers", HEADLINE + ("stats.rank_decimals",), "stats",
           "layer with the k-th most negative ΔRFC at stats.rank_decimals, ties in layer order"),
    Source(FAM + r"n_low_neutral$", "metrics", "data/stats/deltas.parquet: low_neutral",
           "analysis.statistics.layers:family_layer_statistics", HEADLINE + ("stats.neutral_floor",), "stats",
           "layers with H_neutral below the floor"),
    Source(FAM + r"n_heads_significant$", "metrics", "data/stats/heads.parquet: q_value",
           "analysis.statistics.heads:head_scores", HEADLINE + PERM, "stats", "heads with q < alpha (BH across heads)"),
    Source(FAM + r"top_heads\.rank_\d+$", "metrics", "data/stats/heads.parquet: position, rank, tied",
           "analysis.statistics.heads:head_scores", HEADLINE + ("stats.top_k_heads", "stats.rank_decimals"), "stats",
           "the k-th head by score at stats.rank_decimals, ties by (layer, head) (L<layer>H<head>, with the shared "
           "rank where tied: L2H0 (=1))"),
    Source(r"pairs\.(?P<pair>[A-Za-z0-9_]+~[A-Za-z0-9_]+)\.(?P<stat>pearson_r_lo|pearson_r_hi|spearman_r_lo|spearman_r_hi)$",
           "metrics", "data/stats/cross_family.parquet: {stat}", "analysis.statistics.correlation:compare_profiles",
           HEADLINE + BOOT + ("stats.depth_grid",), "stats", "bootstrap interval of r over prompt resamples"),
    Source(r"pairs\.(?P<pair>[A-Za-z0-9_]+~[A-Za-z0-9_]+)\.(?P<stat>pearson_r|pearson_p|pearson_p_shift|spearman_r|"
           r"spearman_p|spearman_p_shift|n_points|grid|n_layers_a|n_layers_b|undefined_reason|parametric_p_reason)$",
           "metrics", "data/stats/cross_family.parquet: {stat}", "analysis.statistics.correlation:compare_profiles",
           HEADLINE + ("stats.depth_grid", "stats.noise_floor"), "stats",
           "correlation of the two ΔRFC profiles (_p_shift: circular shift, the primary p; _p: scipy, same depth "
           "only), real layers of each, and why a value is undefined (no signal, constant, interpolated points)"),
    Source(r"robustness\.(?P<family>[A-Za-z0-9_]+)\.(n_choices|n_choices_differing)$", "metrics",
           "data/stats/robustness.parquet: differs", "analysis.statistics.robustness:robustness_table",
           HEADLINE + BOOT + ("stats.definitions",), "stats",
           "(definition, format) choices, and how many change the family's conclusion"),
    Source(r"robustness\.(?P<family>[A-Za-z0-9_]+)\.(split_half_r|spearman_brown)$", "metrics",
           "data/stats/split_half.parquet: {leaf}", "analysis.statistics.robustness:split_half",
           HEADLINE + ("stats.seed", "stats.split_half_splits"), "stats", "split-half reliability of the ΔRFC profile"),
    Source(r"robustness\.(?P<family>[A-Za-z0-9_]+)\.n_layers_length_disagrees$", "metrics",
           "data/stats/length_control.parquet: disagrees", "analysis.statistics.robustness:length_control",
           HEADLINE + ("stats.alpha",), "stats", "layers the length-controlled model classifies differently"),
    Source(r"stages\.(?P<family>[A-Za-z0-9_]+)\.(?P<stage>[a-z][a-z0-9_]*)\.(?P<stat>(mean|share)_delta_(rfc|diff))"
           r"(_lo|_hi|_reason)?$", "metrics", "data/stats/stage_shares.parquet: {stat} (the step ending at {stage})",
           "analysis.statistics.training_stages:stage_statistics", HEADLINE + BOOT + ("stats.noise_floor",), "stats",
           "mean ΔRFC (delta_rfc) or Δ(H_self − H_neutral) (delta_diff) over layers of one training step and its "
           "share of that quantity's total (instruct − base); _lo/_hi: percentile interval over prompt resamples; "
           "_reason: why a share is undefined"),
    Source(r"stages\.(?P<family>[A-Za-z0-9_]+)\.largest_step$", "metrics",
           "data/stats/stage_shares.parquet: largest_step", "analysis.statistics.training_stages:stage_statistics", HEADLINE,
           "stats", "the training step (named by the stage it ends at) with the largest |mean ΔRFC|"),
    Source(r"stages\.(?P<family>[A-Za-z0-9_]+)\.head_steps\.L\d+H\d+$", "metrics",
           "data/stats/stage_heads.parquet: largest_step where candidate",
           "analysis.statistics.training_stages:stage_statistics", HEADLINE + ("stats.top_k_heads",), "stats",
           "for a candidate head (top-k of heads.parquet), the step where its difference in differences changes most"),
)


def in_language(source: Source) -> Source:
    """The same number computed on one translation language's prompts alone: `languages.<lang>.<key>`
    (analysis.statistics.study:build_study analyses each language as the English study; tables keep a `language` column)."""
    return Source(LANGUAGE + source.pattern, source.artefact, source.column + " where language == {language}",
                  source.function, source.params, source.stage,
                  source.meaning + "; the prompts in language {language} (translations of the English set)")


# A family of a single checkpoint (metrics.json `checkpoints`): its profile within the one model.
SINGLE: tuple[Source, ...] = (
    Source(CKPT + r"(variant|n_layers|n_heads|n_prompts\.\w+)$", "metrics",
           "data/entropy/<family>/<checkpoint>/raw.parquet: variant, layer, head, category",
           "analysis.statistics.layers:checkpoint_metrics", (), "stats", "the checkpoint, its shape and prompts"),
    Source(CKPT + r"mean_(?P<stat>rfc|rsi)(_lo|_hi)?$", "metrics", "data/stats/layers.parquet: {stat} (mean over layers)",
           "analysis.statistics.layers:checkpoint_metrics", HEADLINE + BOOT, "stats",
           "mean {stat} over layers of the one checkpoint; _lo/_hi: percentile interval of the prompt-bootstrap means"),
    Source(CKPT + r"n_layers_rfc_(above|below)_0$", "metrics", "data/stats/layers.parquet: rfc_lo, rfc_hi",
           "analysis.statistics.layers:checkpoint_metrics", HEADLINE + BOOT, "stats",
           "layers whose RFC interval lies wholly above (below) 0"),
    Source(CKPT + r"n_low_neutral$", "metrics", "data/stats/layers.parquet: low_neutral",
           "analysis.statistics.layers:checkpoint_metrics", HEADLINE + ("stats.neutral_floor",), "stats",
           "layers with H_neutral below the floor"),
    Source(CKPT + r"(n_heads_significant|top_heads\.rank_\d+)$", "metrics",
           "data/stats/self_focus_heads.parquet: q_value, position, rank, tied",
           "analysis.statistics.heads:self_focus_heads", HEADLINE + PERM + ("stats.top_k_heads", "stats.rank_decimals"),
           "stats", "heads whose self-referent and neutral entropies differ (two-sample permutation test, BH across "
           "the model's heads), and the most self-focused heads by −log(H_self / H_neutral)"),
)

TRANSLATED = tuple(in_language(s) for s in ENGLISH + SINGLE if s.pattern.startswith((FAM, CKPT, r"pairs\.")))

REGISTRY: tuple[Source, ...] = ENGLISH + SINGLE + TRANSLATED + (
    Source(CONTRAST + r"mean_contrast$", "metrics", "data/stats/language_contrasts.parquet: contrast "
           "(mean over layers, language {language})", "analysis.statistics.languages:contrast_metrics",
           HEADLINE, "stats", "mean over layers of ΔRFC_{language} − ΔRFC_en on translation-matched prompts (RFC_{language} − "
           "RFC_en for a family of a single checkpoint)"),
    Source(CONTRAST + r"n_layers_significant$", "metrics", "data/stats/language_contrasts.parquet: significant "
           "(language_summary.parquet: n_layers_differ_from_en)", "analysis.statistics.languages:language_contrasts",
           HEADLINE + PERM, "stats", "layers where ΔRFC_{language} differs from ΔRFC_en (language-swap permutation "
           "test, BH across layers)"),
    Source(CONTRAST + r"n_layers$", "metrics", "data/stats/language_contrasts.parquet: layer",
           "analysis.statistics.languages:language_contrasts", (), "stats", "layers compared"),
    # data/patching/<family>.json (stage patch@<family>), keys prefixed `patching.<family>.`
    Source(PATCHING + r"(family|definition|format)$", "patching", "params.yaml stats.headline_*",
           "analysis.interventions.summary:summary_json", HEADLINE, "patch", "the family and the headline choice patched"),
    Source(PATCHING + r"(n_candidates|n_controls)$", "patching", "data/patching/{family}.parquet: role",
           "analysis.interventions.patching:select_controls", ("stats.seed", "stats.rank_decimals", "patch.top_k", "patch.max_controls"),
           "patch", "candidate heads (top-k of heads.parquet) and distinct control heads (the other heads of their layers)"),
    Source(PATCHING + INTERVENTION + r"(n_significant|n_tested|n_no_effect)$", "patching",
           "data/patching/{family}.parquet: q_value, p_value, no_effect",
           "analysis.interventions.patching:summarise", ("patch.noise_floor", "stats.alpha"), "patch",
           "candidates whose {metric} effect under {intervention} exceeds their layer's other heads (q < alpha), "
           "candidates tested, and candidates whose effect is within the noise floor"),
    Source(PATCHING + INTERVENTION + r"heads\.(?P<head>L\d+H\d+)\.(?P<stat>effect_self|specificity|"
           r"delta_rfc_later)(_lo|_hi)?$", "patching", "data/patching/{family}.parquet: {stat} ({head})",
           "analysis.interventions.patching:summarise", ("stats.seed", "patch.n_resamples", "stats.confidence",
                                                "patch.noise_floor"), "patch",
           "{metric} effect of {intervention} on {head} over self-referent prompts (specificity: self / neutral; "
           "delta_rfc_later: change of RFC over the later layers); _lo/_hi: prompt-bootstrap interval"),
    Source(PATCHING + INTERVENTION + r"heads\.(?P<head>L\d+H\d+)\.(?P<stat>control_percentile|p_value|q_value|"
           r"rank_p|rank_p_min|n_controls|no_effect|test_reason)$",
           "patching", "data/patching/{family}.parquet: {stat} ({head})", "analysis.interventions.patching:control_test",
           ("patch.noise_floor", "patch.max_controls", "stats.seed"), "patch",
           "{head} against the other heads of its layer: percentile among them, one-sided prediction t-test p, "
           "rank p and its smallest attainable value, BH across the family's candidates; test_reason says why "
           "there is none"),
    # data/original/reanalysis.json, keys prefixed `original.`
    Source(r"source\..+$", "reanalysis", "data/original/SHA256SUMS, data/original/claims.yaml",
           "analysis.statistics.original_study:check_files", (), "original", "the original repository, commit and file hashes"),
    Source(r"settings\.(near_zero|depth_grid)$", "reanalysis", "params.yaml", "analysis.statistics.original_study:reanalyse",
           ("stats.near_zero", "stats.depth_grid"), "original", "settings the re-analysis used"),
    Source(FAM + r"(n_layers|n_heads|mean_delta_rfc|share_below_minus_near_zero|share_near_zero|"
           r"share_above_near_zero|top_compression_layers\.rank_\d+)$", "reanalysis",
           "data/original/figures/<family>/comparison/detailed_comparison.csv: rfc_diff (n_heads: n_heads_base)",
           "analysis.statistics.original_study:profile_summary", ("stats.near_zero", "stats.rank_decimals"), "original",
           "from the original's own per-layer ΔRFC table"),
    Source(r"pairs\.(?P<pair>[a-z]+~[a-z]+)\.(?P<stat>\w+)$", "reanalysis",
           "data/original/figures/<family>/comparison/detailed_comparison.csv: rfc_diff",
           "analysis.statistics.correlation:compare_profiles", ("stats.depth_grid",), "original",
           "correlation of the original's ΔRFC profiles on this project's depth rule"),
    Source(r"claims\.(?P<claim>[^.]+)\.(published|recomputed|reproduced|autocorr_p)$", "reanalysis",
           "data/original/reanalysis_claims.parquet (claims from data/original/claims.yaml)",
           "analysis.statistics.original_study:reanalyse", ("stats.near_zero", "stats.depth_grid"), "original",
           "a published claim, recomputed from the original's tables"),
    Source(r"(n_claims|n_reproduced)$", "reanalysis", "data/original/reanalysis_claims.parquet: reproduced",
           "analysis.statistics.original_study:reanalyse", (), "original", "claims, and how many its tables reproduce"),
)


def lookup(key: str) -> tuple[Source, re.Match]:
    """The registry entry of a key (`original.` prefix: data/original/reanalysis.json)."""
    artefact = ("reanalysis" if key.startswith(ORIGINAL_PREFIX) else
                "patching" if key.startswith(PATCHING_PREFIX) else "metrics")
    bare = key[len(ORIGINAL_PREFIX):] if artefact == "reanalysis" else key
    hits = [(s, m) for s in REGISTRY if s.artefact == artefact and (m := re.fullmatch(s.pattern, bare))]
    if not hits:
        raise UserError(f"{key}: no such key in the provenance registry (analysis/audit/provenance.py); keys look like "
                        "families.<family>.mean_delta_rfc, pairs.<a>~<b>.pearson_r or original.claims.<id>.recomputed")
    return hits[0]


def value_of(document: dict, key: str):
    """The value at a dotted key; a key that itself contains dots (a file name) is matched whole."""
    parts = key.split(".")
    node = document
    while parts:
        for n in range(len(parts), 0, -1):
            name = ".".join(parts[:n])
            if isinstance(node, dict) and name in node:
                node, parts = node[name], parts[n:]
                break
        else:
            raise KeyError(key)
    return node


def _param(config: config_mod.Config, dotted: str):
    """The validated value of a params key `section.name` (e.g. stats.near_zero)."""
    section, name = dotted.split(".", 1)
    return getattr(getattr(config, section), name)


def stage_hashes(stage: str, paths: ProjectPaths) -> list[str]:
    """`path md5` of every dep and out of a stage in dvc.lock (empty if the stage has not run)."""
    if not paths.dvc_lock.exists():
        return []
    lock = yaml.safe_load(paths.dvc_lock.read_text(encoding="utf-8")) or {}
    entry = (lock.get("stages") or {}).get(stage)
    if not entry:
        return []
    out = []
    for kind in ("deps", "outs"):
        for item in entry.get(kind) or []:
            out.append(f"{kind[:-1]} {item['path']}  md5 {item.get('md5', '?')}")
    return out


def explain(key: str, paths: ProjectPaths | None = None) -> list[str]:
    """Lines that say where the number at `key` comes from."""
    paths = paths or project_paths()
    source, match = lookup(key)
    stage = source.stage
    if source.artefact == "patching":  # one file and one stage per family
        artefact, stage = paths.patch_summary(match["family"]), f"patch@{match['family']}"
        bare = key[len(PATCHING_PREFIX) + len(match["family"]) + 1:]
    else:
        artefact = getattr(paths, source.artefact)
        bare = key[len(ORIGINAL_PREFIX):] if source.artefact == "reanalysis" else key
    if not artefact.exists():
        raise UserError(f"{paths.relative(artefact)}: missing; run `dvc repro`")
    try:
        value = value_of(read_json(artefact), bare)
    except KeyError:
        raise UserError(f"{key}: matches the registry but is not in {paths.relative(artefact)}") from None
    config = config_mod.load(paths)
    fields = {"leaf": bare.rsplit(".", 1)[-1], **match.groupdict()}
    column, meaning = source.column.format(**fields), source.meaning.format(**fields)
    lines = [f"{key} = {value}",
             f"  artefact:  {paths.relative(artefact)}  (stage `{stage}`, `selfref {stage.replace('@', ' ')}`)",
             f"  from:      {column}",
             f"  function:  {source.function}",
             f"  meaning:   {meaning}",
             "  params:    " + (", ".join(f"{p}={_param(config, p)}" for p in source.params) or "none")]
    hashes = stage_hashes(stage, paths)
    lines.append(f"  inputs (dvc.lock, stage {stage}):" if hashes else
                 f"  inputs:    stage {stage} not in dvc.lock yet (run `dvc repro`)")
    lines.extend(f"    {h}" for h in hashes)
    return lines


def all_keys(document: dict, prefix: str = "") -> list[str]:
    """Every leaf key of a JSON document (dotted)."""
    out = []
    for k, v in document.items():
        key = f"{prefix}{k}"
        out.extend(all_keys(v, key + ".") if isinstance(v, dict) else [key])
    return out
