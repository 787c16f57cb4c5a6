"""Orders that float noise cannot flip: every rank and selection of the study goes through here.

Two CPUs give entropies that differ in the last bits, so scores of heads that are tied by construction (or
merely close) come out in either order. Every ranking therefore compares values rounded to
`stats.rank_decimals` decimals (the precision the report prints them at) and breaks what is still tied by a
fixed key (layer, then head). Values equal at that precision are ties and are reported as ties (docs/method.md,
"Ranks and ties").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

KEY = ("layer", "head")  # the fixed tie-break: lower layer first, then lower head


def rounded(values, decimals: int) -> np.ndarray:
    """Values rounded to `decimals` decimals (NaN stays NaN); -0.0 becomes 0.0 so that signs are well defined."""
    return np.round(np.asarray(values, dtype=float), int(decimals)) + 0.0


def ordered(table: pd.DataFrame, column: str, decimals: int, *, descending: bool = False,
            key: Sequence[str] = KEY) -> pd.DataFrame:
    """`table` sorted by `column` rounded to `decimals` (descending if asked), ties by `key` (ascending), NaN last."""
    key = [k for k in key if k in table.columns]
    sort_key = rounded(table[column], decimals)
    return (table.assign(_rounded=-sort_key if descending else sort_key)
            .sort_values(["_rounded", *key], kind="stable", na_position="last")
            .drop(columns="_rounded"))


def positions_and_ranks(table: pd.DataFrame, column: str, decimals: int, *, descending: bool = True,
                        key: Sequence[str] = KEY) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of `table` (in its own order): position (1..n, a total order: rounded value, then `key`),
    rank (competition ranking of the rounded value: tied rows share the best position among them) and tied
    (another row has the same rounded value)."""
    order = ordered(table.reset_index(drop=True), column, decimals, descending=descending, key=key).index.to_numpy()
    position = np.empty(len(table), dtype=np.int64)
    position[order] = np.arange(1, len(table) + 1)
    value = pd.Series(rounded(table[column], decimals))
    rank = value.rank(method="min", ascending=not descending, na_option="bottom").to_numpy(dtype=np.int64)
    tied = value.duplicated(keep=False).to_numpy() & value.notna().to_numpy()
    return position, rank, tied


def first_by(table: pd.DataFrame, column: str, decimals: int, *, largest: bool = True, absolute: bool = False,
             key: Sequence[str] = KEY) -> pd.Series:
    """The row with the largest (or smallest) `column` (its absolute value if asked) at `decimals` precision;
    among rows tied there, the first by `key`."""
    values = table[column].abs() if absolute else table[column]
    chosen = ordered(table.assign(_value=values), "_value", decimals, descending=largest, key=key)
    return chosen.drop(columns="_value").iloc[0]


def tie_label(label: str, rank: int, tied: bool) -> str:
    """A ranked item for metrics and tables: its label, with the shared rank where it is tied (`L2H0 (=1)`)."""
    return f"{label} (={int(rank)})" if tied else label
