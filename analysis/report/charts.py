"""The report's charts, built with Altair from data/stats and saved as Vega-Lite JSON, SVG and PNG.

Vega-Lite JSON is what the HTML report embeds (interactive, with tooltips); SVG and PNG, rendered
offline by vl-convert, are what the PDF and `dvc plots` show. Every chart reads only tracked tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import altair as alt
import pandas as pd
import vl_convert as vlc

from analysis.core.artefacts import atomic_path
from analysis.core.quantities import CATEGORIES, LANGUAGES, SOURCE_LANGUAGE, choice_rows, head_label

CATEGORY_COLOURS = alt.Scale(domain=list(CATEGORIES), range=["#d62728", "#1f77b4", "#2ca02c", "#9467bd"])
CLASS_COLOURS = alt.Scale(domain=["compression", "gain", "no_change"], range=["#d62728", "#1f77b4", "#9e9e9e"])
AXIS_PX, LEGEND_PX = 60, 140  # room an independent y axis and a legend take beside the panels (approximate)


def panel_width(width: int, columns: int) -> int:
    """Width of one facet panel so that `columns` panels, their axes and a legend fit `width` pixels
    (the report's text column, `figures.width` in params.yaml)."""
    return max(80, (int(width) - LEGEND_PX) // int(columns) - AXIS_PX)


def _panels(data: pd.DataFrame, first: str, second: str) -> tuple[pd.DataFrame, list[str]]:
    """A `panel` column "<first> · <second>" for a wrapped facet, and its order (first, then second)."""
    data = data.assign(panel=data[first].astype(str) + " · " + data[second].astype(str))
    order = list(dict.fromkeys(data.sort_values([first, second], kind="stable")["panel"]))
    return data, order


def layer_entropy(layers: pd.DataFrame, width: int, columns: int) -> alt.Chart:
    """Mean entropy per category and layer with bootstrap bands, base and instruct side by side, per family."""
    rows = []
    for c in CATEGORIES:
        part = layers[["family", "variant", "layer", f"h_{c}", f"h_{c}_lo", f"h_{c}_hi"]].copy()
        part.columns = ["family", "variant", "layer", "entropy", "lo", "hi"]
        rows.append(part.assign(category=c))
    data = pd.concat(rows, ignore_index=True)
    base = alt.Chart().encode(
        x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1)),
        color=alt.Color("category:N", scale=CATEGORY_COLOURS, title="category"),
    )
    band = base.mark_area(opacity=0.18).encode(y=alt.Y("lo:Q", title="mean entropy (nats)", scale=alt.Scale(zero=False)),
                                               y2="hi:Q")
    line = base.mark_line(point=True).encode(
        y="entropy:Q",
        tooltip=["family", "variant", "category", "layer", alt.Tooltip("entropy:Q", format=".4f"),
                 alt.Tooltip("lo:Q", format=".4f"), alt.Tooltip("hi:Q", format=".4f")],
    )
    data, order = _panels(data, "family", "variant")
    return alt.layer(band, line, data=data).properties(width=panel_width(width, columns), height=140).facet(
        facet=alt.Facet("panel:N", title=None, sort=order), columns=columns
    ).resolve_scale(y="independent")


def delta_profiles(deltas: pd.DataFrame, width: int, columns: int) -> alt.Chart:
    """ΔRFC and ΔRSI per layer with bootstrap CIs; layers with FDR-significant ΔRFC coloured by class."""
    rows = []
    for metric, label in (("delta_rfc", "ΔRFC"), ("delta_rsi", "ΔRSI")):
        part = deltas[["family", "layer", "layer_class", "q_value", metric, f"{metric}_lo", f"{metric}_hi"]].copy()
        part.columns = ["family", "layer", "layer_class", "q_value", "value", "lo", "hi"]
        rows.append(part.assign(metric=label))
    data, order = _panels(pd.concat(rows, ignore_index=True), "family", "metric")
    base = alt.Chart().encode(x=alt.X("layer:Q", axis=alt.Axis(tickMinStep=1)))
    rule = alt.Chart().mark_rule(color="black", strokeDash=[3, 3]).encode(y=alt.datum(0))
    bars = base.mark_errorbar().encode(y=alt.Y("lo:Q", title="instruct − base"), y2="hi:Q")
    points = base.mark_point(filled=True, size=45).encode(
        y="value:Q",
        color=alt.Color("layer_class:N", scale=CLASS_COLOURS, title="ΔRFC test (FDR)"),
        tooltip=["family", "metric", "layer", alt.Tooltip("value:Q", format=".4f"), alt.Tooltip("lo:Q", format=".4f"),
                 alt.Tooltip("hi:Q", format=".4f"), alt.Tooltip("q_value:Q", format=".3g"), "layer_class"],
    )
    return alt.layer(rule, bars, points, data=data).properties(width=panel_width(width, columns), height=130).facet(
        facet=alt.Facet("panel:N", title=None, sort=order), columns=columns
    ).resolve_scale(y="independent")


def depth_profiles(deltas: pd.DataFrame, width: int) -> alt.Chart:
    """Every family's ΔRFC profile on relative depth (layer + 0.5) / n_layers, in one chart."""
    chart = alt.Chart(deltas).mark_line(point=True).encode(
        x=alt.X("depth:Q", title="relative depth", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("delta_rfc:Q", title="ΔRFC (instruct − base)"),
        color=alt.Color("family:N", title="family"),
        tooltip=["family", "layer", alt.Tooltip("depth:Q", format=".2f"), alt.Tooltip("delta_rfc:Q", format=".4f"),
                 "layer_class"],
    )
    rule = alt.Chart(pd.DataFrame({"zero": [0.0]})).mark_rule(color="black", strokeDash=[3, 3]).encode(y="zero:Q")
    return (rule + chart).properties(width=panel_width(width, 1), height=240)


def stage_profiles(stage_deltas: pd.DataFrame, width: int, columns: int) -> alt.Chart:
    """ΔRFC per layer of each training step (a stage against the one before it) with bootstrap CIs, per
    family with more than two stages; the steps add up to instruct − base."""
    steps = stage_deltas[stage_deltas["contrast"] == "step"].copy()
    if steps.empty:  # no family with more than two stages: the figure says so instead of being absent
        return alt.Chart(pd.DataFrame({"text": ["no family in this build has more than two training stages"]})
                         ).mark_text(size=14).encode(text="text:N").properties(width=width, height=60)
    steps["step_name"] = [f"{i}. {a} → {b}" for i, a, b in zip(steps["step"], steps["from_stage"], steps["to_stage"])]
    base = alt.Chart().encode(x=alt.X("layer:Q", axis=alt.Axis(tickMinStep=1)),
                              color=alt.Color("step_name:N", title="step", sort=None))
    rule = alt.Chart().mark_rule(color="black", strokeDash=[3, 3]).encode(y=alt.datum(0))
    bars = base.mark_errorbar().encode(y=alt.Y("delta_rfc_lo:Q", title="ΔRFC of the step"), y2="delta_rfc_hi:Q")
    lines = base.mark_line(point=True).encode(
        y="delta_rfc:Q",
        tooltip=["family", "step_name", "layer", alt.Tooltip("delta_rfc:Q", format=".4f"),
                 alt.Tooltip("delta_rfc_lo:Q", format=".4f"), alt.Tooltip("delta_rfc_hi:Q", format=".4f"),
                 alt.Tooltip("q_value:Q", format=".3g"), "layer_class"])
    fields = ["family", "step_name", "layer", "delta_rfc", "delta_rfc_lo", "delta_rfc_hi", "q_value", "layer_class"]
    panels = min(columns, steps["family"].nunique())
    return alt.layer(rule, bars, lines, data=steps[fields]).properties(
        width=panel_width(width, panels), height=170).facet(facet=alt.Facet("family:N", title=None), columns=panels)


def language_profiles(deltas: pd.DataFrame, width: int, columns: int) -> alt.Chart:
    """ΔRFC per layer with bootstrap CIs for each prompt language, one panel per family: where the language of
    the question changes the effect of instruction tuning (data/stats/language_contrasts.parquet tests it)."""
    fields = ["family", "language", "layer", "delta_rfc", "delta_rfc_lo", "delta_rfc_hi", "q_value", "layer_class"]
    order = [x for x in LANGUAGES if x in set(deltas["language"])]
    base = alt.Chart().encode(x=alt.X("layer:Q", axis=alt.Axis(tickMinStep=1)),
                              color=alt.Color("language:N", title="prompt language", sort=order,
                                              scale=alt.Scale(domain=order)))
    rule = alt.Chart().mark_rule(color="black", strokeDash=[3, 3]).encode(y=alt.datum(0))
    bars = base.mark_errorbar(opacity=0.6).encode(y=alt.Y("delta_rfc_lo:Q", title="ΔRFC (instruct − base)"),
                                                  y2="delta_rfc_hi:Q")
    lines = base.mark_line(point=True).encode(
        y="delta_rfc:Q",
        tooltip=["family", "language", "layer", alt.Tooltip("delta_rfc:Q", format=".4f"),
                 alt.Tooltip("delta_rfc_lo:Q", format=".4f"), alt.Tooltip("delta_rfc_hi:Q", format=".4f"),
                 alt.Tooltip("q_value:Q", format=".3g"), "layer_class"])
    panels = min(columns, deltas["family"].nunique())
    return alt.layer(rule, bars, lines, data=deltas[fields]).properties(
        width=panel_width(width, panels), height=150).facet(facet=alt.Facet("family:N", title=None),
                                                            columns=panels).resolve_scale(y="independent")


def head_scores(heads: pd.DataFrame, width: int, columns: int) -> alt.Chart:
    """Layer x head heatmap of the candidate-head score per family; top-k heads outlined."""
    base = alt.Chart().encode(x=alt.X("head:O", title="head"), y=alt.Y("layer:O", title="layer", sort="descending"))
    cells = base.mark_rect().encode(
        color=alt.Color("score:Q", scale=alt.Scale(scheme="viridis"), title="head score"),
        tooltip=["family", "layer", "head", alt.Tooltip("score:Q", format=".3f"), "rank",
                 alt.Tooltip("did:Q", format=".4f"), alt.Tooltip("q_value:Q", format=".3g")],
    )
    top = base.transform_filter(alt.datum.top_k).mark_point(shape="square", size=120, color="white", strokeWidth=2)
    return alt.layer(cells, top, data=heads).properties(width=panel_width(width, columns), height=160).facet(
        facet=alt.Facet("family:N", title=None), columns=columns).resolve_scale(x="independent", y="independent")


MASS_PARTS = ("first token", "person marker", "rest")
MASS_COLOURS = alt.Scale(domain=list(MASS_PARTS), range=["#7f7f7f", "#d62728", "#c7c7c7"])


def where_heads_look(mass: pd.DataFrame, candidates: pd.DataFrame, width: int, columns: int) -> alt.Chart:
    """Where each family's candidate heads attend on self-referent prompts, base against instruct: the mean mass
    on the first token, on the person marker, and the rest (1 − both, at least 0; the two masses are averaged
    over different query positions, docs/method.md "Where heads look"). data/stats/attention_mass.parquet."""
    rows = mass[mass["category"] == "self_referent"].merge(candidates[["family", "layer", "head"]])
    wide = rows.pivot_table(index=["family", "layer", "head"], columns="mass", values=["base", "instruct"])
    records = []
    for (family, layer, head), r in wide.iterrows():
        for variant in ("base", "instruct"):
            first, marker = float(r[(variant, "first")]), float(r[(variant, "marker")])
            for part, value in zip(MASS_PARTS, (first, marker, max(0.0, 1.0 - first - marker))):
                records.append({"family": family, "head": head_label(layer, head), "variant": variant,
                                "row": f"{head_label(layer, head)} {variant}", "part": part, "mass": value,
                                "order": MASS_PARTS.index(part)})
    data = pd.DataFrame(records, columns=["family", "head", "variant", "row", "part", "mass", "order"])
    bars = alt.Chart().mark_bar().encode(
        y=alt.Y("row:N", title=None, sort="ascending"),
        x=alt.X("sum(mass):Q", title="attention mass, self-referent prompts"),
        color=alt.Color("part:N", scale=MASS_COLOURS, sort=list(MASS_PARTS), title="attends to"),
        order=alt.Order("order:Q"),
        tooltip=["family", "head", "variant", "part", alt.Tooltip("mass:Q", format=".3f")],
    )
    panels = max(1, min(columns, data["family"].nunique()))
    return alt.layer(bars, data=data).properties(width=panel_width(width, panels), height=alt.Step(12)).facet(
        facet=alt.Facet("family:N", title=None), columns=panels).resolve_scale(y="independent")


def patch_effects(patching: pd.DataFrame, width: int, columns: int) -> alt.Chart:
    """Each candidate head's later-layer effect (self-referent prompts) against the family's random control heads,
    per intervention: controls as grey ticks, candidates as labelled points (data/patching/<family>.parquet).
    A symmetric-log axis, so that exact zeros (heads whose output the intervention leaves unchanged) show."""
    fields = ["family", "intervention", "role", "layer", "head", "effect_self", "control_percentile", "q_value"]
    data = patching[patching["metric"] == "entropy_later"][fields].dropna(subset=["effect_self"])
    data = data.assign(label=[head_label(l, h) for l, h in zip(data["layer"], data["head"])])
    order = list(dict.fromkeys(data["intervention"]))
    x = alt.X("effect_self:Q", title="|Δ mean entropy of later layers| (nats, symlog)",
              scale=alt.Scale(type="symlog", constant=1e-5))
    y = alt.Y("intervention:N", title=None, sort=order)
    controls = alt.Chart().transform_filter(alt.datum.role == "control").mark_tick(color="#9e9e9e", thickness=2).encode(
        x=x, y=y, tooltip=["label", "intervention", alt.Tooltip("effect_self:Q", format=".3g")])
    cands = alt.Chart().transform_filter(alt.datum.role == "candidate").mark_point(filled=True, size=60).encode(
        x=x, y=y, color=alt.Color("label:N", title="candidate"),
        tooltip=["label", "intervention", alt.Tooltip("effect_self:Q", format=".3g"),
                 alt.Tooltip("control_percentile:Q", format=".0f"), alt.Tooltip("q_value:Q", format=".3g")])
    panels = max(1, min(columns, data["family"].nunique()))
    return alt.layer(controls, cands, data=data).properties(width=panel_width(width, panels), height=alt.Step(18)).facet(
        facet=alt.Facet("family:N", title=None), columns=panels).resolve_scale(x="independent", color="independent")


def prompt_lengths(lengths: pd.DataFrame, width: int, columns: int) -> alt.Chart:
    """Prompt counts and mean token length per category, for each family's tokenizer."""
    bars = alt.Chart().mark_bar().encode(
        x=alt.X("category:N", title=None, sort=list(CATEGORIES)),
        y=alt.Y("mean:Q", title="mean tokens per prompt"),
        color=alt.Color("category:N", scale=CATEGORY_COLOURS, legend=None),
        tooltip=["family", "format", "category", alt.Tooltip("count:Q", title="prompts"),
                 alt.Tooltip("mean:Q", format=".2f"), "min", "max"],
    )
    errs = alt.Chart().mark_errorbar().encode(x=alt.X("category:N", sort=list(CATEGORIES)),
                                                       y="min:Q", y2="max:Q")
    data, order = _panels(lengths, "family", "format")
    return alt.layer(bars, errs, data=data).properties(width=panel_width(width, columns), height=120).facet(
        facet=alt.Facet("panel:N", title=None, sort=order), columns=columns)


def checkpoint_rfc(layers: pd.DataFrame, width: int, columns: int) -> alt.Chart:
    """RFC per layer with its prompt-bootstrap interval, one panel per single-checkpoint model (English prompts):
    a profile within one model, never a change. data/stats/layers.parquet."""
    data = layers.assign(model=layers["family"] + " (" + layers["variant"] + ")")
    base = alt.Chart().encode(x=alt.X("layer:Q", title="layer"))  # data on the layer, so the facet splits it
    band = base.mark_area(opacity=0.25, color="#1f77b4").encode(y=alt.Y("rfc_lo:Q", title="RFC = 1 − H_self / H_neutral"),
                                                              y2="rfc_hi:Q")
    line = base.mark_line(point=True, color="#1f77b4").encode(
        y="rfc:Q", tooltip=["model", "layer", alt.Tooltip("rfc:Q", format=".4f"), alt.Tooltip("rfc_lo:Q", format=".4f"),
                            alt.Tooltip("rfc_hi:Q", format=".4f"), "low_neutral"])
    zero = alt.Chart().mark_rule(color="#777", strokeDash=[4, 3]).encode(y=alt.datum(0.0))
    panels = max(1, min(columns, data["model"].nunique()))
    return alt.layer(band, line, zero, data=data).properties(width=panel_width(width, panels), height=180).facet(
        facet=alt.Facet("model:N", title=None), columns=panels).resolve_scale(x="independent", y="independent")


def sink_mass(mass: pd.DataFrame, width: int, columns: int) -> alt.Chart:
    """Attention mass on the first token per layer (mean over the layer's heads and the category's prompts), one
    panel per single-checkpoint model: the attention sink of trained models. data/stats/attention_mass.parquet."""
    rows = mass[mass["mass"] == "first"].copy()
    rows["level"] = rows["base"].fillna(rows["instruct"])
    data = rows.groupby(["family", "category", "layer"], as_index=False)["level"].mean()
    panels = max(1, min(columns, data["family"].nunique()))
    return alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("layer:Q", title="layer"),
        y=alt.Y("level:Q", title="mass on the first token", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("category:N", scale=CATEGORY_COLOURS, sort=list(CATEGORIES)),
        tooltip=["family", "category", "layer", alt.Tooltip("level:Q", format=".3f")],
    ).properties(width=panel_width(width, panels), height=180).facet(
        facet=alt.Facet("family:N", title=None), columns=panels).resolve_scale(x="independent")


def save(chart: alt.Chart, folder: Path, name: str) -> dict[str, Path]:
    """Write `<name>.vl.json`, `.svg` and `.png` atomically; returns their paths."""
    spec = chart.to_dict()
    out = {"json": folder / f"{name}.vl.json", "svg": folder / f"{name}.svg", "png": folder / f"{name}.png"}
    with atomic_path(out["json"]) as tmp:
        tmp.write_text(json.dumps(spec, indent=1, sort_keys=True), encoding="utf-8")
    with atomic_path(out["svg"]) as tmp:
        tmp.write_text(vlc.vegalite_to_svg(spec), encoding="utf-8")
    with atomic_path(out["png"]) as tmp:
        tmp.write_bytes(vlc.vegalite_to_png(spec, scale=2))
    return out


def build_all(layers: pd.DataFrame, deltas: pd.DataFrame, heads: pd.DataFrame, lengths: pd.DataFrame,
              folder: Path, definition: str, prompt_format: str, width: int, columns: int,
              stage_deltas: pd.DataFrame, attention_mass: pd.DataFrame, patching: pd.DataFrame,
              top_k: int) -> dict[str, dict[str, Path]]:
    """Every chart of the report for the headline definition and prompt format, `width` pixels wide
    with facets wrapped into `columns` columns (params.yaml `figures`); `stage_profiles` for the families with
    more than two training stages (otherwise a chart that says there is none);
    `language_profiles` for every prompt language the build has; `where_heads_look` for the `top_k`
    (params.yaml `patch.top_k`) candidates of each family and `patch_effects` from the patching tables."""
    alt.data_transformers.disable_max_rows()
    # families of a single checkpoint (no deltas) get their own charts; the others' charts leave them out
    paired = set(deltas["family"])
    singles = [f for f in dict.fromkeys(layers["family"]) if f not in paired]
    single_layers = choice_rows(layers[layers["family"].isin(singles)], definition, prompt_format)
    layers = layers[layers["family"].isin(paired)]
    heads = heads[heads["family"].isin(paired)]
    single_mass = attention_mass[attention_mass["family"].isin(singles) & (attention_mass["format"] == prompt_format)]
    if "language" in single_mass:
        single_mass = single_mass[single_mass["language"] == SOURCE_LANGUAGE]
    attention_mass = attention_mass[attention_mass["family"].isin(paired)]
    patching = patching[patching["family"].isin(paired)]
    charts = {
        "layer_entropy": layer_entropy(choice_rows(layers, definition, prompt_format), width, columns),
        "delta_profiles": delta_profiles(choice_rows(deltas, definition, prompt_format), width, columns),
        "depth_profiles": depth_profiles(choice_rows(deltas, definition, prompt_format), width),
        "head_scores": head_scores(choice_rows(heads, definition, prompt_format), width, columns),
        "prompt_lengths": prompt_lengths(lengths[lengths["language"] == SOURCE_LANGUAGE], width, columns),
        "language_profiles": language_profiles(choice_rows(deltas, definition, prompt_format, None), width, columns),
    }
    charts["stage_profiles"] = stage_profiles(choice_rows(stage_deltas, definition, prompt_format), width, columns)
    headline_heads = choice_rows(heads, definition, prompt_format)
    mass = attention_mass[attention_mass["format"] == prompt_format]
    if "language" in mass:
        mass = mass[mass["language"] == SOURCE_LANGUAGE]
    charts["where_heads_look"] = where_heads_look(mass, headline_heads[headline_heads["position"] <= top_k], width, columns)
    charts["patch_effects"] = patch_effects(patching, width, columns)
    if singles:
        charts["checkpoint_rfc"] = checkpoint_rfc(single_layers, width, columns)
        charts["sink_mass"] = sink_mass(single_mass, width, columns)
    return {name: save(chart, folder, name) for name, chart in charts.items()}
