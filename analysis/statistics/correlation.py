"""Do two families change in the same layers? Correlation of their ΔRFC profiles.

Families with the same number of layers are compared layer by layer. Otherwise each profile is placed
at relative depth (l + 0.5) / L and interpolated linearly (np.interp) onto a common grid spanning the
depth range both families cover (docs/method.md, "Different depths"). The circular-shift p-value keeps the
profiles' autocorrelation ("Correlated layers") and is the primary p; scipy's Pearson and Spearman p-values,
which treat the points as independent, are given beside it for families of the same depth only (interpolated
points are not observations, so no parametric p is computed on them). A percentile interval of r comes from the
layer bootstrap's ΔRFC resamples of both families. A profile whose largest |ΔRFC| is within the noise floor
carries no signal: the pair has no correlation, and `undefined_reason` says why (docs/method.md, "Noise floor").
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from analysis.core.quantities import relative_depth
from analysis.statistics.resampling import circular_shift_pvalue, percentile_ci, rowwise_pearson

MIN_POINTS = 4
COLUMNS = ["family_a", "family_b", "n_layers_a", "n_layers_b", "grid", "n_points", "depth_lo", "depth_hi",
           "pearson_r", "pearson_p", "pearson_p_shift", "pearson_r_lo", "pearson_r_hi",
           "spearman_r", "spearman_p", "spearman_p_shift", "spearman_r_lo", "spearman_r_hi", "joint_resampling",
           "undefined_reason", "parametric_p_reason"]
# Why a pair has no correlation, or no parametric p (the report prints "undefined (<reason>)").
NO_SIGNAL = "no signal in {family} (largest |ΔRFC| within the noise floor)"
CONSTANT = "{family}'s profile is constant"
TOO_FEW_POINTS = f"fewer than {MIN_POINTS} points"
INTERPOLATED = "interpolated points are not independent"


def interpolation_matrix(depth: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """W [len(grid), len(depth)] with W @ profile == np.interp(grid, depth, profile) for any profile."""
    eye = np.eye(len(depth))
    return np.stack([np.interp(grid, depth, eye[j]) for j in range(len(depth))], axis=1)


def comparison_grid(n_layers_a: int, n_layers_b: int, depth_grid: int) -> tuple[str, np.ndarray, np.ndarray,
                                                                                   np.ndarray]:
    """(grid kind, grid depths, W_a, W_b): the matrices map each family's layer profile onto the grid.

    Same depth: "layer", identity maps. Otherwise "relative_depth": `depth_grid` evenly spaced points
    from the larger of the two shallowest layer centres to the smaller of the two deepest.
    """
    if n_layers_a == n_layers_b:
        return "layer", relative_depth(n_layers_a), np.eye(n_layers_a), np.eye(n_layers_b)
    da, db = relative_depth(n_layers_a), relative_depth(n_layers_b)
    grid = np.linspace(max(da[0], db[0]), min(da[-1], db[-1]), int(depth_grid))
    return "relative_depth", grid, interpolation_matrix(da, grid), interpolation_matrix(db, grid)


def _rank_rows(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x, axis=-1)


def _resampled_ci(a: np.ndarray, b: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of row-wise Pearson r over resamples; resamples with a constant profile are dropped."""
    r = rowwise_pearson(a, b)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return float("nan"), float("nan")
    lo, hi = percentile_ci(r, confidence)
    return float(lo), float(hi)


def undefined_reason(profile_a: np.ndarray, profile_b: np.ndarray, n_points: int, floor: float,
                     names: tuple[str, str]) -> str | None:
    """Why two profiles have no correlation, or None: too few points, a profile that is not finite or constant,
    or one whose largest |ΔRFC| is within the noise floor (no signal: its shape would be float noise)."""
    if n_points < MIN_POINTS:
        return TOO_FEW_POINTS
    for name, profile in zip(names, (profile_a, profile_b)):
        if not np.all(np.isfinite(profile)):
            return f"{name}'s profile is not finite"
        if np.max(np.abs(profile)) <= floor:
            return NO_SIGNAL.format(family=name)
        if np.ptp(profile) == 0:
            return CONSTANT.format(family=name)
    return None


def compare_profiles(profile_a: np.ndarray, profile_b: np.ndarray, *, depth_grid: int, confidence: float,
                     resamples_a: np.ndarray | None = None, resamples_b: np.ndarray | None = None,
                     floor: float = 0.0, names: tuple[str, str] = ("family a", "family b")) -> dict:
    """Correlation statistics of two ΔRFC profiles (one value per layer) on their common grid.

    `resamples_a/b` [B, L] are bootstrap ΔRFC profiles whose rows belong together (same resample index);
    without them the r intervals are NaN. A pair with fewer than MIN_POINTS grid points, a constant profile or
    one without signal (largest |ΔRFC| <= `floor`) gives NaN everywhere with `undefined_reason`; on a
    relative-depth grid the parametric p-values are NaN (`parametric_p_reason`) and the shift p is the p.
    """
    profile_a = np.asarray(profile_a, dtype=float)
    profile_b = np.asarray(profile_b, dtype=float)
    kind, grid, wa, wb = comparison_grid(profile_a.size, profile_b.size, depth_grid)
    x, y = wa @ profile_a, wb @ profile_b
    row = {"n_layers_a": profile_a.size, "n_layers_b": profile_b.size, "grid": kind, "n_points": int(grid.size),
           "depth_lo": float(grid[0]) if grid.size else np.nan, "depth_hi": float(grid[-1]) if grid.size else np.nan}
    nan_keys = ["pearson_r", "pearson_p", "pearson_p_shift", "pearson_r_lo", "pearson_r_hi",
                "spearman_r", "spearman_p", "spearman_p_shift", "spearman_r_lo", "spearman_r_hi"]
    row.update(dict.fromkeys(nan_keys, np.nan))
    row["undefined_reason"] = undefined_reason(profile_a, profile_b, int(grid.size), floor, names)
    row["parametric_p_reason"] = INTERPOLATED if kind == "relative_depth" else None
    if row["undefined_reason"] or np.ptp(x) == 0 or np.ptp(y) == 0:
        row["undefined_reason"] = row["undefined_reason"] or "a profile is constant on the common grid"
        return row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        pearson = stats.pearsonr(x, y)
        spearman = stats.spearmanr(x, y)
    parametric = kind == "layer"
    row.update(pearson_r=float(pearson.statistic), pearson_p=float(pearson.pvalue) if parametric else np.nan,
               pearson_p_shift=circular_shift_pvalue(x, y, "pearson")[1],
               spearman_r=float(spearman.statistic), spearman_p=float(spearman.pvalue) if parametric else np.nan,
               spearman_p_shift=circular_shift_pvalue(x, y, "spearman")[1])
    if resamples_a is not None and resamples_b is not None:
        xa, yb = np.asarray(resamples_a) @ wa.T, np.asarray(resamples_b) @ wb.T
        row["pearson_r_lo"], row["pearson_r_hi"] = _resampled_ci(xa, yb, confidence)
        row["spearman_r_lo"], row["spearman_r_hi"] = _resampled_ci(_rank_rows(xa), _rank_rows(yb), confidence)
    return row


def cross_family_table(profiles: dict[str, np.ndarray], *, depth_grid: int, confidence: float,
                       resamples: dict[str, np.ndarray] | None = None,
                       joint: dict[tuple[str, str], bool] | None = None, floor: float = 0.0) -> pd.DataFrame:
    """One row per unordered pair of families (names sorted, family_a < family_b).

    `profiles[family]` is the ΔRFC profile; `resamples[family]` its bootstrap profiles [B, L]. `joint`
    says per pair whether both families were resampled with the same prompt indices (same prompt set);
    otherwise their resamples are independent and the r interval pairs independent draws.

    Columns: family_a, family_b, n_layers_a, n_layers_b, grid ("layer" | "relative_depth"), n_points,
    depth_lo, depth_hi (grid span on relative depth), pearson_r, pearson_p (scipy; same depth only),
    pearson_p_shift (circular shift: the primary p), pearson_r_lo, pearson_r_hi (bootstrap over prompts),
    spearman_r, spearman_p, spearman_p_shift, spearman_r_lo, spearman_r_hi, joint_resampling,
    undefined_reason (why the pair has no correlation; `floor`: the ΔRFC noise floor), parametric_p_reason.
    """
    rows = []
    for a, b in itertools.combinations(sorted(profiles), 2):
        ra = resamples.get(a) if resamples else None
        rb = resamples.get(b) if resamples else None
        row = {"family_a": a, "family_b": b}
        row.update(compare_profiles(profiles[a], profiles[b], depth_grid=depth_grid, confidence=confidence,
                                    resamples_a=ra, resamples_b=rb, floor=floor, names=(a, b)))
        row["joint_resampling"] = bool(joint.get((a, b), False)) if joint else False
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)
