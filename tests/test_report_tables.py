"""The report's selections (analysis.report_tables) on small hand-made tables with known answers."""

import numpy as np
import pandas as pd

from analysis import report_tables


def heads_table() -> pd.DataFrame:
    """Family a: two heads below alpha; family b: none (smallest q 0.2); ranks within family."""
    return pd.DataFrame({
        "family": ["b", "b", "b", "a", "a", "a"],
        "layer": [0, 0, 1, 0, 1, 1], "head": [0, 1, 0, 0, 0, 1],
        "did": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "did_log_ratio": [0.1] * 6, "consistency": [0.5] * 6,
        "base_entropy": [1.0] * 6, "score": [3.0, 2.0, 1.0, 1.0, 3.0, 2.0],
        "q_value": [0.2, 0.5, 0.9, 0.04, 0.01, 0.3], "rank": [1, 2, 3, 3, 1, 2],
    })


def test_head_families_flag_families_with_a_head_below_alpha():
    out = report_tables.head_families(heads_table(), alpha=0.05).set_index("family")
    assert list(out.index) == ["b", "a"], "table order is kept"
    assert out.loc["a", "n_heads_significant"] == 2 and out.loc["b", "n_heads_significant"] == 0
    assert out.loc["a", "names_candidates"] and not out.loc["b", "names_candidates"]
    assert out.loc["b", "min_q_value"] == 0.2 and out.loc["a", "n_heads"] == 3
    assert not report_tables.head_families(heads_table(), alpha=0.01)["names_candidates"].any(), "q < alpha, strictly"


def test_candidate_heads_are_the_top_k_of_flagged_families_in_rank_order():
    out = report_tables.candidate_heads(heads_table(), alpha=0.05, top_k=2)
    assert out[["family", "rank", "layer", "head"]].values.tolist() == [["a", 1, 1, 0], ["a", 2, 1, 1]]
    assert list(out.columns) == report_tables.CANDIDATE_COLUMNS
    assert report_tables.candidate_heads(heads_table(), alpha=0.001, top_k=2).empty


def test_length_disagreements_and_correlation_pairs():
    length = pd.DataFrame({"family": ["a", "a", "b"], "layer": [1, 0, 0], "delta_rfc": [-0.1, 0.0, 0.2],
                           "layer_class": ["compression", "no_change", "preservation"],
                           "adjusted_delta_rfc": [0.0, 0.0, 0.2], "adjusted_class": ["no_change", "no_change", "preservation"],
                           "disagrees": [True, False, False], "q_value": [0.5, 0.9, 0.01]})
    out = report_tables.length_disagreements(length)
    assert out[["family", "layer"]].values.tolist() == [["a", 1]] and "q_value" not in out
    cross = pd.DataFrame({"family_a": ["a", "a"], "family_b": ["b", "c"], "n_points": [6, 20],
                          "grid": ["layer", "relative_depth"], "pearson_r": [0.5, np.nan]})
    pairs = report_tables.correlation_pairs(cross)
    assert pairs["defined"].tolist() == [True, False] and list(pairs.columns) == report_tables.PAIR_COLUMNS
