"""Prompt language as a factor (issue 11): per-language validation of the prompt set, the demo tokenizer's self
markers in every language, and the language contrast's known answers on the demo families."""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.core import config
from analysis.models import synthetic
from analysis.core.errors import UserError
from analysis.extraction.runner import extract_checkpoint
from analysis.statistics.languages import language_change, language_contrasts
from analysis.core.prompts import load_prompts
from analysis.core.quantities import CATEGORIES, LANGUAGES, NEUTRAL, SELF, choice_rows, rfc
from conftest import REPO_CONFIG, write_prompts_csv

REPO = Path(__file__).resolve().parent.parent
HEADER = ("prompt_id", "category", "text", "marker", "language", "source_id")


def _rows(n: int = 3) -> list[list[str]]:
    rows = []
    for language in LANGUAGES:
        for c in CATEGORIES:
            for i in range(n):
                source = f"{c[:4]}_{i}"
                marker = "" if c == NEUTRAL else "whose"  # every category but neutral names its person word
                rows.append([source if language == "en" else f"{source}_{language}", c,
                             f"{language} question {i} about {c}, {marker} is it?", marker, language,
                             "" if language == "en" else source])
    return rows


def _write(path: Path, rows) -> Path:
    return write_prompts_csv(path, rows, HEADER)


def test_the_projects_prompts_are_matched_in_every_language():
    frame = load_prompts(REPO / "data" / "prompts.csv", min_per_category=40)
    counts = frame.groupby(["language", "category"]).size()
    assert set(frame["language"]) == set(LANGUAGES) and counts.min() >= 40
    english = frame[frame["language"] == "en"].set_index("prompt_id")
    for language in ("zh", "es"):
        part = frame[frame["language"] == language]
        assert sorted(part["source_id"]) == sorted(english.index)
        assert (english.loc[part["source_id"], "category"].to_numpy() == part["category"].to_numpy()).all()
    persons = frame[frame["category"] != NEUTRAL]
    assert (persons["marker"] != "").all() and all(m in t for m, t in zip(persons["marker"], persons["text"]))
    assert (frame.loc[frame["category"] == NEUTRAL, "marker"] == "").all()


def test_languages_select_prompts_and_english_ids_are_their_own_source():
    frame = load_prompts(REPO / "data" / "prompts.csv", 40, languages=("en", "es"))
    assert set(frame["language"]) == {"en", "es"}
    english = frame[frame["language"] == "en"]
    assert (english["source_id"] == english["prompt_id"]).all()


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r[15].__setitem__(5, ""), "translation without its source"),
    (lambda r: r[15].__setitem__(5, "nope_9"), "source_id 'nope_9' is not the prompt_id of an English prompt"),
    (lambda r: [r.remove(x) for x in [x for x in r if x[4] == "zh" and x[1] == "neutral"]],
     "language zh, category neutral: 0 prompts"),
    (lambda r: r[14].__setitem__(2, r[13][2].upper()), "duplicate text .* within language zh"),
    (lambda r: r[13].__setitem__(4, "fr"), "unknown language 'fr'"),
    (lambda r: r[13].__setitem__(3, "usted"), "marker 'usted' does not occur in the text"),
    (lambda r: r[14].__setitem__(5, r[13][5]), "already translated into zh"),
])
def test_each_language_problem_is_named(tmp_path, mutate, message):
    rows = _rows()
    mutate(rows)
    with pytest.raises(UserError, match=message):
        load_prompts(_write(tmp_path / "p.csv", rows), min_per_category=3)


def test_the_same_text_in_two_languages_is_no_duplicate(tmp_path):
    rows = _rows()
    rows[12][2] = rows[0][2]  # a zh row with an English row's text
    assert len(load_prompts(_write(tmp_path / "p.csv", rows), min_per_category=3)) == len(rows)


def test_a_language_the_file_lacks_is_refused(tmp_path):
    rows = [r for r in _rows() if r[4] != "es"]
    with pytest.raises(UserError, match="prompts.languages asks for es"):
        load_prompts(_write(tmp_path / "p.csv", rows), 3, languages=("en", "es"))


@pytest.mark.parametrize("value,message", [(["zh"], "include en"), (["en", "en"], "each language once"),
                                           (["en", "fr"], r"prompts.languages\[1\]: 'fr' is not allowed"),
                                           ([], "non-empty list")])
def test_bad_languages_setting_is_refused(value, message):
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["prompts"]["languages"] = value
    with pytest.raises(UserError, match=message):
        config._prompt_settings(params)


def test_demo_tokenizer_marks_self_words_of_every_language_and_nothing_else(prompts):
    every = load_prompts(REPO / "data" / "prompts.csv", 40)
    tok = synthetic.build_tokenizer(list(every["text"]))
    ids = {x: set(synthetic.self_token_ids(tok, x)) for x in LANGUAGES}
    for (language, category), part in every.groupby(["language", "category"]):
        hits = [sum(t in ids[x] for t in tok(text)["input_ids"] for x in LANGUAGES) for text in part["text"]]
        if category == SELF:
            assert min(hits) >= 1, (language, category)
        else:
            assert max(hits) == 0, (language, category)


def test_contrast_statistic_by_hand():
    """ΔRFC of the translation minus ΔRFC of English from category means [k, variant, layer]."""
    en = {SELF: np.array([[[1.0], [0.9]]]), NEUTRAL: np.array([[[2.0], [2.0]]])}
    zh = {SELF: np.array([[[0.5], [0.5]]]), NEUTRAL: np.array([[[1.0], [1.0]]])}
    expected = 0.0 - ((1 - 0.9 / 2.0) - (1 - 1.0 / 2.0))
    assert language_change(en, zh)[0, 0, 0] == pytest.approx(expected)
    assert rfc(0.9, 2.0) - rfc(1.0, 2.0) == pytest.approx(0.05)


STATS = dataclasses.replace(REPO_CONFIG.stats, n_resamples=500, n_permutations=500, definitions=("raw",),
                            headline_definition="raw")
SUITE = {c.name: c for c in REPO_CONFIG.suites["demo"]}


def _heard(family: str) -> list[str]:
    return SUITE[f"{family}-base"].demo.get("self_languages", list(LANGUAGES))


@pytest.fixture(scope="module")
def contrasts(demo_dir):
    every = load_prompts(REPO / "data" / "prompts.csv", 40)
    extract = dataclasses.replace(REPO_CONFIG.extract, device="cpu")
    frames = [extract_checkpoint(demo_dir(f, v), every, checkpoint=f"{f}-{v}", family=f, variant=v, settings=extract)
              for f in ("demo_llama", "demo_mistral", "demo_null") for v in ("base", "instruct")]
    return choice_rows(language_contrasts(pd.concat(frames, ignore_index=True), STATS).assign(format="raw"),
                       "raw", "raw", None)


def test_the_demo_suite_plants_a_language_specific_family():
    assert sorted(_heard("demo_mistral")) == ["en"] and sorted(_heard("demo_llama")) == sorted(LANGUAGES)


def test_english_only_heads_give_a_significant_contrast_at_the_planted_layers(contrasts):
    """demo_mistral's planted heads hear English markers only: ΔRFC_zh − ΔRFC_en and es − en are > 0 (less
    compression outside English) with the whole interval above 0 and q < alpha at every planted layer; the
    layers before the first planted one do not differ."""
    rows = contrasts[contrasts["family"] == "demo_mistral"]
    planted = {layer for layer, _ in SUITE["demo_mistral-base"].demo["planted"]}
    for language in ("zh", "es"):
        part = rows[rows["language"] == language].set_index("layer")
        for layer in planted:
            assert part.loc[layer, "contrast"] > 0 and part.loc[layer, "contrast_lo"] > 0
            assert part.loc[layer, "q_value"] < STATS.alpha
        before = part[part.index < min(planted)]
        assert (before["contrast"] == 0).all() and (before["q_value"] >= STATS.alpha).all()


def test_heads_hearing_every_language_compress_in_every_language_and_the_null_never_differs(contrasts):
    """demo_llama compresses at its planted layers in every language (its contrast measures only how much);
    the null family's contrast is exactly 0 everywhere."""
    rows = contrasts[contrasts["family"] == "demo_llama"]
    planted = {layer for layer, _ in SUITE["demo_llama-base"].demo["planted"]}
    for _, row in rows[rows["layer"].isin(planted)].iterrows():
        assert row["delta_rfc_en"] < 0 and row["delta_rfc_language"] < 0
    null = contrasts[contrasts["family"] == "demo_null"]
    assert len(null) and (null["contrast"] == 0).all() and (null["q_value"] >= STATS.alpha).all()


def test_token_lengths_by_language_depend_on_the_tokenizer(real_tokenizer):
    """docs/method.md, "Languages": with real tokenizers the project's Spanish prompts are the longest in tokens,
    and whether Chinese is shorter than English depends on the tokenizer (shorter with Qwen's, longer with
    Llama's); the report therefore reads the order from the data, never assumes it."""
    from transformers import PreTrainedTokenizerFast

    prompts = load_prompts(REPO / "data" / "prompts.csv", min_per_category=40, languages=LANGUAGES)

    def mean_tokens(key: str) -> dict[str, float]:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(real_tokenizer(key) / "tokenizer.json"))
        return {language: float(np.mean([len(tok(t, add_special_tokens=False)["input_ids"]) for t in rows["text"]]))
                for language, rows in prompts.groupby("language")}

    lengths = {key: mean_tokens(key) for key in ("llama3_1", "qwen3", "llama2")}
    for counts in lengths.values():
        assert counts["es"] > max(counts["en"], counts["zh"])
    assert lengths["qwen3"]["zh"] < lengths["qwen3"]["en"]
    assert lengths["llama3_1"]["zh"] > lengths["llama3_1"]["en"] and lengths["llama2"]["zh"] > lengths["llama2"]["en"]
