"""The report's selections (analysis.statistics.selections) on small hand-made tables with known answers."""

import numpy as np
import pandas as pd

from analysis.statistics import selections


def heads_table() -> pd.DataFrame:
    """Family a: two heads below alpha; family b: none (smallest q 0.2); ranks within family."""
    return pd.DataFrame({
        "family": ["b", "b", "b", "a", "a", "a"],
        "layer": [0, 0, 1, 0, 1, 1], "head": [0, 1, 0, 0, 0, 1],
        "did": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "did_log_ratio": [0.1] * 6, "consistency": [0.5] * 6,
        "base_entropy": [1.0] * 6, "score": [3.0, 2.0, 1.0, 1.0, 3.0, 2.0],
        "q_value": [0.2, 0.5, 0.9, 0.04, 0.01, 0.3], "rank": [1, 2, 3, 3, 1, 2],
        "position": [1, 2, 3, 3, 1, 2], "tied": [False] * 6,
    })


def test_head_families_flag_families_with_a_head_below_alpha():
    out = selections.head_families(heads_table(), alpha=0.05).set_index("family")
    assert list(out.index) == ["b", "a"], "table order is kept"
    assert out.loc["a", "n_heads_significant"] == 2 and out.loc["b", "n_heads_significant"] == 0
    assert out.loc["a", "names_candidates"] and not out.loc["b", "names_candidates"]
    assert out.loc["b", "min_q_value"] == 0.2 and out.loc["a", "n_heads"] == 3
    assert not selections.head_families(heads_table(), alpha=0.01)["names_candidates"].any(), "q < alpha, strictly"


def test_candidate_heads_are_the_top_k_of_flagged_families_in_rank_order():
    out = selections.candidate_heads(heads_table(), alpha=0.05, top_k=2)
    assert out[["family", "rank", "layer", "head"]].values.tolist() == [["a", 1, 1, 0], ["a", 2, 1, 1]]
    assert list(out.columns) == selections.CANDIDATE_COLUMNS
    assert selections.candidate_heads(heads_table(), alpha=0.001, top_k=2).empty


def test_length_disagreements_and_correlation_pairs():
    length = pd.DataFrame({"family": ["a", "a", "b"], "layer": [1, 0, 0], "delta_rfc": [-0.1, 0.0, 0.2],
                           "layer_class": ["compression", "no_change", "gain"],
                           "adjusted_delta_rfc": [0.0, 0.0, 0.2], "adjusted_class": ["no_change", "no_change", "gain"],
                           "disagrees": [True, False, False], "q_value": [0.5, 0.9, 0.01]})
    out = selections.length_disagreements(length)
    assert out[["family", "layer"]].values.tolist() == [["a", 1]] and "q_value" not in out
    cross = pd.DataFrame({"family_a": ["a", "a"], "family_b": ["b", "c"], "n_layers_a": [6, 6], "n_layers_b": [6, 4],
                          "n_points": [6, 20], "grid": ["layer", "relative_depth"], "pearson_r": [0.5, np.nan],
                          "undefined_reason": [None, "no signal in c (largest |ΔRFC| within the noise floor)"]})
    pairs = selections.correlation_pairs(cross)
    assert pairs["defined"].tolist() == [True, False] and list(pairs.columns) == selections.PAIR_COLUMNS
    assert pairs["undefined_reason"].tolist()[1].startswith("no signal in c") and pairs["n_layers_b"].tolist() == [6, 4]


def test_language_contrast_peaks_take_the_largest_absolute_contrast_and_count_significant_layers():
    contrasts = pd.DataFrame({
        "family": ["a"] * 3 + ["a"] * 3, "language": ["zh"] * 3 + ["es"] * 3, "layer": [0, 1, 2] * 2,
        "delta_rfc_en": [-0.1] * 6, "delta_rfc_language": [0.0, -0.4, -0.1, -0.1, -0.1, -0.05],
        "contrast": [0.1, -0.3, 0.0, 0.0, 0.0, 0.05], "contrast_lo": [0.05, -0.5, -0.1, -0.1, -0.1, -0.02],
        "contrast_hi": [0.2, -0.1, 0.1, 0.1, 0.1, 0.1], "q_value": [0.01, 0.02, 0.9, 1.0, 1.0, 0.4],
        "significant": [True, True, False, False, False, False]})
    out = selections.language_contrast_peaks(contrasts, 4)
    assert list(out.columns) == selections.PEAK_COLUMNS
    assert out[["family", "language", "layer", "n_layers_significant", "n_layers"]].values.tolist() == [
        ["a", "zh", 1, 2, 3], ["a", "es", 2, 0, 3]]
    assert out.loc[0, "contrast_lo"] == -0.5 and out.loc[1, "q_value"] == 0.4
    assert selections.language_contrast_peaks(contrasts.iloc[:0], 4).empty


def test_language_token_counts_are_one_row_per_tokenizer_and_language_in_category_order():
    lengths = pd.DataFrame({"family": ["a"] * 4, "language": ["en", "en", "zh", "zh"],
                            "category": ["neutral", "self_referent"] * 2, "mean": [9.0, 8.0, 5.0, 4.5]})
    out = selections.language_token_counts(lengths)
    assert list(out.columns) == ["family", "language", "self_referent", "neutral"]
    assert out.values.tolist() == [["a", "en", 8.0, 9.0], ["a", "zh", 4.5, 5.0]]


def test_language_length_text_names_the_tokenizers_by_direction():
    from analysis.report.document import language_length_text
    counts = pd.DataFrame({"family": ["a", "a", "a", "b", "b", "b"], "language": ["en", "zh", "es"] * 2,
                           "self_referent": [8.0, 6.0, 11.0, 8.0, 9.0, 11.0], "neutral": [8.0, 6.0, 11.0, 8.0, 9.0, 11.0]})
    assert language_length_text(counts) == (
        "zh prompts are longer than the English ones with the tokenizer of b, and shorter than the English ones "
        "with the tokenizer of a; es prompts are longer than the English ones with every tokenizer of this build")
    assert language_length_text(counts[counts["language"] == "en"]) == "this build has English prompts only"


def test_markdown_table_sizes_columns_by_their_longest_word():
    """A column's share of the width is its longest unbreakable word plus the cell padding: a phrase may
    wrap, a number may not, so the numbers of a wide table never overprint their neighbours."""
    from analysis.report.document import TABLE_CELL_PADDING, markdown_table
    frame = pd.DataFrame({"family": ["demo_llama"], "contrast [CI]": ["-0.0424 [-0.0492, -0.0356]"]})
    rule = str(markdown_table(frame)).splitlines()[1]
    assert rule == "|" + "-" * (10 + TABLE_CELL_PADDING) + "|" + "-" * (len("[-0.0492,") + TABLE_CELL_PADDING) + "|"
