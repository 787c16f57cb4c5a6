"""Compare a rebuild with the published numbers: `selfref verify --against <revision>`.

`selfref verify` asks whether this workspace's statistics follow from its entropy tables. A reviewer who
re-extracts on another CPU asks something else: do my rebuilt numbers agree with the committed ones, and do the
conclusions stand? Entropies then differ in the last bits, so numbers are compared at the precision the report
prints them at, and the conclusions are compared exactly (docs/method.md, "Reproducing on another CPU"):
- signs: the side of zero of every interval (`x_lo`, `x_hi`) and of every point value at printed precision;
- significance: every p or q value against `stats.alpha`;
- classes and flags: every text or boolean cell (layer classes, `significant`, `top_k`, `tied`, ...);
- ranks and selections: `rank` and `position` columns, ranked metrics (`top_heads`, `top_compression_layers`),
  the candidate sets (rows of the selection tables, heads of the patching summaries).
A sign or significance that differs only because its number sits within tolerance of the threshold (0, alpha)
is listed as borderline, not as changed: no rebuild on any CPU can decide it.
"""

from __future__ import annotations

import math
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.audit.verification import ID_COLUMNS, plain_value
from analysis.core.artefacts import read_json
from analysis.core.config import StatsSettings
from analysis.core.errors import UserError
from analysis.core.layout import ProjectPaths

# The artefacts a build publishes (relative to the project root): the stats, patching and original stages' outputs
# that git tracks. Inputs (prompts, manifests, the original study's files) are not rebuilt and not compared.
PUBLISHED = (re.compile(r"^data/stats/.+\.(parquet|json|csv)$"),
             re.compile(r"^data/patching/[^/]+(?<!\.prompts)\.(parquet|json)$"),
             re.compile(r"^data/original/reanalysis[^/]*\.(parquet|json)$"))
RANK_NAMES = re.compile(r"(^|_)(rank|position)$|^top_heads\.|^top_compression_layers\.|\.top_heads\.|"
                        r"\.top_compression_layers\.")
P_NAMES = re.compile(r"(^|_)(p|q)(_value)?(_\w+)?$|(^|_)p_shift$")
RELATIVE = 1e-4  # large numbers (token counts, sizes) agree to 4 significant digits beyond the printed unit


def is_published(relative: str) -> bool:
    return any(p.match(relative) for p in PUBLISHED)


@dataclass
class Comparison:
    """What differs between a published build and a rebuild: numbers beyond tolerance and changed conclusions."""

    decimals: int
    alpha: float
    n_permutations: int
    n_numbers: int = 0
    n_conclusions: int = 0
    beyond_tolerance: list[tuple[str, object, object, float]] = field(default_factory=list)
    changed: list[tuple[str, str, object, object]] = field(default_factory=list)  # (where, kind, published, rebuilt)
    borderline: list[tuple[str, str, object, object]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No conclusion changed and nothing missing (numbers beyond tolerance are listed, see `lines`)."""
        return not (self.changed or self.missing)

    def tolerance(self, a: float, b: float) -> float:
        """One unit of the printed precision (stats.rank_decimals decimals), or 1e-4 of the value if larger."""
        return max(10.0 ** -self.decimals, RELATIVE * max(abs(a), abs(b)))

    def p_tolerance(self, a: float, b: float) -> float:
        """A Monte Carlo p or q value is known to its standard error sqrt(p(1 - p) / n_permutations): null draws
        that tie with the observed statistic fall on either side of it when the entropies move in the last bits."""
        p = max(min(max(a, b), 1.0), 0.0)
        return max(self.tolerance(a, b), math.sqrt(p * (1.0 - p) / self.n_permutations))

    def agree(self, a, b, p_value: bool = False) -> bool:
        """Both undefined, or both numbers within `tolerance` (`p_tolerance` for a p or q value)."""
        if a is None or b is None:
            return a is None and b is None
        a, b = float(a), float(b)
        if math.isinf(a) or math.isinf(b):
            return a == b
        return abs(a - b) <= (self.p_tolerance(a, b) if p_value else self.tolerance(a, b))

    def sign(self, value: float) -> int:
        """The side of zero at printed precision: a value that prints as 0 has none."""
        return int(np.sign(round(float(value), self.decimals)))

    def number(self, where: str, a, b, p_value: bool = False) -> None:
        self.n_numbers += 1
        if (a is None) != (b is None):
            self.conclusion(where, "defined", a is not None, b is not None)
        elif not self.agree(a, b, p_value):
            tol = (self.p_tolerance if p_value else self.tolerance)(float(a), float(b))
            self.beyond_tolerance.append((where, a, b, tol))

    def conclusion(self, where: str, kind: str, a, b, *, within_noise: bool = False) -> None:
        """One conclusion; a difference that rests on numbers within tolerance is borderline, not changed."""
        self.n_conclusions += 1
        if a != b:
            (self.borderline if within_noise else self.changed).append((where, kind, a, b))

    def lines(self, label: str) -> list[str]:
        out = [f"against {label}: {self.n_numbers - len(self.beyond_tolerance)} of {self.n_numbers} numbers agree at "
               f"the printed precision ({self.decimals} decimals, or 1e-4 relative; p and q values to their Monte "
               f"Carlo standard error); "
               f"{self.n_conclusions - len(self.changed)} of {self.n_conclusions} conclusions unchanged "
               f"(signs, significance at alpha = {self.alpha}, classes, ranks, candidate sets)"
               + (f"; {len(self.borderline)} borderline" if self.borderline else "")]
        out += [f"  MISSING {m}" for m in self.missing]
        out += [f"  BORDERLINE {kind} {where}: published {a!r}, rebuilt {b!r} (within tolerance of its threshold)"
                for where, kind, a, b in self.borderline]
        out += [f"  CHANGED {kind} {where}: published {a!r}, rebuilt {b!r}" for where, kind, a, b in self.changed]
        out += [f"  BEYOND TOLERANCE {where}: published {a!r}, rebuilt {b!r} (tolerance {tol:.1g})"
                for where, a, b, tol in self.beyond_tolerance]
        return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _leaf(c: Comparison, where: str, name: str, a, b, siblings: dict[str, tuple], *, ranked: bool = False) -> None:
    """One value (`name` its own key or column): ranks and labels exactly; numbers at tolerance, with their
    sign, the side of zero of their interval (once, at `_lo`) and, for p and q values, significance at alpha."""
    if ranked or RANK_NAMES.search(name):
        c.conclusion(where, "rank", a, b)
    elif not (_is_number(a) or _is_number(b) or a is None or b is None):
        c.conclusion(where, "class", a, b)
    elif isinstance(a, int) and isinstance(b, int):
        c.conclusion(where, "count", a, b)
    else:
        p_value = bool(P_NAMES.search(name))
        c.number(where, a, b, p_value)
        if a is None or b is None:
            return
        noise = c.agree(a, b, p_value)
        if p_value:
            c.conclusion(where, f"significance (< {c.alpha})", a < c.alpha, b < c.alpha, within_noise=noise)
        elif name.endswith(("_lo", "_hi")) and name[:-3] in siblings:
            if name.endswith("_lo"):
                (lo_a, hi_a), (lo_b, hi_b) = siblings[name[:-3]]
                c.conclusion(f"{where[:-3]}_lo/_hi", "interval sign", _interval_side(lo_a, hi_a),
                             _interval_side(lo_b, hi_b),
                             within_noise=c.agree(lo_a, lo_b) and c.agree(hi_a, hi_b))
        else:
            c.conclusion(where, "sign", c.sign(a), c.sign(b), within_noise=noise)


def _interval_side(lo, hi) -> str:
    if lo is None or hi is None:
        return "undefined"
    return "above 0" if lo > 0 else "below 0" if hi < 0 else "contains 0"


def compare_tables(c: Comparison, where: str, published: pd.DataFrame, rebuilt: pd.DataFrame) -> None:
    """Cell by cell in written order; a changed shape (rows selected, columns) is a changed conclusion."""
    if list(published.columns) != list(rebuilt.columns) or len(published) != len(rebuilt):
        c.conclusion(f"{where}: shape", "selection", f"{len(published)} rows x {list(published.columns)}",
                     f"{len(rebuilt)} rows x {list(rebuilt.columns)}")
        return
    ids = [k for k in ID_COLUMNS if k in published.columns and not pd.api.types.is_float_dtype(published[k])]
    published, rebuilt = published.reset_index(drop=True), rebuilt.reset_index(drop=True)
    for k in ids:
        if not published[k].equals(rebuilt[k]):
            c.conclusion(f"{where}: {k}", "selection", list(published[k]), list(rebuilt[k]))
            return
    for i in range(len(published)):
        label = ", ".join(f"{k}={published.at[i, k]}" for k in ids) or f"row {i}"
        row_a = {k: plain_value(published.at[i, k]) for k in published.columns}
        row_b = {k: plain_value(rebuilt.at[i, k]) for k in published.columns}
        siblings = {k[:-3]: ((row_a[k], row_a[k[:-3] + "_hi"]), (row_b[k], row_b[k[:-3] + "_hi"]))
                    for k in published.columns if k.endswith("_lo") and k[:-3] + "_hi" in row_a}
        for k in published.columns:
            if k in ids:
                continue
            _leaf(c, f"{where}[{label}].{k}", k, row_a[k], row_b[k], siblings)


def compare_json(c: Comparison, where: str, published, rebuilt) -> None:
    """Every leaf; keys on one side only are changed conclusions (a candidate head more or less, say)."""
    def walk(key: str, a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            if set(a) != set(b):
                c.conclusion(f"{where}: {key or '.'}", "keys", sorted(set(a) - set(b)), sorted(set(b) - set(a)))
            siblings = {k[:-3]: ((plain_value(a[k]), plain_value(a.get(k[:-3] + "_hi"))), (plain_value(b[k]), plain_value(b.get(k[:-3] + "_hi"))))
                        for k in set(a) & set(b) if k.endswith("_lo") and k[:-3] + "_hi" in a and k[:-3] + "_hi" in b
                        and not isinstance(a[k], (dict, list))}
            for k in sorted(set(a) & set(b)):
                child = f"{key}.{k}" if key else str(k)
                if isinstance(a[k], (dict, list)) or isinstance(b[k], (dict, list)):
                    walk(child, a[k], b[k])
                else:
                    _leaf(c, f"{where}: {child}", str(k), plain_value(a[k]), plain_value(b[k]), siblings,
                          ranked=bool(RANK_NAMES.search(child)))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                if isinstance(x, (dict, list)):
                    walk(f"{key}[{i}]", x, y)
                else:
                    _leaf(c, f"{where}: {key}[{i}]", key.rsplit(".", 1)[-1], plain_value(x), plain_value(y), {},
                          ranked=bool(RANK_NAMES.search(key)))
        else:
            c.conclusion(f"{where}: {key}", "structure", a, b)

    walk("", published, rebuilt)


def _read(path: Path):
    if path.suffix == ".json":
        return read_json(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path)


def compare_folders(published_root: Path, rebuilt_root: Path, settings: StatsSettings,
                    files: list[str] | None = None) -> Comparison:
    """Every published artefact under `published_root` against the file at the same place under `rebuilt_root`,
    at the stats settings' printed precision (`rank_decimals`), `alpha` and `n_permutations`."""
    c = Comparison(decimals=settings.rank_decimals, alpha=settings.alpha, n_permutations=settings.n_permutations)
    if files is None:
        files = sorted(str(p.relative_to(published_root)) for p in published_root.rglob("*")
                       if p.is_file() and is_published(str(p.relative_to(published_root))))
    for relative in files:
        a, b = published_root / relative, rebuilt_root / relative
        if not b.exists():
            c.missing.append(f"{relative}: not in the rebuild (run `dvc repro`)")
            continue
        pa, pb = _read(a), _read(b)
        if isinstance(pa, pd.DataFrame):
            compare_tables(c, relative, pa, pb)
        else:
            compare_json(c, relative, pa, pb)
    return c


def _git(root: Path, *args: str) -> bytes:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True)
    if done.returncode != 0:
        raise UserError(f"git {' '.join(args)}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def published_at(paths: ProjectPaths, revision: str, into: Path) -> tuple[str, list[str]]:
    """Write the artefacts that `revision` tracks into `into`; returns (the commit SHA, their relative paths)."""
    try:
        sha = _git(paths.root, "rev-parse", "--verify", f"{revision}^{{commit}}").decode().strip()
    except UserError as err:
        raise UserError(f"--against {revision}: not a commit of this repository ({err}); "
                        "name a branch, tag or commit, e.g. HEAD or main") from None
    names = [n for n in _git(paths.root, "ls-tree", "-r", "--name-only", sha, "--", "data").decode().splitlines()
             if is_published(n)]
    if not names:
        raise UserError(f"--against {revision}: commit {sha[:12]} tracks no built artefacts under data/")
    for name in names:
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_git(paths.root, "show", f"{sha}:{name}"))
    return sha, names


def compare_with_revision(paths: ProjectPaths, revision: str, settings: StatsSettings) -> tuple[str, Comparison]:
    """This workspace's artefacts against those committed at `revision` (read with git, written nowhere here)."""
    with tempfile.TemporaryDirectory(prefix="selfref-against-") as tmp:
        sha, names = published_at(paths, revision, Path(tmp))
        return sha, compare_folders(Path(tmp), paths.root, settings, names)
