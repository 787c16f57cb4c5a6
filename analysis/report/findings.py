"""What the report states first, computed from the artefacts: each family's findings in one row, and for demo
families what was planted (the suite's spec in params.yaml) against what the statistics recovered.

The figures stage writes both tables to report/figures/ (findings.parquet, planted.parquet); the report only
formats them. Planted and recovered are compared on the headline definition and prompt format."""

from __future__ import annotations

import pandas as pd

from analysis.core.config import Config
from analysis.core.layout import checkpoint_name
from analysis.core.quantities import LANGUAGES, SOURCE_LANGUAGE, choice_rows, head_label, words

MASS_COLUMNS = ["family", "layer", "head", "role", "marker_base", "marker_instruct", "marker_delta", "marker_delta_lo",
                "marker_delta_hi", "first_base", "first_instruct"]

NONE = "none"


def head_role(role: str, names_candidates: bool) -> str:
    """What a head the patch stage intervened on is, the one definition the charts, tables and text use: a top-ranked
    head (`role` 'candidate' in data/patching) is a *candidate* only in a family that names candidates (a head at
    q < alpha: `names_candidates` of data/stats/head_families.parquet, analysis.statistics.selections); in any other
    family its ranking is driven by base entropy alone, and intervening on it is a null check. Controls stay
    controls."""
    if role != "candidate":
        return role
    return "candidate" if names_candidates else "null_check"
ASPECTS = ("layers", "heads", "sign", "step", "languages")  # what a demo spec plants, in the table's order
PLANTED_COLUMNS = ["family"] + [f"{a}_{side}" for a in ASPECTS for side in ("planted", "recovered")] + ["agrees"]
FINDING_COLUMNS = ["family", "conclusion", "layers_compression", "layers_gain", "names_candidates", "candidates",
                   "null_checks", "ablation_flags", "patch_flags"]
# The intervention that asks whether a head matters where it has its focus, and the one that moves base's output into
# instruct (data/patching/<family>.json); a head "matters" when its test gives q < alpha.
ABLATIONS, PATCH = ("mean_ablation@base", "mean_ablation@instruct"), "patch_base_into_instruct"


def _text(items) -> str:
    items = [str(i) for i in items]
    return ", ".join(items) if items else NONE


def planted_effects(config: Config) -> dict[str, dict]:
    """Per demo family, from its spec: the heads whose self-focus changes between consecutive training stages, the
    sign of the planted ΔRFC (a head that loses its focus: compression; gains it: gain), the training step at which
    each head changes, and the prompt languages the planted heads hear."""
    out = {}
    for family, stages in config.stages.items():
        specs = {c.variant: c.demo for c in config.family_checkpoints(family)}
        if not all(specs.get(s) for s in stages):
            continue
        focus = {s: {tuple(h) for h in specs[s].get("self_focus", [])} for s in stages}
        steps, signs = {}, set()
        for before, after in zip(stages[:-1], stages[1:]):
            for head in sorted(focus[before] ^ focus[after]):
                steps.setdefault(head, f"{before} → {after}")
                signs.add("compression" if head in focus[before] else "gain")
        heard = specs[stages[0]].get("self_languages") or list(LANGUAGES)
        built = [x for x in LANGUAGES if x in config.prompts.languages or x == SOURCE_LANGUAGE]
        out[family] = {"heads": sorted(steps), "layers": sorted({h[0] for h in steps}),
                       "sign": signs.pop() if len(signs) == 1 else ("mixed" if signs else NONE),
                       "steps": steps, "staged": len(stages) > 2,
                       "languages": [x for x in built if x in heard] if steps else []}
    return out


def recovered_layers(deltas: pd.DataFrame, family: str, near_zero: float) -> pd.DataFrame:
    """A family's layers whose ΔRFC is significant at the FDR level and beyond the practical threshold |ΔRFC| >
    near_zero (downstream layers pass on a planted change at a far smaller size)."""
    rows = deltas[(deltas["family"] == family) & (deltas["layer_class"] != "no_change")]
    return rows[rows["delta_rfc"].abs() > near_zero].sort_values("layer")


def planted_vs_recovered(config: Config, deltas: pd.DataFrame, heads: pd.DataFrame, head_families: pd.DataFrame,
                         metrics: dict) -> pd.DataFrame:
    """One row per demo family: for each aspect (layers, heads, sign of ΔRFC, training step, prompt languages) what the
    spec planted and what the headline statistics recovered (`<aspect>_planted`, `<aspect>_recovered`; the step only
    for families with more than two training stages, languages only for builds with several, else None), and
    whether every aspect agrees. Recovered heads are the family's
    top-ranked heads, as many as were planted, when the family names candidates; recovered languages those in which
    the family has a recovered layer."""
    stats = config.stats
    english = choice_rows(deltas, stats.headline_definition, stats.headline_format)
    every_language = choice_rows(deltas, stats.headline_definition, stats.headline_format, None)
    head_rows = choice_rows(heads, stats.headline_definition, stats.headline_format)
    names = dict(zip(head_families["family"], head_families["names_candidates"]))
    rows = []
    for family, planted in planted_effects(config).items():
        layers = recovered_layers(english, family, stats.near_zero)
        signs = {"compression" if v < 0 else "gain" for v in layers["delta_rfc"]}
        sign = signs.pop() if len(signs) == 1 else ("mixed" if signs else NONE)
        ranked = head_rows[head_rows["family"] == family].sort_values(["position", "layer", "head"])
        top = ranked.head(max(1, len(planted["heads"]))) if names.get(family, False) else ranked.head(0)
        found = sorted((int(r.layer), int(r.head)) for r in top.itertuples())
        languages = [x for x in LANGUAGES if x in set(every_language["language"])
                     and len(recovered_layers(every_language[every_language["language"] == x], family, stats.near_zero))]
        planted_steps = {head_label(*h): s for h, s in planted["steps"].items()}
        head_steps = (metrics.get("stages", {}).get(family, {}).get("head_steps") or {}) if planted["staged"] else {}
        stages = config.stages[family]
        found_steps = {h: f"{stages[stages.index(s) - 1]} → {s}" for h, s in head_steps.items()}
        aspects = {
            "layers": (_text(planted["layers"]), _text(layers["layer"].astype(int))),
            "heads": (_text(head_label(*h) for h in planted["heads"]), _text(head_label(*h) for h in found)),
            "sign": (words(planted["sign"]), words(sign)),
            "step": ((_text(f"{h}: {s}" for h, s in planted_steps.items()),
                      _text(f"{h}: {s}" for h, s in sorted(found_steps.items()))) if planted["staged"] else (None, None)),
            "languages": ((_text(words(x) for x in planted["languages"]), _text(words(x) for x in languages))
                          if len(set(every_language["language"])) > 1 else (None, None)),
        }
        row = {"family": family, **{f"{a}_{side}": v for a, pair in aspects.items()
                                    for side, v in zip(("planted", "recovered"), pair)}}
        rows.append({**row, "agrees": all(p == r for p, r in aspects.values())})
    return pd.DataFrame(rows, columns=PLANTED_COLUMNS)


def _flags(summary: dict | None, intervention: str, alpha: float, suffix: str = "") -> list[str]:
    """The heads whose test under `intervention` gives q < alpha (each followed by `suffix`)."""
    if not summary:
        return []
    heads = summary["interventions"][intervention]["entropy_later"]["heads"]
    return [h + suffix for h, v in heads.items() if v.get("q_value") is not None and v["q_value"] < alpha]


def compared_families(config: Config) -> list[str]:
    """The families with more than one checkpoint, in params order: those the comparison findings are about (a
    family of a single checkpoint has the real-checkpoint section)."""
    return [f for f, stages in config.stages.items() if len(stages) > 1]


def family_findings(config: Config, deltas: pd.DataFrame, robustness: pd.DataFrame, head_families: pd.DataFrame,
                    patching: pd.DataFrame, patch_summaries: dict[str, dict]) -> pd.DataFrame:
    """One row per family: the headline conclusion, its layers of each class (FDR), whether it names candidate heads,
    the heads the patch stage tested as candidates or as null checks (`selections.head_role`), and the candidates
    that matter more than the other heads of their layer (q < alpha) under mean ablation (in base or in instruct) and
    under base's output patched into instruct."""
    stats = config.stats
    english = choice_rows(deltas, stats.headline_definition, stats.headline_format)
    headline = robustness[robustness["headline"]] if "headline" in robustness else robustness
    names = dict(zip(head_families["family"], head_families["names_candidates"]))
    rows = []
    for family in compared_families(config):
        conclusion = headline.loc[headline["family"] == family, "conclusion"]
        layers = english[english["family"] == family]
        tested = patching[(patching["family"] == family) & (patching["role"] == "candidate")] if len(patching) else patching
        tested_heads = list(dict.fromkeys(head_label(r.layer, r.head) for r in tested.itertuples())) if len(tested) else []
        role = head_role("candidate", bool(names.get(family, False)))
        summary = patch_summaries.get(family)
        rows.append({
            "family": family, "conclusion": str(conclusion.iloc[0]) if len(conclusion) else NONE,
            "layers_compression": _text(layers.loc[layers["layer_class"] == "compression", "layer"].astype(int)),
            "layers_gain": _text(layers.loc[layers["layer_class"] == "gain", "layer"].astype(int)),
            "names_candidates": bool(names.get(family, False)),
            "candidates": _text(tested_heads if role == "candidate" else []),
            "null_checks": _text(tested_heads if role == "null_check" else []),
            "ablation_flags": _text([f for iv in ABLATIONS for f in _flags(summary, iv, stats.alpha,
                                                                          f" in {iv.split('@')[1]}")]
                                    if role == "candidate" else []),
            "patch_flags": _text(_flags(summary, PATCH, stats.alpha) if role == "candidate" else []),
        })
    return pd.DataFrame(rows, columns=FINDING_COLUMNS)


def tested_mass(attention_mass: pd.DataFrame, tested: pd.DataFrame, prompt_format: str) -> pd.DataFrame:
    """Attention mass on the person marker and on the first token of every head the patch stage tested (`tested`:
    family, layer, head, role), self-referent English prompts of the headline format, base and instruct, with the
    change of the marker mass and its bootstrap interval: one row per head."""
    mass = attention_mass[(attention_mass["format"] == prompt_format) & (attention_mass["category"] == "self_referent")]
    if "language" in mass:
        mass = mass[mass["language"] == SOURCE_LANGUAGE]
    rows = mass.merge(tested[["family", "layer", "head", "role"]], on=["family", "layer", "head"])
    if not len(rows):
        return pd.DataFrame(columns=MASS_COLUMNS)
    wide = rows.pivot_table(index=["family", "layer", "head", "role"], columns="mass",
                            values=["base", "instruct", "delta", "delta_lo", "delta_hi"], sort=False)
    wide.columns = [f"{m}_{v}" for v, m in wide.columns]
    out = wide.reset_index()
    order = {f: i for i, f in enumerate(dict.fromkeys(tested["family"]))}
    out = out.assign(_o=out["family"].map(order)).sort_values(["_o", "layer", "head"]).drop(columns="_o")
    return out[MASS_COLUMNS].reset_index(drop=True)


SINGLE_CHECKPOINTS_FILE = "single_checkpoints.parquet"  # in report/figures, beside findings.parquet
SINGLE_COLUMNS = ["family", "checkpoint", "first_token_mass", "chat_mean_delta_rfc", "chat_n_layers_significant",
                  "chat_n_layers", "chat_reason"]


def single_checkpoints(config: Config, attention_mass: pd.DataFrame, format_contrasts: pd.DataFrame) -> pd.DataFrame:
    """One row per family of a single checkpoint (the real ones): the mean attention mass on the first token over its
    layers, heads, prompt categories and prompts (headline format, English), and for a checkpoint with a chat format
    the chat template minus the prompt alone: the mean change of RFC over layers and the layers where it is
    significant (q < alpha, headline definition, English). `chat_reason` says why a checkpoint has no such change."""
    stats, rows, compared = config.stats, [], compared_families(config)
    for family, stages in config.stages.items():
        if family in compared:
            continue
        mass = attention_mass[(attention_mass["family"] == family) & (attention_mass["mass"] == "first")
                              & (attention_mass["format"] == stats.headline_format)
                              & (attention_mass["language"] == SOURCE_LANGUAGE)]
        level = mass["base"].fillna(mass["instruct"])
        chat = format_contrasts[(format_contrasts["family"] == family)
                                & (format_contrasts["definition"] == stats.headline_definition)
                                & (format_contrasts["language"] == SOURCE_LANGUAGE)]
        rows.append({"family": family, "checkpoint": checkpoint_name(family, stages[0]),
                     "first_token_mass": float(level.mean()) if len(level) else None,
                     "chat_mean_delta_rfc": float(chat["delta_rfc"].mean()) if len(chat) else None,
                     "chat_n_layers_significant": int((chat["q_value"] < stats.alpha).sum()) if len(chat) else None,
                     "chat_n_layers": int(len(chat)) if len(chat) else None,
                     "chat_reason": None if len(chat) else "no chat format: the checkpoint has no chat template"})
    return pd.DataFrame(rows, columns=SINGLE_COLUMNS)
