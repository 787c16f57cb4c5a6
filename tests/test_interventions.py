"""Where heads look (marker and first-token masses) and the interventions of the patching stage, each against
a hand-computed case or the library it stands beside."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from transformers import AutoTokenizer

from analysis.extraction.attention_mass import pattern_masses
from analysis.core.errors import UserError
from analysis.extraction.runner import EncodedPrompt, encode, encode_prompts
from analysis.interventions.patching import (
    NO_EFFECT,
    NO_LATER_LAYER,
    TOO_FEW_CONTROLS,
    check_identical_ids,
    control_test,
    kl_divergence,
    later_entropy,
    neutral_mean,
    select_controls,
)
from analysis.core.prompts import load_prompts, marker_spans


def test_masses_by_hand():
    # one prompt, one head, 3 tokens; the marker is token 1
    pattern = torch.tensor([[[[1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [0.2, 0.5, 0.3]]]])
    query = torch.ones((1, 3), dtype=torch.bool)
    masses = pattern_masses(pattern, query, torch.tensor([[False, True, False]]))
    assert masses["first"].item() == pytest.approx((1.0 + 0.3 + 0.2) / 3)
    assert masses["marker"].item() == pytest.approx((0.7 + 0.5) / 2)  # only queries that can see the marker
    none = pattern_masses(pattern, query, torch.zeros((1, 3), dtype=torch.bool))
    assert torch.isnan(none["marker"]).all() and none["first"].item() == pytest.approx(0.5)


def test_marker_spans_are_whole_words():
    assert marker_spans("Did you choose your own name?", "your") == [(15, 19)]
    assert marker_spans("Would you describe yourself?", "you") == [(6, 9)]  # not inside "yourself"
    assert marker_spans("What is your name?", "you") == []
    assert marker_spans("Es tu gente, te digo", "te") == [(13, 15)]  # not inside "gente"
    assert marker_spans("你叫什么名字？你好", "你") == [(0, 1), (7, 8)]  # Chinese: no spaces, every occurrence


@pytest.mark.parametrize("field,category,message", [
    ("your", "neutral", "neutral prompts have no person marker"),
    ("", "self_referent", "empty marker"),
    ("you", "self_referent", "as a word of its own"),
])
def test_marker_column_is_validated(tmp_path, field, category, message):
    rows = ["prompt_id,category,text,marker"]
    for c in ("self_referent", "neutral", "third_person", "confounder"):
        marker = {"self_referent": "your", "neutral": "", "third_person": "her", "confounder": "my"}[c]
        rows.append(f"{c}_1,{c},Is {marker or 'the'} cat here?,{marker}")
    rows.append(f"bad_1,{category},What is your name?,{field}")
    path = tmp_path / "p.csv"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=message):
        load_prompts(path, min_per_category=1)


def test_marker_tokens_found_through_offsets(demo_dir, prompts):
    from conftest import REPO_CONFIG

    tok = AutoTokenizer.from_pretrained(demo_dir("demo_llama", "base"))
    for fmt in ("raw", "chat"):
        enc = encode(tok, "Did you choose your own name?", fmt, marker="your")
        words = [tok.decode([i]).strip() for i, m in zip(enc.input_ids, enc.marker_mask) if m]
        assert words == ["your"]
    encoded = encode_prompts(tok, prompts, "raw", REPO_CONFIG.extract)
    neutral = prompts["category"].to_numpy() == "neutral"
    assert not any(any(e.marker_mask) for e, n in zip(encoded, neutral) if n)
    assert all(any(e.marker_mask) for e, n in zip(encoded, neutral) if not n)


def test_extraction_masses_nan_for_neutral_only(demo_dir, prompt_subset):
    from analysis.extraction.runner import extract_checkpoint
    from conftest import REPO_CONFIG

    frame = extract_checkpoint(demo_dir("demo_llama", "base"), prompt_subset, checkpoint="demo_llama-base",
                               family="demo_llama", variant="base", settings=REPO_CONFIG.extract)
    neutral = frame["category"] == "neutral"
    assert frame.loc[neutral, "mass_marker"].isna().all()
    assert frame.loc[~neutral, "mass_marker"].between(0, 1).all()
    assert frame["mass_first"].between(0, 1).all()
    # the planted self-focus head (layer 2, head 1) looks at "you"/"your" far more than a neighbour does
    self_rows = frame[frame["category"] == "self_referent"]
    planted = self_rows[(self_rows["layer"] == 2) & (self_rows["head"] == 1)]["mass_marker"].mean()
    other = self_rows[(self_rows["layer"] == 2) & (self_rows["head"] == 5)]["mass_marker"].mean()
    assert planted > 0.5 and planted > 2 * other


def test_kl_matches_scipy():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(7), size=3), rng.dirichlet(np.ones(7), size=3)
    log_p, log_q = torch.log(torch.tensor(p)), torch.log(torch.tensor(q))
    assert kl_divergence(log_p, log_q).numpy() == pytest.approx([stats.entropy(a, b) for a, b in zip(p, q)])
    assert kl_divergence(log_p, log_p).numpy() == pytest.approx(0.0)


def test_neutral_mean_by_hand():
    z = np.zeros((3, 3, 1), dtype=np.float32)
    z[0, :, 0] = [1, 2, 4]    # neutral, 3 tokens
    z[1, :2, 0] = [3, 6]      # neutral, 2 tokens (position 2 is padding)
    z[2, :, 0] = [9, 9, 9]    # not neutral
    out = neutral_mean(z, np.array([3, 2, 3]), np.array([True, True, False]))
    assert out[:, 0, 0] == pytest.approx([2.0] * 3)                    # mean of 1 and 3
    assert out[:, 1:, 0] == pytest.approx(np.full((3, 2), 4.0))        # mean of 2, 4, 6


def test_later_entropy():
    h = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2)
    assert later_entropy(h, 0) == pytest.approx([h[0, 1:].mean(), h[1, 1:].mean()])
    assert np.isnan(later_entropy(h, 2)).all()


def _heads(n_layers=3, n_heads=6):
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    rng = np.random.default_rng(1)
    return pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(), "base_entropy": rng.random(layer.size),
                         "position": rng.permutation(layer.size) + 1})


def test_controls_from_the_candidates_own_layer_seeded_and_never_candidates():
    heads = _heads()
    sel = select_controls(heads, top_k=3, max_controls=2, seed=7, family="f")
    cands = sel[sel["role"] == "candidate"]
    assert len(cands) == 3
    cand_set = set(zip(cands["layer"], cands["head"]))
    for c in cands.itertuples():
        mine = sel[(sel["role"] == "control") & (sel["candidate"] == c.candidate)]
        others = [(l, h) for l, h in zip(heads["layer"], heads["head"]) if l == c.layer and (l, h) not in cand_set]
        assert len(mine) == min(2, len(others)) and (mine["layer"] == c.layer).all()
        assert not set(zip(mine["layer"], mine["head"])) & cand_set
    assert sel.equals(select_controls(heads, top_k=3, max_controls=2, seed=7, family="f"))
    draws = {tuple(select_controls(heads, top_k=3, max_controls=2, seed=s, family="f")["head"]) for s in range(10)}
    assert len(draws) > 1  # the seed chooses which heads, where the layer has more than max_controls


def test_controls_are_every_other_head_of_the_layer_up_to_the_maximum():
    heads = _heads(n_layers=3, n_heads=2)
    heads["position"] = [1, 2, 3, 4, 5, 6]  # layer 0 is all candidates: no controls (never another layer's heads)
    sel = select_controls(heads, top_k=3, max_controls=19, seed=7, family="f")
    assert sel[(sel["role"] == "control") & (sel["candidate"] == "L0H0")].empty
    mine = sel[(sel["role"] == "control") & (sel["candidate"] == "L1H0")]
    assert list(zip(mine["layer"], mine["head"])) == [(1, 1)]


def test_control_test_by_hand_and_against_scipy():
    # controls 0 and 2: mean 1, sd sqrt(2); effect 4: t = 3 / (sqrt(2) sqrt(1 + 1/2)) = sqrt(3); with 1 degree of
    # freedom P(T > sqrt(3)) = 1/2 - arctan(sqrt(3)) / pi = 1/6
    out = control_test(4.0, np.array([0.0, 2.0]), floor=1e-6)
    assert out["t_stat"] == pytest.approx(np.sqrt(3)) and out["p_value"] == pytest.approx(1 / 6)
    assert out["rank_p"] == pytest.approx(1 / 3) and out["rank_p_min"] == pytest.approx(1 / 3)
    assert out["control_percentile"] == 100 and out["minus_controls"] == pytest.approx(3.0)
    rng = np.random.default_rng(3)
    controls, effect = rng.normal(size=7), 1.3
    ref = stats.ttest_ind([effect], controls, alternative="greater")  # one value against n: the same t
    out = control_test(effect, controls, floor=1e-6)
    assert out["t_stat"] == pytest.approx(ref.statistic) and out["p_value"] == pytest.approx(ref.pvalue)
    assert out["rank_p"] == pytest.approx((1 + np.sum(controls >= effect)) / 8)


def test_control_test_leaves_undefined_undefined():
    assert control_test(5e-7, np.array([0.0, 1.0, 2.0]), floor=1e-6)["test_reason"] == NO_EFFECT
    assert control_test(np.nan, np.array([0.0, 1.0]), floor=1e-6)["test_reason"] == NO_LATER_LAYER
    assert control_test(1.0, np.array([0.0]), floor=1e-6)["test_reason"] == TOO_FEW_CONTROLS
    undefined = control_test(1.0, np.array([0.0]), floor=1e-6)
    assert np.isnan(undefined["p_value"]) and np.isnan(undefined["control_percentile"])
    # controls that all have exactly no effect: their spread is the floor, so a clear effect is significant ...
    clear = control_test(1e-3, np.zeros(3), floor=1e-6)
    assert clear["test_reason"] is None and clear["p_value"] < 1e-6 and clear["rank_p"] == pytest.approx(0.25)
    # ... and a candidate below its controls is not (one-sided)
    assert control_test(0.5, np.array([1.0, 2.0, 3.0]), floor=1e-6)["p_value"] > 0.5


def test_patching_refuses_different_token_ids():
    a = [EncodedPrompt([1, 2, 3], [True] * 3)]
    check_identical_ids(a, [EncodedPrompt([1, 2, 3], [True] * 3)], ["p1"], "fam")
    with pytest.raises(UserError, match="prompt p1 tokenises differently"):
        check_identical_ids(a, [EncodedPrompt([1, 2, 4], [True] * 3)], ["p1"], "fam")


def test_mass_changes_by_hand():
    from analysis.statistics.mass_summary import mass_changes

    rows = []
    for variant, shift in (("base", 0.0), ("instruct", 0.1)):
        for pid, category, first, marker in (("s1", "self_referent", 0.5, 0.2), ("s2", "self_referent", 0.7, 0.4),
                                             ("n1", "neutral", 0.6, np.nan), ("t1", "third_person", 0.1, 0.3),
                                             ("c1", "confounder", 0.2, 0.2)):
            rows.append({"family": "f", "variant": variant, "prompt_id": pid, "category": category, "layer": 0,
                         "head": 0, "mass_first": first + shift, "mass_marker": marker + 2 * shift})
    out = mass_changes(pd.DataFrame(rows), n_resamples=200, confidence=0.95, seed=1).set_index(["category", "mass"])
    assert out.loc[("self_referent", "marker"), "base"] == pytest.approx(0.3)
    assert out.loc[("self_referent", "marker"), "delta"] == pytest.approx(0.2)
    assert out.loc[("self_referent", "first"), "delta"] == pytest.approx(0.1)
    # every prompt moves by the same amount, so every resample does too
    assert out.loc[("self_referent", "marker"), "delta_lo"] == pytest.approx(0.2)
    assert ("neutral", "marker") not in out.index and ("neutral", "first") in out.index
