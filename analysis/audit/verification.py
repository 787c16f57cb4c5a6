"""`selfref verify`: recompute every number of data/stats, data/original and data/patching (tables and summaries)
from the tracked tables, in a temporary folder, and compare each with the stored one at the precision the artefacts keep.

metrics.json stores 6 significant digits; floating-point results differ in the last bits between CPUs,
so two numbers agree when they differ by at most one unit in the 6th significant digit (never by hash).
The entropy tables themselves need the models to recompute: `dvc repro` re-extracts them.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.core import config as config_mod
from analysis.core.artefacts import read_json, write_json, write_parquet
from analysis.core.errors import UserError
from analysis.statistics.layers import SIGNIFICANT_DIGITS  # what metrics.json keeps
from analysis.core.layout import ProjectPaths, project_paths

# Entropies are accumulated in float32 (7 significant digits of a few nats), so no number derived from them
# is meaningful below about 1e-7 in absolute terms; 1e-6 is far below anything the report prints.
ABSOLUTE_TOLERANCE = 1e-6
ID_COLUMNS = ("definition", "format", "family", "family_a", "family_b", "variant", "language", "contrast", "from_stage",
              "to_stage", "category", "intervention", "metric", "layer", "head", "claim")
NOT_CHECKED = ("The entropy tables (data/entropy/**) and the per-prompt patching effects "
               "(data/patching/<family>.prompts.parquet) are the input of this check and need the models to "
               "recompute: run `dvc repro` (it re-extracts every table whose inputs changed; `dvc repro --force "
               "extract@<family>` re-extracts one family) and compare the new tables with the old ones at tolerance, "
               "e.g. `selfref verify` again afterwards, never by file hash (md5s in dvc.lock change between CPUs).")


def _stats_function():
    """The stats stage's top-level library function: the ONE place verification imports it."""
    from analysis.statistics.study import build_study

    return build_study


def tolerance(a: float, b: float) -> float:
    """One unit in the 6th significant digit of the larger magnitude (metrics.json keeps 6), at least
    ABSOLUTE_TOLERANCE (differences of nearly equal entropies lose relative precision)."""
    scale = max(abs(a), abs(b))
    if scale == 0:
        return ABSOLUTE_TOLERANCE
    return max(10.0 ** (math.floor(math.log10(scale)) - (SIGNIFICANT_DIGITS - 1)), ABSOLUTE_TOLERANCE)


def numbers_agree(a, b) -> bool:
    """Stored vs recomputed number: both missing, equal, or within `tolerance`."""
    if a is None or b is None:
        return a is None and b is None
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= tolerance(a, b)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass
class Verification:
    """What was compared: counts of numbers, the mismatches as (key, stored, recomputed)."""

    n_numbers: int = 0
    n_labels: int = 0
    mismatches: list[tuple[str, object, object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def compare(self, key: str, stored, recomputed) -> None:
        if _is_number(stored) or _is_number(recomputed) or (stored is None and recomputed is None):
            self.n_numbers += 1
            if not (_is_number(stored) or stored is None) or not (_is_number(recomputed) or recomputed is None) \
                    or not numbers_agree(stored, recomputed):
                self.mismatches.append((key, stored, recomputed))
        else:
            self.n_labels += 1
            if stored != recomputed:
                self.mismatches.append((key, stored, recomputed))

    def lines(self) -> list[str]:
        bad_numbers = sum(1 for _, s, r in self.mismatches if _is_number(s) or _is_number(r) or s is None or r is None)
        out = [f"{self.n_numbers - bad_numbers} of {self.n_numbers} numbers reproduce"
               f" ({self.n_labels} labels compared too)"]
        for key, stored, recomputed in self.mismatches:
            out.append(f"  MISMATCH {key}: stored {stored!r}, recomputed {recomputed!r}")
        out.extend(self.notes)
        out.append("Not checked: " + NOT_CHECKED)
        return out


def compare_json(result: Verification, where: str, stored, recomputed) -> None:
    """Every leaf of two JSON documents, keyed `<file>: a.b.c`; keys present on one side only are mismatches."""
    def walk(key: str, s, r):
        if isinstance(s, dict) or isinstance(r, dict):
            if not (isinstance(s, dict) and isinstance(r, dict)):
                result.mismatches.append((f"{where}: {key}", s, r))
                return
            for k in sorted(set(s) | set(r)):
                child = f"{key}.{k}" if key else str(k)
                if k not in s or k not in r:
                    result.mismatches.append((f"{where}: {child}", s.get(k, "<absent>"), r.get(k, "<absent>")))
                else:
                    walk(child, s[k], r[k])
        elif isinstance(s, list) or isinstance(r, list):
            if not (isinstance(s, list) and isinstance(r, list)) or len(s) != len(r):
                result.mismatches.append((f"{where}: {key}", s, r))
                return
            for i, (a, b) in enumerate(zip(s, r)):
                walk(f"{key}[{i}]", a, b)
        else:
            result.compare(f"{where}: {key}", s, r)

    walk("", stored, recomputed)


def plain_value(value):
    """A table cell or JSON leaf as None, bool, int, float or str: NaN and None are both None (undefined)."""
    if value is None:
        return None
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    return value if not hasattr(value, "item") else value.item()


def compare_tables(result: Verification, where: str, stored: pd.DataFrame, recomputed: pd.DataFrame) -> None:
    """Cell by cell, rows in written order; a cell is keyed `<file>[id columns].<column>`."""
    if list(stored.columns) != list(recomputed.columns) or len(stored) != len(recomputed):
        result.mismatches.append((f"{where}: shape", f"{len(stored)} rows x {list(stored.columns)}",
                                  f"{len(recomputed)} rows x {list(recomputed.columns)}"))
        return
    # a number is never an id (language_contrasts' `contrast` is a value, the stage tables' a label)
    ids = [c for c in ID_COLUMNS if c in stored.columns and not pd.api.types.is_float_dtype(stored[c])]
    stored = stored.reset_index(drop=True)
    recomputed = recomputed.reset_index(drop=True)
    for i in range(len(stored)):
        label = ", ".join(f"{c}={stored.at[i, c]}" for c in ids) or f"row {i}"
        for column in stored.columns:
            s, r = plain_value(stored.at[i, column]), plain_value(recomputed.at[i, column])
            result.compare(f"{where}[{label}].{column}", s, r)


def _compare_files(result: Verification, where: str, stored: Path, copy: Path) -> None:
    if not stored.exists():
        result.mismatches.append((where, "<missing: run `dvc repro`>", "recomputed"))
        return
    if stored.suffix == ".json":
        compare_json(result, where, read_json(stored), read_json(copy))
    elif stored.suffix == ".parquet":
        compare_tables(result, where, pd.read_parquet(stored), pd.read_parquet(copy))
    elif stored.suffix == ".csv":
        compare_tables(result, where, pd.read_csv(stored), pd.read_csv(copy))


def _compare_tree(result: Verification, paths: ProjectPaths, copy: ProjectPaths) -> None:
    """Every file written under the copy's root against the workspace file at the same relative path."""
    for written in sorted(p for p in copy.root.rglob("*") if p.is_file()):
        relative = written.relative_to(copy.root)
        _compare_files(result, str(relative), paths.root / relative, written)


def _recompute_patching(result: Verification, config: config_mod.Config, study: dict, copy: ProjectPaths) -> None:
    """Each family's patching table and summary from its stored per-prompt effects (the forward passes that
    made those need the models, like the entropy tables) and the recomputed heads table (for a family of a single
    checkpoint its self_focus_heads table)."""
    from analysis.interventions.summary import heads_table, selection_for, summaries

    paths = config.paths
    for family in config.families:
        if not paths.patch_prompts(family).exists():
            result.notes.append(f"{paths.relative(paths.patch_prompts(family))}: absent, not checked "
                                f"(run `selfref patch {family}`)")
            continue
        per_prompt = pd.read_parquet(paths.patch_prompts(family))
        heads = study[heads_table(config, family)]
        table, summary = summaries(config, family, per_prompt, selection_for(config, family, heads))
        write_parquet(table, copy.patch_table(family))
        write_json(summary, copy.patch_summary(family))


def verify_workspace(keep: Path | None = None, paths: ProjectPaths | None = None) -> Verification:
    """Recompute the stats and original stages' artefacts into a temporary folder (or `keep`) and compare
    them with the workspace's. Reads params.yaml, data/entropy/**, data/original/*; writes nothing else."""
    from analysis.statistics.original_study import load_build, reanalyse
    from analysis.statistics.original_study import write_reanalysis
    from analysis.statistics.study import entropy_tables, write_study

    paths = paths or project_paths()
    config = config_mod.load(paths)
    result = Verification()
    tmp = Path(tempfile.mkdtemp(prefix="selfref-verify-")) if keep is None else Path(keep)
    if keep is not None and tmp.resolve().is_relative_to(paths.data.resolve()):
        raise UserError(f"--keep {keep}: choose a folder outside data/, verify never writes into the workspace")
    copy = project_paths(tmp)
    try:
        study = _stats_function()(entropy_tables(config), config.stats, config.stages)
        write_study(study, paths, copy.stats)

        if paths.reanalysis.exists() or paths.reanalysis_claims.exists():
            build = load_build(config, read_stats=False)
            if any(build.matches.values()):  # this build's values come from the recomputed stats, not the stored
                build.deltas, build.heads, build.metrics = study["deltas"], study["heads"], study["metrics"]
            reanalysis = reanalyse(paths.original, paths.original_sums, paths.original_claims, config.stats, build)
            write_reanalysis(reanalysis, copy)
        else:
            result.notes.append(f"{paths.relative(paths.reanalysis)}: absent, not checked (run `selfref original`)")
        _recompute_patching(result, config, study, copy)
        _compare_tree(result, paths, copy)
        if keep is not None:
            result.notes.append(f"recomputed artefacts kept in {tmp}")
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return result
