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
from analysis.core.quantities import CATEGORIES, LANGUAGES, SOURCE_LANGUAGE, choice_rows, head_label, words
from analysis.report.findings import head_role

CATEGORY_WORDS = [words(c) for c in CATEGORIES]
CATEGORY_COLOURS = alt.Scale(domain=CATEGORY_WORDS, range=["#d62728", "#1f77b4", "#2ca02c", "#9467bd"])
CATEGORY_DASHES = alt.Scale(domain=CATEGORY_WORDS, range=[[1, 0], [6, 3], [2, 2], [8, 2, 2, 2]])
CLASS_WORDS = [words(c) for c in ("compression", "gain", "no_change")]
CLASS_COLOURS = alt.Scale(domain=CLASS_WORDS, range=["#d62728", "#1f77b4", "#9e9e9e"])
DASHES = [[1, 0], [6, 3], [2, 2], [8, 2, 2, 2], [10, 4], [3, 3, 8, 3], [1, 3]]  # told apart where lines overlap
AXIS_PX = 60      # room an independent y axis takes beside a panel (approximate)
PANEL_EXTRA_PX = 60  # a panel's title and x axis below/above its plot (approximate)
LEGEND_PX = 110   # a legend below the panels, one or two rows (approximate)


def panel_width(width: int, columns: int) -> int:
    """Width of one facet panel so that `columns` panels and their axes fit `width` pixels (the report's text
    column, `figures.width` in params.yaml); legends go below the panels."""
    return max(70, int(width) // int(columns) - AXIS_PX)


def layout(n_panels: int, panel_height: int, width: int, columns: int, height: int) -> tuple[int, int, int]:
    """(columns, panel width, panel height) for `n_panels` wrapped panels: at least `columns` per row, more (and then
    lower panels) until the chart is at most `height` pixels tall (`figures.height`: the PDF's text area)."""
    n_panels = max(1, int(n_panels))
    for cols in range(min(int(columns), n_panels), n_panels + 1):
        rows = -(-n_panels // cols)
        fitted = min(panel_height, (int(height) - LEGEND_PX) // rows - PANEL_EXTRA_PX)
        if fitted >= 80 or cols == n_panels:
            return cols, panel_width(width, cols), max(40, fitted)
    return n_panels, panel_width(width, n_panels), panel_height


def _words(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """The frame with the code names of `columns` replaced by their words (quantities.words)."""
    return frame.assign(**{c: frame[c].map(words) for c in columns})


def _panels(data: pd.DataFrame, first: str, second: str) -> tuple[pd.DataFrame, list[str]]:
    """A `panel` column "<first> · <second>" for a wrapped facet, and its order (first, then second)."""
    data = data.assign(panel=data[first].astype(str) + " · " + data[second].astype(str))
    order = list(dict.fromkeys(data.sort_values([first, second], kind="stable")["panel"]))
    return data, order


def layer_entropy(layers: pd.DataFrame, width: int, columns: int, height: int = 760) -> alt.Chart:
    """Mean entropy per category and layer with bootstrap bands, base and instruct side by side, per family; each
    category has its colour, line style and point shape, so lines that lie on top of each other stay apart."""
    rows = []
    for c in CATEGORIES:
        part = layers[["family", "variant", "layer", f"h_{c}", f"h_{c}_lo", f"h_{c}_hi"]].copy()
        part.columns = ["family", "variant", "layer", "entropy", "lo", "hi"]
        rows.append(part.assign(category=c))
    data = _words(pd.concat(rows, ignore_index=True), "category")
    base = alt.Chart().encode(
        x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1)),
        color=alt.Color("category:N", scale=CATEGORY_COLOURS, title="prompt category"),
    )
    band = base.mark_area(opacity=0.12).encode(y=alt.Y("lo:Q", title="mean entropy (nats)", scale=alt.Scale(zero=False)),
                                               y2="hi:Q")
    line = base.mark_line(point=True, strokeWidth=1.5).encode(
        y="entropy:Q",
        strokeDash=alt.StrokeDash("category:N", scale=CATEGORY_DASHES, title="prompt category"),
        shape=alt.Shape("category:N", title="prompt category", scale=alt.Scale(domain=CATEGORY_WORDS)),
        tooltip=["family", "variant", "category", "layer", alt.Tooltip("entropy:Q", format=".4f"),
                 alt.Tooltip("lo:Q", format=".4f"), alt.Tooltip("hi:Q", format=".4f")],
    )
    data, order = _panels(data, "family", "variant")
    cols, w, h = layout(len(order), 140, width, columns, height)
    return alt.layer(band, line, data=data).properties(width=w, height=h).facet(
        facet=alt.Facet("panel:N", title=None, sort=order), columns=cols
    ).resolve_scale(x="independent", y="independent")


def delta_profiles(deltas: pd.DataFrame, width: int, columns: int, height: int = 760) -> alt.Chart:
    """ΔRFC and ΔRSI per layer with bootstrap CIs; layers with FDR-significant ΔRFC coloured by class."""
    rows = []
    for metric, label in (("delta_rfc", "ΔRFC"), ("delta_rsi", "ΔRSI")):
        part = deltas[["family", "layer", "layer_class", "q_value", metric, f"{metric}_lo", f"{metric}_hi"]].copy()
        part.columns = ["family", "layer", "layer_class", "q_value", "value", "lo", "hi"]
        rows.append(part.assign(metric=label))
    data, order = _panels(_words(pd.concat(rows, ignore_index=True), "layer_class"), "family", "metric")
    base = alt.Chart().encode(x=alt.X("layer:Q", axis=alt.Axis(tickMinStep=1)))
    rule = alt.Chart().mark_rule(color="black", strokeDash=[3, 3]).encode(y=alt.datum(0))
    bars = base.mark_errorbar().encode(y=alt.Y("lo:Q", title="instruct − base"), y2="hi:Q")
    points = base.mark_point(filled=True, size=45).encode(
        y="value:Q",
        color=alt.Color("layer_class:N", scale=CLASS_COLOURS, title="ΔRFC test (FDR)"),
        tooltip=["family", "metric", "layer", alt.Tooltip("value:Q", format=".4f"), alt.Tooltip("lo:Q", format=".4f"),
                 alt.Tooltip("hi:Q", format=".4f"), alt.Tooltip("q_value:Q", format=".3g"), "layer_class"],
    )
    cols, w, h = layout(len(order), 130, width, 2 * columns, height)  # ΔRFC and ΔRSI of a family side by side
    return alt.layer(rule, bars, points, data=data).properties(width=w, height=h).facet(
        facet=alt.Facet("panel:N", title=None, sort=order), columns=cols
    ).resolve_scale(y="independent")


def depth_profiles(deltas: pd.DataFrame, width: int) -> alt.Chart:
    """Every family's ΔRFC profile on relative depth (layer + 0.5) / n_layers, in one chart; each family has its
    colour, line style and point shape, so profiles that coincide (two exact nulls) stay apart."""
    families = list(dict.fromkeys(deltas["family"]))
    chart = alt.Chart(deltas).mark_line(point=True, strokeWidth=1.5).encode(
        x=alt.X("depth:Q", title="relative depth", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("delta_rfc:Q", title="ΔRFC (instruct − base)"),
        color=alt.Color("family:N", title="family", scale=alt.Scale(domain=families)),
        strokeDash=alt.StrokeDash("family:N", title="family",
                                  scale=alt.Scale(domain=families, range=(DASHES * len(families))[:len(families)])),
        shape=alt.Shape("family:N", title="family", scale=alt.Scale(domain=families)),
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
    steps = _words(steps, "layer_class")
    panels = min(columns, steps["family"].nunique())
    return alt.layer(rule, bars, lines, data=steps[fields]).properties(
        width=panel_width(width, panels), height=170).facet(facet=alt.Facet("family:N", title=None), columns=panels)


def language_profiles(deltas: pd.DataFrame, width: int, columns: int, height: int = 760) -> alt.Chart:
    """ΔRFC per layer with bootstrap CIs for each prompt language, one panel per family: where the language of
    the question changes the effect of instruction tuning (data/stats/language_contrasts.parquet tests it)."""
    fields = ["family", "language", "layer", "delta_rfc", "delta_rfc_lo", "delta_rfc_hi", "q_value", "layer_class"]
    order = [words(x) for x in LANGUAGES if x in set(deltas["language"])]
    deltas = _words(deltas, "language", "layer_class")
    base = alt.Chart().encode(x=alt.X("layer:Q", axis=alt.Axis(tickMinStep=1)),
                              color=alt.Color("language:N", title="prompt language", sort=order,
                                              scale=alt.Scale(domain=order)),
                              strokeDash=alt.StrokeDash("language:N", title="prompt language", sort=order,
                                                        scale=alt.Scale(domain=order, range=DASHES[:len(order)])))
    rule = alt.Chart().mark_rule(color="black", strokeDash=[3, 3]).encode(y=alt.datum(0))
    bars = base.mark_errorbar(opacity=0.6).encode(y=alt.Y("delta_rfc_lo:Q", title="ΔRFC (instruct − base)"),
                                                  y2="delta_rfc_hi:Q")
    lines = base.mark_line(point=True).encode(
        y="delta_rfc:Q",
        tooltip=["family", "language", "layer", alt.Tooltip("delta_rfc:Q", format=".4f"),
                 alt.Tooltip("delta_rfc_lo:Q", format=".4f"), alt.Tooltip("delta_rfc_hi:Q", format=".4f"),
                 alt.Tooltip("q_value:Q", format=".3g"), "layer_class"])
    cols, w, h = layout(deltas["family"].nunique(), 150, width, columns, height)
    return alt.layer(rule, bars, lines, data=deltas[fields]).properties(width=w, height=h).facet(
        facet=alt.Facet("family:N", title=None), columns=cols).resolve_scale(y="independent")


def head_scores(heads: pd.DataFrame, candidates: pd.DataFrame, width: int, columns: int, height: int = 760) -> alt.Chart:
    """Layer x head heatmap of the head score per family; the candidate heads (`candidates`: family, layer, head of
    the heads the patch stage tested as candidates, selections.head_role) outlined."""
    marked = candidates.assign(candidate=True)[["family", "layer", "head", "candidate"]]
    heads = heads.merge(marked, how="left", on=["family", "layer", "head"])
    heads["candidate"] = heads["candidate"].fillna(False).astype(bool)
    base = alt.Chart().encode(x=alt.X("head:O", title="head"), y=alt.Y("layer:O", title="layer", sort="descending"))
    cells = base.mark_rect().encode(
        color=alt.Color("score:Q", scale=alt.Scale(scheme="viridis"), title="head score"),
        tooltip=["family", "layer", "head", alt.Tooltip("score:Q", format=".3f"), "rank",
                 alt.Tooltip("did:Q", format=".4f"), alt.Tooltip("q_value:Q", format=".3g")],
    )
    top = base.transform_filter(alt.datum.candidate).mark_point(shape="square", size=120, color="white", strokeWidth=2)
    cols, w, h = layout(heads["family"].nunique(), 160, width, columns, height)
    return alt.layer(cells, top, data=heads).properties(width=w, height=h).facet(
        facet=alt.Facet("family:N", title=None), columns=cols).resolve_scale(x="independent", y="independent")


MASS_PARTS = ("first token", "person marker", "rest")
MASS_COLOURS = alt.Scale(domain=list(MASS_PARTS), range=["#7f7f7f", "#d62728", "#c7c7c7"])


def tested_heads(patching: pd.DataFrame, names_candidates: dict[str, bool]) -> pd.DataFrame:
    """The heads the patch stage tested as its top-ranked heads, one row each (family, layer, head, role, panel):
    role 'candidate' or 'null_check' by selections.head_role, and the family's panel title saying which."""
    if not len(patching):
        return pd.DataFrame(columns=["family", "layer", "head", "role", "panel"])
    rows = patching[patching["role"] == "candidate"][["family", "layer", "head"]].drop_duplicates()
    roles = rows["family"].map(lambda f: head_role("candidate", bool(names_candidates.get(f, False))))
    return rows.assign(role=roles.to_numpy(), panel=[f"{f}: {words(r)}s" if r == "candidate" else f"{f}: null checks"
                                                     for f, r in zip(rows["family"], roles)]).reset_index(drop=True)


def where_heads_look(mass: pd.DataFrame, candidates: pd.DataFrame, width: int, columns: int,
                     height: int = 760) -> alt.Chart:
    """Where each family's candidate heads attend on self-referent prompts, base against instruct: the mean mass
    on the first token, on the person marker, and the rest (1 − both, at least 0; the two masses are averaged
    over different query positions, docs/method.md "Where heads look"). data/stats/attention_mass.parquet."""
    rows = mass[mass["category"] == "self_referent"].merge(candidates[["family", "layer", "head", "panel"]])
    wide = rows.pivot_table(index=["panel", "layer", "head"], columns="mass", values=["base", "instruct"])
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
    n = max(1, data["family"].nunique())
    rows_per_panel = max(1, data.groupby("family")["row"].nunique().max()) if len(data) else 1
    cols, w, h = layout(n, 12 * rows_per_panel, width, columns, height)
    return alt.layer(bars, data=data).properties(width=w, height=h).facet(
        facet=alt.Facet("family:N", title=None), columns=cols).resolve_scale(y="independent")


def patch_effects(patching: pd.DataFrame, tested: pd.DataFrame, width: int, columns: int, height: int = 760) -> alt.Chart:
    """Each candidate head's later-layer effect (self-referent prompts) against the family's random control heads,
    per intervention: controls as grey ticks, candidates as labelled points (data/patching/<family>.parquet).
    A symmetric-log axis, so that exact zeros (heads whose output the intervention leaves unchanged) show."""
    fields = ["family", "intervention", "role", "layer", "head", "effect_self", "control_percentile", "q_value"]
    data = patching[patching["metric"] == "entropy_later"][fields].dropna(subset=["effect_self"])
    data = data.assign(label=[head_label(l, h) for l, h in zip(data["layer"], data["head"])])
    data = _words(data.merge(tested[["family", "panel"]].drop_duplicates(), on="family"), "intervention")
    data["family"] = data["panel"]
    order = list(dict.fromkeys(data["intervention"]))
    x = alt.X("effect_self:Q", title="|Δ mean entropy of later layers| (nats, symlog)",
              scale=alt.Scale(type="symlog", constant=1e-5))
    y = alt.Y("intervention:N", title=None, sort=order)
    controls = alt.Chart().transform_filter(alt.datum.role == "control").mark_tick(color="#9e9e9e", thickness=2).encode(
        x=x, y=y, tooltip=["label", "intervention", alt.Tooltip("effect_self:Q", format=".3g")])
    cands = alt.Chart().transform_filter(alt.datum.role == "candidate").mark_point(filled=True, size=60).encode(
        x=x, y=y, color=alt.Color("label:N", title="tested head", legend=alt.Legend(columns=8)),
        tooltip=["label", "intervention", alt.Tooltip("effect_self:Q", format=".3g"),
                 alt.Tooltip("control_percentile:Q", format=".0f"), alt.Tooltip("q_value:Q", format=".3g")])
    cols, w, h = layout(data["family"].nunique(), 18 * max(1, len(order)), width, columns, height)
    return alt.layer(controls, cands, data=data).properties(width=w, height=h).facet(
        facet=alt.Facet("family:N", title=None), columns=cols).resolve_scale(x="independent", color="independent")


def prompt_lengths(lengths: pd.DataFrame, width: int, columns: int, height: int = 760) -> alt.Chart:
    """Prompt counts and mean token length per category, for each family's tokenizer."""
    lengths = _words(lengths.assign(category=lengths["category"].astype(str)), "category", "format")
    bars = alt.Chart().mark_bar().encode(
        x=alt.X("category:N", title=None, sort=CATEGORY_WORDS),
        y=alt.Y("mean:Q", title="mean tokens per prompt"),
        color=alt.Color("category:N", scale=CATEGORY_COLOURS, legend=None),
        tooltip=["family", "format", "category", alt.Tooltip("count:Q", title="prompts"),
                 alt.Tooltip("mean:Q", format=".2f"), "min", "max"],
    )
    errs = alt.Chart().mark_errorbar().encode(x=alt.X("category:N", sort=CATEGORY_WORDS),
                                                       y="min:Q", y2="max:Q")
    data, order = _panels(lengths, "family", "format")
    cols, w, h = layout(len(order), 120, width, columns, height)
    return alt.layer(bars, errs, data=data).properties(width=w, height=h).facet(
        facet=alt.Facet("panel:N", title=None, sort=order), columns=cols)


def probe_profiles(probes: pd.DataFrame, layers: pd.DataFrame, width: int, columns: int, height: int) -> alt.Chart:
    """Per family and pool, the self-vs-neutral probe's selectivity, accuracy, control accuracy and token baseline
    per layer (data/probes/probes.parquet, all languages) beside RFC (headline rows of data/stats/layers.parquet);
    line style: the checkpoint's variant."""
    part = probes[(probes["task"] == "self_vs_neutral") & (probes["language"] == "all")]
    rows = []
    for column, label in (("selectivity", "selectivity"), ("accuracy", "probe accuracy"),
                          ("control_accuracy", "control accuracy"), ("baseline_accuracy", "token baseline")):
        rows.append(part[["family", "variant", "pool", "layer", column]].rename(columns={column: "value"})
                    .assign(measure=label))
    rfc = layers[layers["family"].isin(set(part["family"]))]
    for pool in dict.fromkeys(part["pool"]):
        rows.append(rfc[["family", "variant", "layer", "rfc"]].rename(columns={"rfc": "value"})
                    .assign(measure="RFC", pool=pool))
    data, order = _panels(pd.concat(rows, ignore_index=True), "family", "pool")
    lines = alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("layer:Q", axis=alt.Axis(tickMinStep=1)), y=alt.Y("value:Q", title=None),
        color=alt.Color("measure:N", title=None), shape=alt.Shape("measure:N", title=None),
        strokeDash=alt.StrokeDash("variant:N", title="variant"),
        tooltip=["family", "pool", "variant", "measure", "layer", alt.Tooltip("value:Q", format=".3f")])
    cols, w, h = layout(len(order), 120, width, columns, height)
    return lines.properties(width=w, height=h).facet(facet=alt.Facet("panel:N", title=None, sort=order), columns=cols)


def checkpoint_rfc(layers: pd.DataFrame, width: int, columns: int, height: int) -> alt.Chart:
    """RFC per layer with its prompt-bootstrap interval, one panel per single-checkpoint model (English prompts):
    a profile within one model, never a change. data/stats/layers.parquet."""
    data = layers.assign(model=layers["family"] + " (" + layers["variant"] + ")")
    base = alt.Chart().encode(x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1)))  # facets split it
    band = base.mark_area(opacity=0.25, color="#1f77b4").encode(y=alt.Y("rfc_lo:Q", title="RFC = 1 − H_self / H_neutral"),
                                                              y2="rfc_hi:Q")
    line = base.mark_line(point=True, color="#1f77b4").encode(
        y="rfc:Q", tooltip=["model", "layer", alt.Tooltip("rfc:Q", format=".4f"), alt.Tooltip("rfc_lo:Q", format=".4f"),
                            alt.Tooltip("rfc_hi:Q", format=".4f"), "low_neutral"])
    zero = alt.Chart().mark_rule(color="#777", strokeDash=[4, 3]).encode(y=alt.datum(0.0))
    cols, w, h = layout(data["model"].nunique(), 180, width, columns, height)
    return alt.layer(band, line, zero, data=data).properties(width=w, height=h).facet(
        facet=alt.Facet("model:N", title=None), columns=cols).resolve_scale(x="independent", y="independent")


def sink_mass(mass: pd.DataFrame, width: int, columns: int, height: int) -> alt.Chart:
    """Attention mass on the first token per layer (mean over the layer's heads and the category's prompts), one
    panel per single-checkpoint model: the attention sink of trained models. data/stats/attention_mass.parquet."""
    rows = mass[mass["mass"] == "first"].copy()
    rows["level"] = rows["base"].fillna(rows["instruct"])
    data = _words(rows.groupby(["family", "category", "layer"], as_index=False)["level"].mean(), "category")
    cols, w, h = layout(data["family"].nunique(), 180, width, columns, height)
    return alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("level:Q", title="mass on the first token", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("category:N", scale=CATEGORY_COLOURS, title="prompt category"),
        strokeDash=alt.StrokeDash("category:N", scale=CATEGORY_DASHES, title="prompt category"),
        tooltip=["family", "category", "layer", alt.Tooltip("level:Q", format=".3f")],
    ).properties(width=w, height=h).facet(
        facet=alt.Facet("family:N", title=None), columns=cols).resolve_scale(x="independent")


def save(chart: alt.Chart, folder: Path, name: str) -> dict[str, Path]:
    """Write `<name>.vl.json`, `.svg` and `.png` atomically (legends below the panels, where they take no width);
    returns their paths."""
    spec = chart.configure_legend(orient="bottom", direction="horizontal", titleOrient="top", columns=4).to_dict()
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
              top_k: int, head_families: pd.DataFrame | None = None, height: int = 760,
              probes: pd.DataFrame | None = None) -> dict[str, dict[str, Path]]:
    """Every chart of the report for the headline definition and prompt format, `width` pixels wide
    with facets wrapped into `columns` columns (params.yaml `figures`); `stage_profiles` for the families with
    more than two training stages (otherwise a chart that says there is none);
    `language_profiles` for every prompt language the build has; `where_heads_look` for the `top_k`
    (params.yaml `patch.top_k`) heads the patch stage tested of each family, candidates or null checks
    (`tested_heads`), and `patch_effects` from the patching tables; no chart taller than `height` pixels."""
    alt.data_transformers.disable_max_rows()
    all_layers = layers
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
    names = dict(zip(head_families["family"], head_families["names_candidates"])) if head_families is not None else {}
    tested = tested_heads(patching, names)
    charts = {
        "layer_entropy": layer_entropy(choice_rows(layers, definition, prompt_format), width, columns, height),
        "delta_profiles": delta_profiles(choice_rows(deltas, definition, prompt_format), width, columns, height),
        "depth_profiles": depth_profiles(choice_rows(deltas, definition, prompt_format), width),
        "head_scores": head_scores(choice_rows(heads, definition, prompt_format), tested[tested["role"] == "candidate"],
                                   width, columns, height),
        "prompt_lengths": prompt_lengths(lengths[lengths["language"] == SOURCE_LANGUAGE], width, columns, height),
        "language_profiles": language_profiles(choice_rows(deltas, definition, prompt_format, None), width, columns,
                                               height),
    }
    charts["stage_profiles"] = stage_profiles(choice_rows(stage_deltas, definition, prompt_format), width, columns)
    mass = attention_mass[attention_mass["format"] == prompt_format]
    if "language" in mass:
        mass = mass[mass["language"] == SOURCE_LANGUAGE]
    charts["where_heads_look"] = where_heads_look(mass, tested, width, columns, height)
    charts["patch_effects"] = patch_effects(patching, tested, width, columns, height)
    if singles:
        charts["checkpoint_rfc"] = checkpoint_rfc(single_layers, width, columns, height)
        charts["sink_mass"] = sink_mass(single_mass, width, columns, height)
    if probes is not None:
        layer_rows = choice_rows(all_layers, definition, prompt_format)
        if "language" in layer_rows:
            layer_rows = layer_rows[layer_rows["language"] == SOURCE_LANGUAGE]
        charts["probe_profiles"] = probe_profiles(probes, layer_rows, width, columns, height)
    return {name: save(chart, folder, name) for name, chart in charts.items()}
