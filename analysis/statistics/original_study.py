"""The original study re-analysed from its own published per-layer tables (data/original/, docs in its README).

Its tables give one ΔRFC per layer and family, so what can be recomputed is everything a ΔRFC profile
determines: the mean, the share of layers on each side of its ±near_zero rule, the most compressing
layers, and the correlation between families, here on this project's relative-depth rule
(analysis.statistics.correlation.compare_profiles) and with the circular-shift p that keeps the correlation
between neighbouring layers (docs/method.md, "Correlated layers"). Each published claim
(data/original/claims.yaml) is then checked against the original's own tables, and set beside this
build's value when the active suite runs the original's checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis.core.artefacts import file_sha256, read_json, read_parquet, write_json, write_parquet
from analysis.core.config import Checkpoint, Config, StatsSettings
from analysis.statistics.correlation import compare_profiles
from analysis.core.errors import UserError
from analysis.core.layout import ProjectPaths
from analysis.statistics.layers import metric_value, top_compression_layers
from analysis.core.quantities import choice_rows, head_label, original_class
from analysis.statistics.resampling import circular_shift_pvalue

TABLE_COLUMNS = ("layer", "rfc_diff", "n_heads_base", "n_heads_instruct")
CANDIDATE_COLUMNS = ("layer", "head", "composite_score", "n_self", "n_neutral")
FAMILY_QUANTITIES = ("mean_delta_rfc", "share_below", "share_above", "share_near_zero", "compression_band",
                     "prompts_per_category", "top_heads")
PAIR_QUANTITIES = ("pearson_r", "pearson_p", "spearman_r", "spearman_p", "n_points")
SHIFT_P = {"pearson_r": "pearson_p_shift", "pearson_p": "pearson_p_shift",
           "spearman_r": "spearman_p_shift", "spearman_p": "spearman_p_shift"}
PAIR_KEYS = ("pearson_r", "pearson_p", "pearson_p_shift", "spearman_r", "spearman_p", "spearman_p_shift",
             "n_points", "grid", "depth_lo", "depth_hi")
CLAIM_COLUMNS = ["claim", "quantity", "subject", "statement", "stated_at", "note",
                 "published_value", "published_text", "recomputed_value", "recomputed_text", "reproduced", "rule",
                 "autocorr_p", "autocorr_method", "build_value", "build_text", "build_note"]
RULES = {
    "number": "recomputed value rounds to the published one (|difference| <= half a unit of its last digit)",
    "top_heads": "the same heads in the same order at the top of its candidates table (by composite_score)",
    "compression_band": "the family's most negative ΔRFC lies in the band and the band's mean ΔRFC is below "
                        "that of the other layers",
}


def check_files(folder: Path, sums: Path) -> dict[str, str]:
    """Verify every file listed in `sums` (sha256sum format, paths relative to `folder`); {path: sha256}."""
    if not sums.exists():
        raise UserError(f"{sums}: missing; it lists the SHA-256 of every file copied from the original study")
    expected = {}
    for number, line in enumerate(sums.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise UserError(f"{sums}:{number}: expected `<sha256>  <path>`, found {line!r}")
        expected[parts[1].strip().lstrip("*")] = parts[0].lower()
    for name, digest in expected.items():
        path = folder / name
        if not path.exists():
            raise UserError(f"{path}: missing; copy it unchanged from the original repository at the commit "
                            f"named in {folder / 'README.md'}")
        actual = file_sha256(path)
        if actual != digest:
            raise UserError(f"{path}: SHA-256 {actual} differs from {digest} in {sums.name}; the file was changed. "
                            f"Restore it from the original repository at the commit named in {folder / 'README.md'}")
    return expected


def load_claims(path: Path) -> dict:
    """claims.yaml: source, families, compression_band and the list of claims, checked for what the code needs."""
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; it lists the original study's published claims") from None
    for key in ("source", "families", "compression_band", "claims"):
        if key not in (spec or {}):
            raise UserError(f"{path}: needs a top-level `{key}`")
    for claim in spec["claims"]:
        where = f"{path}: claim {claim.get('id')!r}"
        quantity, subject = claim.get("quantity"), str(claim.get("subject"))
        names = subject.split("~")
        if quantity not in FAMILY_QUANTITIES + PAIR_QUANTITIES:
            raise UserError(f"{where}: unknown quantity {quantity!r}; use one of "
                            f"{', '.join(FAMILY_QUANTITIES + PAIR_QUANTITIES)}")
        if len(names) != (2 if quantity in PAIR_QUANTITIES else 1) or any(n not in spec["families"] for n in names):
            raise UserError(f"{where}: subject {subject!r} must be {'two families joined by ~' if quantity in PAIR_QUANTITIES else 'one family'} "
                            f"of `families` ({', '.join(spec['families'])})")
    return spec


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    frame = pd.read_csv(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: lacks column(s) {', '.join(missing)}")
    return frame


def load_profiles(folder: Path, spec: dict) -> dict[str, pd.DataFrame]:
    """Each family's per-layer table (its detailed_comparison.csv), sorted by layer, layers 0 … L-1 checked."""
    out = {}
    for family, entry in spec["families"].items():
        path = folder / entry["table"]
        frame = _read_csv(path, TABLE_COLUMNS).sort_values("layer", ignore_index=True)
        if not np.array_equal(frame["layer"].to_numpy(), np.arange(len(frame))):
            raise UserError(f"{path}: expected one row per layer 0 … {len(frame) - 1}")
        if not np.all(np.isfinite(frame["rfc_diff"].to_numpy(dtype=float))):
            raise UserError(f"{path}: non-finite rfc_diff")
        out[family] = frame
    return out


def profile_summary(layers: np.ndarray, delta_rfc: np.ndarray, near_zero: float, decimals: int) -> dict:
    """Mean ΔRFC, the share of layers below −near_zero, within ±near_zero and above +near_zero (the
    original's rule, quantities.original_class), and the top compression layers (ranked at `decimals`)."""
    delta_rfc = np.asarray(delta_rfc, dtype=float)
    classes = original_class(delta_rfc, near_zero)
    return {"n_layers": int(delta_rfc.size), "mean_delta_rfc": float(delta_rfc.mean()),
            "share_below_minus_near_zero": float(np.mean(classes == "compression")),
            "share_near_zero": float(np.mean(classes == "near_zero")),
            "share_above_near_zero": float(np.mean(classes == "gain")),
            "top_compression_layers": top_compression_layers(layers, delta_rfc, decimals)}


def band_statistics(delta_rfc: np.ndarray, band: tuple[int, int]) -> dict:
    """Where compression concentrates: the most negative layer, mean ΔRFC inside and outside the band, and
    a circular-shift p of the correlation between the profile and the band's indicator (the band moved
    around the layers keeps the profile's autocorrelation)."""
    delta_rfc = np.asarray(delta_rfc, dtype=float)
    lo, hi = int(band[0]), int(band[1])
    inside = np.zeros(delta_rfc.size, dtype=bool)
    inside[lo:hi + 1] = True
    width = hi - lo + 1
    windows = np.convolve(delta_rfc, np.ones(width) / width, mode="valid")
    start = int(np.argmin(windows))
    min_layer = int(np.argmin(delta_rfc))
    mean_in, mean_out = float(delta_rfc[inside].mean()), float(delta_rfc[~inside].mean())
    return {"min_layer": min_layer, "band_mean": mean_in, "other_mean": mean_out,
            "best_window": (start, start + width - 1), "best_window_mean": float(windows[start]),
            "p_shift": circular_shift_pvalue(inside.astype(float), delta_rfc, "pearson")[1],
            "holds": bool(lo <= min_layer <= hi and mean_in < mean_out)}


def _heads_text(frame: pd.DataFrame, n: int) -> str:
    return " ".join(head_label(l, h) for l, h in zip(frame["layer"].iloc[:n], frame["head"].iloc[:n]))


@dataclass
class Build:
    """This build's side of the comparison: per original family, the matching family of the active suite
    (None with a reason when there is none), and the stats artefacts to read its values from."""

    matches: dict[str, str | None]
    reason: str | None
    deltas: pd.DataFrame | None = None
    heads: pd.DataFrame | None = None
    metrics: dict | None = None
    definition: str = "raw"
    prompt_format: str = "raw"


def match_build(spec: dict, checkpoints: tuple[Checkpoint, ...], suite: str) -> tuple[dict[str, str | None], str | None]:
    """Original family -> family of the active suite with the same base and instruct repositories.

    A suite of synthetic (demo) checkpoints matches nothing: its numbers say nothing about real models."""
    if any(c.source == "demo" for c in checkpoints):
        return dict.fromkeys(spec["families"]), f"suite {suite!r} is synthetic (demo checkpoints), not the original's models"
    repos: dict[str, dict[str, str]] = {}
    for c in checkpoints:
        repos.setdefault(c.family, {})[c.variant] = c.repo
    matches = {}
    for family, entry in spec["families"].items():
        found = [f for f, r in repos.items() if r.get("base") == entry["base"] and r.get("instruct") == entry["instruct"]]
        matches[family] = found[0] if found else None
    missing = [f for f, m in matches.items() if m is None]
    reason = (f"suite {suite!r} has no family running {', '.join(spec['families'][f]['base'] for f in missing)} "
              "(base and instruct)") if missing else None
    return matches, reason


def load_build(config: Config, *, read_stats: bool = True) -> Build:
    """This build's side from the configuration and data/stats (read only when some family matches and
    `read_stats`; verification passes its recomputed tables instead)."""
    paths = config.paths
    spec = load_claims(paths.original_claims)
    matches, reason = match_build(spec, config.checkpoints, config.suite)
    build = Build(matches, reason, definition=config.stats.headline_definition,
                  prompt_format=config.stats.headline_format)
    if read_stats and any(matches.values()):
        build.deltas = read_parquet(paths.stats_table("deltas"), ("definition", "format", "family", "layer", "delta_rfc"))
        build.heads = read_parquet(paths.stats_table("heads"), ("definition", "format", "family", "layer", "head", "position"))
        build.metrics = read_json(paths.metrics)
    return build


def _build_profile(build: Build, family: str) -> np.ndarray:
    rows = choice_rows(build.deltas, build.definition, build.prompt_format)
    return rows[rows["family"] == family].sort_values("layer")["delta_rfc"].to_numpy(dtype=float)


def _fmt(value: float, decimals: int | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if decimals is None:
        return f"{value:.4g}"
    return f"{value:+.{decimals}f}" if value < 0 else f"{value:.{decimals}f}"


def _reproduces(published: float, recomputed: float, decimals: int) -> bool:
    if not math.isfinite(recomputed):
        return False
    return abs(recomputed - published) <= 0.5 * 10.0 ** -int(decimals) * (1 + 1e-9)


def reanalyse(folder: Path, sums: Path, claims_path: Path, settings: StatsSettings, build: Build) -> dict:
    """Everything the `original` stage writes: {"reanalysis": JSON-ready dict, "claims": DataFrame}.

    From `settings`: near_zero (the original's rule), depth_grid and confidence (compare_profiles).
    """
    checksums = check_files(folder, sums)
    spec = load_claims(claims_path)
    near_zero, depth_grid, confidence = settings.near_zero, settings.depth_grid, settings.confidence
    band = tuple(int(x) for x in spec["compression_band"])
    tables = load_profiles(folder, spec)
    profiles = {f: t["rfc_diff"].to_numpy(dtype=float) for f, t in tables.items()}
    candidates = {f: _read_csv(folder / e["candidates"], CANDIDATE_COLUMNS)
                  .sort_values("composite_score", ascending=False, kind="stable", ignore_index=True)
                  for f, e in spec["families"].items() if e.get("candidates")}

    families = {}
    for family, table in tables.items():
        summary = profile_summary(table["layer"].to_numpy(), profiles[family], near_zero, settings.rank_decimals)
        summary["n_heads"] = int(table["n_heads_base"].max())
        families[family] = summary
    pairs = {}
    names = sorted(profiles)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            row = compare_profiles(profiles[a], profiles[b], depth_grid=depth_grid, confidence=confidence)
            pairs[f"{a}~{b}"] = {k: row[k] for k in PAIR_KEYS}

    build_pairs: dict[str, dict] = {}

    def build_pair(a: str, b: str) -> dict:
        key = f"{a}~{b}"
        if key not in build_pairs:
            build_pairs[key] = compare_profiles(_build_profile(build, build.matches[a]),
                                                _build_profile(build, build.matches[b]),
                                                depth_grid=depth_grid, confidence=confidence)
        return build_pairs[key]

    rows = []
    for claim in spec["claims"]:
        quantity, subject = claim["quantity"], str(claim["subject"])
        names_ = subject.split("~")
        published, decimals = claim.get("value"), claim.get("decimals")
        row = {"claim": claim["id"], "quantity": quantity, "subject": subject, "statement": claim["text"],
               "stated_at": claim.get("stated_at"), "note": claim.get("note"),
               "published_value": float(published) if isinstance(published, (int, float)) else np.nan,
               "published_text": (f"{band[0]}–{band[1]}" if quantity == "compression_band"
                                  else str(published) if isinstance(published, str) else _fmt(float(published), decimals)),
               "autocorr_p": np.nan, "autocorr_method": None,
               "build_value": np.nan, "build_text": None, "build_note": None}
        matched = all(build.matches.get(n) for n in names_)
        if not matched:
            row["build_note"] = build.reason or "no matching family in this build"
        rule = "number"
        if quantity in PAIR_QUANTITIES:
            rec = pairs[subject]
            value = float(rec[quantity])
            if quantity in SHIFT_P:
                row["autocorr_p"] = float(rec[SHIFT_P[quantity]])
                row["autocorr_method"] = (f"circular shift of one profile ({rec['n_points'] - 1} shifts), "
                                          f"{rec['grid']} grid")
            if matched:
                row["build_value"] = float(build_pair(*names_)[quantity])
        elif quantity == "compression_band":
            rule = "compression_band"
            stats = band_statistics(profiles[subject], band)
            value = stats["band_mean"]
            row["recomputed_text"] = (f"most negative layer {stats['min_layer']}; mean ΔRFC layers {band[0]}–{band[1]} "
                                      f"{stats['band_mean']:+.4f} vs {stats['other_mean']:+.4f} elsewhere; most "
                                      f"compressing {band[1] - band[0] + 1}-layer window {stats['best_window'][0]}–"
                                      f"{stats['best_window'][1]} ({stats['best_window_mean']:+.4f})")
            row["reproduced"] = stats["holds"]
            row["autocorr_p"] = stats["p_shift"]
            row["autocorr_method"] = (f"circular shift of the profile against the band's indicator "
                                      f"({len(profiles[subject]) - 1} shifts)")
            if matched:
                mine = _build_profile(build, build.matches[subject])
                if mine.size > band[1]:
                    b = band_statistics(mine, band)
                    row["build_value"] = b["band_mean"]
                    row["build_text"] = (f"most negative layer {b['min_layer']}; band mean {b['band_mean']:+.4f} vs "
                                         f"{b['other_mean']:+.4f} elsewhere")
                else:
                    row["build_note"] = f"this build's family has {mine.size} layers, fewer than the band needs"
        elif quantity == "top_heads":
            rule = "top_heads"
            wanted = str(published).split()
            table = candidates.get(subject)
            if table is None:
                value, row["recomputed_text"], row["reproduced"] = np.nan, "", False
            else:
                row["recomputed_text"] = _heads_text(table, len(wanted))
                row["reproduced"] = row["recomputed_text"].split() == wanted
                value = np.nan
            if matched:
                h = choice_rows(build.heads, build.definition, build.prompt_format)
                h = h[h["family"] == build.matches[subject]].sort_values("position")
                row["build_text"] = _heads_text(h, len(wanted)) + " (this project's score, analysis.statistics.heads)"
        elif quantity == "prompts_per_category":
            table = candidates.get(subject)
            counts = (set(table["n_self"].astype(int)) | set(table["n_neutral"].astype(int))) if table is not None else set()
            value = float(counts.pop()) if len(counts) == 1 else np.nan
            if matched:
                per_category = build.metrics["families"][build.matches[subject]]["n_prompts"]
                row["build_value"] = float(min(per_category.values()))
                row["build_text"] = ", ".join(f"{k} {v}" for k, v in per_category.items())
        else:
            summary = families[subject]
            key = {"mean_delta_rfc": "mean_delta_rfc", "share_below": "share_below_minus_near_zero",
                   "share_above": "share_above_near_zero", "share_near_zero": "share_near_zero"}[quantity]
            value = summary[key]
            if matched:
                mine = _build_profile(build, build.matches[subject])
                row["build_value"] = profile_summary(np.arange(mine.size), mine, near_zero, settings.rank_decimals)[key]
        row["recomputed_value"] = value
        if rule == "number":
            row["recomputed_text"] = _fmt(value, decimals)
            row["reproduced"] = _reproduces(float(published), value, decimals)
        if isinstance(row["build_value"], float) and math.isfinite(row["build_value"]) and row["build_text"] is None:
            row["build_text"] = _fmt(row["build_value"], decimals if rule == "number" else 4)
        row["rule"] = RULES[rule]
        rows.append(row)
    claims = pd.DataFrame(rows, columns=CLAIM_COLUMNS)
    claims["reproduced"] = claims["reproduced"].astype(bool)

    reanalysis = {
        "source": {"repository": spec["source"]["repository"], "commit": spec["source"]["commit"],
                   "sha256": dict(sorted(checksums.items()))},
        "settings": {"near_zero": metric_value(near_zero), "depth_grid": depth_grid},
        "families": {f: {k: (v if isinstance(v, dict) else metric_value(v)) for k, v in s.items()}
                     for f, s in families.items()},
        "pairs": {p: {k: metric_value(v) for k, v in r.items()} for p, r in pairs.items()},
        "claims": {r["claim"]: {"published": metric_value(r["published_value"]) if math.isfinite(r["published_value"])
                                else r["published_text"],
                                "recomputed": metric_value(r["recomputed_value"]) if math.isfinite(r["recomputed_value"])
                                else r["recomputed_text"],
                                "reproduced": bool(r["reproduced"]),
                                "autocorr_p": metric_value(r["autocorr_p"])}
                   for r in rows},
        "n_claims": len(rows),
        "n_reproduced": int(claims["reproduced"].sum()),
    }
    return {"reanalysis": reanalysis, "claims": claims}


def write_reanalysis(result: dict, paths: ProjectPaths) -> None:
    """The stage's two artefacts at `paths` (the workspace, or verification's temporary copy), each
    written atomically; the table first, so the metrics file never describes a table not yet there."""
    write_parquet(result["claims"], paths.reanalysis_claims)
    write_json(result["reanalysis"], paths.reanalysis)
