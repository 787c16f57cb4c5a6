"""Families as ordered training stages: the data model, the stage statistics against hand-made cases, the
known answer planted in the demo's four-stage family, and TransformerBridge on the OLMo 2 architecture."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.core import config
from analysis.models import synthetic
from analysis.core.errors import UserError
from analysis.extraction.runner import extract_checkpoint
from analysis.core.layout import project_paths
from analysis.core.quantities import NO_CHANGE
from analysis.statistics.training_stages import check_tokenisation, stage_statistics
from analysis.statistics.study import build_study
from conftest import REPO, REPO_CONFIG
from entropy_tables import entropy_table, prompt_frame

STATS = dataclasses.replace(REPO_CONFIG.stats, n_resamples=400, n_permutations=400, split_half_splits=50,
                            definitions=("raw",), headline_definition="raw")
EXTRACT = dataclasses.replace(REPO_CONFIG.extract, device="cpu")
STAGED = "demo_stages"


def _params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


# --- data model -------------------------------------------------------------------------------------

def test_stages_are_the_order_of_the_family_mapping_and_two_stage_families_keep_their_names():
    stages = REPO_CONFIG.stages
    assert stages[STAGED] == ("base", "sft", "dpo", "instruct")
    for family, order in stages.items():
        assert (order[0] == "base" and order[-1] == "instruct") or (len(order) == 1 and order[0] in ("base", "instruct"))
    assert stages["demo_llama"] == ("base", "instruct")
    assert [c.name for c in REPO_CONFIG.checkpoints if c.family == "demo_llama"] == ["demo_llama-base",
                                                                                       "demo_llama-instruct"]
    assert REPO_CONFIG.checkpoint("demo_stages-dpo").variant == "dpo"
    assert config.checkpoint_entries(REPO_CONFIG.checkpoints)["demo_stages-sft"] == {
        "family": STAGED, "variant": "sft"}


@pytest.mark.parametrize("stages, message", [
    (["sft", "base", "instruct"], "base first and instruct last"),
    (["base", "instruct", "dpo"], "base first and instruct last"),
    (["base", "SFT", "instruct"], "stage name 'SFT'"),
    (["base", "sft"], "missing instruct"),
])
def test_a_bad_stage_list_is_refused_naming_the_family(stages, message):
    params = _params()
    spec = params["suites"]["demo"]["families"]["demo_llama"]["base"]
    params["suites"]["demo"]["families"]["demo_llama"] = {s: copy.deepcopy(spec) for s in stages}
    with pytest.raises(UserError, match=message) as err:
        config.parse(params, project_paths(REPO), check_active=False)
    assert "demo_llama" in str(err.value)


def test_suite_use_stages_works_offline(project):
    checkpoints = config.use_suite("stages", project_paths(project))
    names = [c.name for c in checkpoints]
    assert names[:4] == ["olmo2_1b-base", "olmo2_1b-sft", "olmo2_1b-dpo", "olmo2_1b-instruct"]
    loaded = config.load(project_paths(project))
    assert loaded.suite == "stages" and loaded.stages["olmo2_7b"] == ("base", "sft", "dpo", "instruct")
    assert loaded.checkpoint("olmo2_7b-dpo").repo == "allenai/OLMo-2-1124-7B-DPO"


# --- statistics on hand-made entropies --------------------------------------------------------------

def _table(order, n_per_category=8, n_layers=3, n_heads=2, seed=0, shift=None) -> pd.DataFrame:
    """Random entropies of one family with the given stages; `shift[stage]` is added to self-referent rows."""
    rng = np.random.default_rng(seed)
    cats = ["self_referent", "neutral", "third_person", "confounder"]
    prompts = prompt_frame(np.repeat(cats, n_per_category), [f"p{p:02d}" for p in range(4 * n_per_category)])
    self_rows = (prompts["category"] == "self_referent").to_numpy()[:, None, None]
    base = rng.uniform(1.0, 2.0, size=(4 * n_per_category, n_layers, n_heads))
    frames = []
    for s_i, stage in enumerate(order):
        values = base + rng.normal(0, 0.05, size=base.shape) * (s_i > 0) + self_rows * (shift or {}).get(stage, 0.0)
        frames.append(entropy_table(values, prompts, family="fam", variant=stage,
                                    n_tokens=5 + np.arange(len(prompts)) % 3))
    return pd.concat(frames, ignore_index=True)


def test_steps_add_up_to_the_total_and_vs_base_of_instruct_is_the_deltas_table():
    order = ("base", "sft", "dpo", "instruct")
    table = _table(order, shift={"sft": 0.1, "dpo": 0.3, "instruct": 0.3})
    study = build_study({"raw": table, "chat": table}, STATS, {"fam": order})
    deltas = study["deltas"].query("format == 'raw'").sort_values("layer")
    sd = study["stage_deltas"].query("format == 'raw'")
    steps = sd[sd["contrast"] == "step"]
    total = steps.groupby("layer")["delta_rfc"].sum().sort_index().to_numpy()
    np.testing.assert_allclose(total, deltas["delta_rfc"].to_numpy(), atol=1e-12)
    vs_base = sd[(sd["contrast"] == "vs_base") & (sd["to_stage"] == "instruct")].sort_values("layer")
    for column in ("delta_rfc", "delta_rfc_lo", "delta_rfc_hi", "p_value", "q_value", "layer_class"):
        assert list(vs_base[column]) == list(deltas[column]), column
    first = sd[(sd["contrast"] == "step") & (sd["step"] == 1)].reset_index(drop=True)
    first_vs_base = sd[(sd["contrast"] == "vs_base") & (sd["step"] == 1)].reset_index(drop=True)
    pd.testing.assert_frame_equal(first.drop(columns="contrast"), first_vs_base.drop(columns="contrast"))
    shares = study["stage_shares"].query("format == 'raw'")
    assert shares["share_delta_rfc"].sum() == pytest.approx(1.0)
    # hand computation of one share: mean over layers of the step's ΔRFC over the total's
    dpo = steps[steps["to_stage"] == "dpo"]["delta_rfc"].mean()
    assert shares.set_index("to_stage").at["dpo", "share_delta_rfc"] == pytest.approx(dpo / total.mean())
    assert (shares["share_delta_rfc_lo"] <= shares["share_delta_rfc"]).all()
    assert (shares["share_delta_rfc"] <= shares["share_delta_rfc_hi"]).all()
    assert set(study["metrics"]["stages"]["fam"]) == {"sft", "dpo", "instruct", "largest_step", "head_steps"}


def test_a_staged_family_leaves_the_two_stage_families_numbers_alone():
    two = _table(("base", "instruct"), seed=3).assign(family="pair")
    staged = _table(("base", "sft", "instruct"), seed=4, shift={"sft": 0.2, "instruct": 0.2})
    alone = build_study({"raw": two, "chat": two}, STATS)
    both = pd.concat([two, staged], ignore_index=True)
    together = build_study({"raw": both, "chat": both}, STATS, {"pair": ("base", "instruct"),
                                                                 "fam": ("base", "sft", "instruct")})
    for key in ("layers", "deltas", "heads"):
        pd.testing.assert_frame_equal(alone[key].reset_index(drop=True),
                                      together[key].query("family == 'pair'").reset_index(drop=True))
    assert alone["metrics"]["families"]["pair"] == together["metrics"]["families"]["pair"]
    assert "stages" not in alone["metrics"] and alone["stage_deltas"].empty
    assert set(together["stage_deltas"]["family"]) == {"fam"}


def test_stages_that_tokenise_a_prompt_differently_are_refused():
    order = ("base", "sft", "instruct")
    table = _table(order)
    check_tokenisation(table, {"fam": order}, "raw")
    bad = table.copy()
    bad.loc[(bad["variant"] == "sft") & (bad["prompt_id"] == "p03"), "input_ids_sha1"] = "other"
    with pytest.raises(UserError, match="fam: prompt p03 .*tokenises differently"):
        check_tokenisation(bad, {"fam": order}, "raw")
    with pytest.raises(UserError, match="input_ids_sha1"):
        check_tokenisation(table.drop(columns="input_ids_sha1"), {"fam": order}, "raw")


# --- the planted answer of the demo's staged family ------------------------------------------------

@pytest.fixture(scope="module")
def staged_study(demo_dir, prompts):
    order = REPO_CONFIG.stages[STAGED]
    frames = [extract_checkpoint(demo_dir(STAGED, s), prompts, checkpoint=f"{STAGED}-{s}", family=STAGED, variant=s,
                                 settings=EXTRACT, prompt_format="raw") for s in order]
    table = pd.concat(frames, ignore_index=True)
    return build_study({"raw": table, "chat": table}, STATS, {STAGED: order})


def _planted_split() -> dict[str, float]:
    """Share of the planted heads that lose their focus at each step, from the params.yaml specs."""
    order = REPO_CONFIG.stages[STAGED]
    focus = [len(REPO_CONFIG.checkpoint(f"{STAGED}-{s}").demo["self_focus"]) for s in order]
    return {order[i]: (focus[i - 1] - focus[i]) / focus[0] for i in range(1, len(order))}


def test_step_shares_recover_the_planted_split(staged_study):
    split = _planted_split()
    assert split == pytest.approx({"sft": 1 / 3, "dpo": 2 / 3, "instruct": 0.0})
    shares = staged_study["stage_shares"].query("format == 'raw'").set_index("to_stage")
    # The share of Δ(H_self − H_neutral) is linear in the clones' entropies: exact. The share of ΔRFC is exact
    # only to first order: when a planted head loses its focus its neutral entropy moves too (the residual
    # stream at its layer carries a trace of the marker dimensions), and RFC divides by H_neutral; measured
    # 1.5e-4 off 1/3 at the demo's focus logit.
    for stage, share in split.items():
        assert shares.at[stage, "share_delta_rfc"] == pytest.approx(share, abs=5e-4), stage
        assert shares.at[stage, "share_delta_diff"] == pytest.approx(share, abs=1e-5), stage
    assert shares.at["dpo", "largest_step"] and not shares.at["sft", "largest_step"]
    assert shares["total_excludes_zero"].all()
    # the split holds prompt by prompt, so every resample gives it (up to float32 entropies): a tight interval;
    # and the steps' own changes exclude zero where a change was planted
    for stage in ("sft", "dpo"):
        lo, hi = shares.at[stage, "share_delta_rfc_lo"], shares.at[stage, "share_delta_rfc_hi"]
        assert split[stage] - 1e-3 < lo <= hi < split[stage] + 1e-3
        assert shares.at[stage, "mean_delta_rfc_hi"] < 0


def test_steps_without_a_planted_change_show_none(staged_study):
    sd = staged_study["stage_deltas"].query("format == 'raw'")
    steps = sd[sd["contrast"] == "step"]
    planted_layers = {l for l, _ in REPO_CONFIG.checkpoint(f"{STAGED}-base").demo["planted"]}
    last = steps[steps["to_stage"] == "instruct"]
    assert (last["delta_rfc"] == 0).all() and last["p_value"].isna().all()  # no change: no p, with the reason
    assert (last["p_reason"] == NO_CHANGE).all()
    assert (last["layer_class"] == "no_change").all()
    quiet = steps[~steps["layer"].isin(planted_layers)]
    assert (quiet["delta_rfc"] == 0).all() and (quiet["layer_class"] == "no_change").all()
    changed = steps[steps["layer"].isin(planted_layers) & steps["to_stage"].isin(["sft", "dpo"])]
    assert (changed["layer_class"] == "compression").all()
    shares = staged_study["stage_shares"].query("format == 'raw'").set_index("to_stage")
    assert shares.at["instruct", "share_delta_rfc_lo"] == shares.at["instruct", "share_delta_rfc_hi"] == 0
    # a step that changed nothing has share exactly 0 (never -0.0) of either quantity
    for q in ("delta_rfc", "delta_diff"):
        share = shares.at["instruct", f"share_{q}"]
        assert share == 0 and not np.signbit(share) and shares.at["instruct", f"share_{q}_reason"] is None


def test_each_planted_head_changes_most_at_its_planted_step(staged_study):
    heads = staged_study["stage_heads"].query("format == 'raw'")
    order = REPO_CONFIG.stages[STAGED]
    focus = {s: {tuple(x) for x in REPO_CONFIG.checkpoint(f"{STAGED}-{s}").demo["self_focus"]} for s in order}
    expected = {head: next(order[i] for i in range(1, len(order)) if head in focus[order[i - 1]] - focus[order[i]])
                for head in focus["base"]}
    largest = heads[heads["largest_step"]].set_index(["layer", "head"])["to_stage"]
    for head, stage in expected.items():
        assert largest[head] == stage, head
        row = heads[(heads["layer"] == head[0]) & (heads["head"] == head[1]) & (heads["to_stage"] == stage)]
        assert row["share_did"].iloc[0] == pytest.approx(1.0, abs=1e-6)
        assert row["q_value"].iloc[0] < STATS.alpha
    assert set(heads.loc[heads["candidate"], ["layer", "head"]].itertuples(index=False, name=None)) >= set(expected)
    unplanted = heads[~heads[["layer", "head"]].apply(tuple, axis=1).isin(expected)]
    assert (unplanted["did"] == 0).all()
    assert staged_study["metrics"]["stages"][STAGED]["head_steps"] == {f"L{l}H{h}": s for (l, h), s in
                                                                       sorted(expected.items())}


# --- OLMo 2 --------------------------------------------------------------------------------------------

def test_transformer_bridge_runs_the_olmo2_architecture(tmp_path, prompt_subset):
    """A tiny random Olmo2 checkpoint: TransformerBridge loads it and its entropies match the eager
    attention weights of transformers' own Olmo2 implementation."""
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    tokenizer = synthetic.build_tokenizer(list(prompt_subset["text"]))
    cfg = Olmo2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Olmo2ForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    frame = extract_checkpoint(tmp_path, prompt_subset.head(3), checkpoint="olmo2-tiny", family="olmo2",
                               variant="base", settings=EXTRACT, prompt_format="raw")
    assert set(frame["layer"]) == {0, 1} and set(frame["head"]) == {0, 1, 2, 3}
    eager = Olmo2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    text = prompt_subset["text"].iloc[0]
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        attentions = eager(ids, output_attentions=True).attentions
    for layer, pattern in enumerate(attentions):
        p = pattern[0].double()
        expected = (-(p * torch.log(p.clamp_min(1e-30))).sum(-1)).mean(-1).numpy()  # [heads]
        got = frame[(frame["prompt_id"] == prompt_subset["prompt_id"].iloc[0]) & (frame["layer"] == layer)]
        np.testing.assert_allclose(got.sort_values("head")["entropy"].to_numpy(), expected, atol=1e-4)
