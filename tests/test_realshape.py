"""The pipeline on real-shaped checkpoints: each suite family's published configuration (scaled down,
random weights), its real or stand-in tokenizer and its instruct chat template, through `selfref pull`
(a `local:` source) and `selfref extract` in both formats, checked against transformers' eager attention."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from analysis.core import config
import realshape
from analysis.cli import app
from analysis.models.checkpoints import local_dir
from analysis.core.errors import UserError
from analysis.core.layout import project_paths
from analysis.extraction.runner import encode, load_bridge
from reference_entropy import eager_entropies

pytestmark = pytest.mark.slow  # builds real-shaped checkpoints with real tokenizers (make test-fast leaves it out)

# What the real checkpoints put first in a raw prompt (None: no BOS, the prompt's own first token).
FIRST_RAW = {"llama31_8b": "<|begin_of_text|>", "llama32_1b": "<|begin_of_text|>", "mistral_7b": "<s>",
             "qwen25_7b": None, "qwen25_05b": None, "smollm2_135m": None}
# ... and first in the chat format (the template's opening).
FIRST_CHAT = {"llama31_8b": "<|begin_of_text|>", "llama32_1b": "<|begin_of_text|>", "mistral_7b": "<s>",
              "qwen25_7b": "<|im_start|>", "qwen25_05b": "<|im_start|>", "smollm2_135m": "<|im_start|>"}
PER_CATEGORY = 3
DATE = "26 Jul 2024"


def reference(local, encoded) -> dict[str, np.ndarray]:
    """The independent computation on encoded prompts (their own query masks)."""
    return eager_entropies(local, [(e.input_ids, e.query_mask) for e in encoded])


@pytest.fixture
def realshape_project(project, prompts, realshape_dir):
    """A project whose active suite is one real-shaped family as `local:` checkpoints, with a few prompts."""

    def make(family: str):
        subset = prompts.groupby("category", sort=False).head(PER_CATEGORY)
        subset.to_csv(project / "data" / "prompts.csv", index=False)
        text = (project / "params.yaml").read_text(encoding="utf-8")
        text = text.replace("min_per_category: 40", f"min_per_category: {PER_CATEGORY}")
        text = text.replace("device: auto", "device: cpu")
        suite = (f"  realshape:\n    families:\n      {family}:\n"
                 f"        base: {{local: {realshape_dir(family, 'base')}}}\n"
                 f"        instruct: {{local: {realshape_dir(family, 'instruct')}}}\n")
        text = text.replace("suites:\n", "suites:\n" + suite, 1)
        (project / "params.yaml").write_text(text, encoding="utf-8")
        config.use_suite("realshape")
        return subset.reset_index(drop=True)

    return make


def _cli(*args):
    result = CliRunner().invoke(app, list(args))
    if result.exception:
        raise result.exception
    return result


@pytest.mark.parametrize("family", list(realshape.FAMILIES))
def test_pull_and_extract_match_eager_attention(realshape_project, realshape_dir, family):
    prompts = realshape_project(family)
    spec = realshape.FAMILIES[family]
    instruct_tok = AutoTokenizer.from_pretrained(realshape_dir(family, "instruct"))
    for variant in ("base", "instruct"):
        _cli("pull", f"{family}-{variant}")
    for variant in ("base", "instruct"):
        name = f"{family}-{variant}"
        manifest = json.loads(project_paths().manifest(name).read_text())
        assert manifest["source"] == "local" and manifest["revision"].startswith("local-")
        assert (manifest["n_heads"], manifest["n_kv_heads"]) == (spec["heads"], spec["kv_heads"])
        local = realshape_dir(family, variant)
        config = json.loads((local / "config.json").read_text())
        for key, value in spec["config"].items():  # the family's real settings reached the checkpoint
            if key not in ("rope_theta", "rope_scaling", "vocab_size"):
                assert config[key] == value, key
        tok = AutoTokenizer.from_pretrained(local)
        for fmt in ("raw", "chat"):
            _cli("extract", name, "--format", fmt)
            table = pd.read_parquet(project_paths().entropy_table(name, fmt))
            encoded = [encode(tok, t, fmt, instruct_tok if fmt == "chat" else None, "default", DATE)
                       for t in prompts["text"]]
            per_prompt = table.drop_duplicates("prompt_id").set_index("prompt_id").loc[prompts["prompt_id"]]
            assert list(per_prompt["n_tokens"]) == [len(e.input_ids) for e in encoded]
            expected_first = (FIRST_RAW if fmt == "raw" else FIRST_CHAT)[family]
            for e, first in zip(encoded, per_prompt["first_token"]):
                assert first == tok.convert_ids_to_tokens(e.input_ids[0])
                if expected_first is None:
                    assert first not in tok.all_special_tokens, first
                else:
                    assert first == expected_first
                    if first == tok.bos_token:  # never doubled (in chat, ChatML's <|im_start|> opens every turn)
                        assert e.input_ids[1] != tok.bos_token_id
                        assert fmt == "chat" or e.input_ids.count(tok.bos_token_id) == 1
            for text, e in zip(prompts["text"], encoded):
                counted = [i for i, m in zip(e.input_ids, e.query_mask) if m]
                if fmt == "chat":  # exactly the user's text; raw counts every position
                    assert tok.decode(counted).strip() == text
                else:
                    assert counted == e.input_ids
            assert (table["chat_system"].isna() if fmt == "raw" else table["chat_system"] == "default").all()
            ref = reference(local, encoded)
            ordered = table.set_index(["prompt_id", "layer", "head"]).sort_index()
            n_layers, n_heads = ref["raw"].shape[1:]
            for d, column in (("raw", "entropy"), ("no_bos", "entropy_no_bos"),
                              ("normalised", "entropy_normalised")):
                for i, pid in enumerate(prompts["prompt_id"]):
                    got = ordered.loc[pid, column].to_numpy().reshape(n_layers, n_heads)
                    np.testing.assert_allclose(got, ref[d][i], atol=1e-5, rtol=0, err_msg=f"{name} {fmt} {d}")


def test_a_sliding_window_shorter_than_the_prompt_matches_eager(realshape_dir, real_tokenizer, tmp_path, prompts):
    """Mistral's sliding window, shrunk below the prompt length so it changes the patterns."""
    spec = realshape.FAMILIES["mistral_7b"]
    local = tmp_path / "mistral-window"
    realshape.build("mistral_7b", "base", real_tokenizer(spec["tokenizer"]), local, overrides={"sliding_window": 4})
    tok = AutoTokenizer.from_pretrained(local)
    encoded = [encode(tok, t, "raw") for t in prompts["text"].head(4)]
    assert all(len(e.input_ids) > 4 for e in encoded)
    from analysis.extraction.runner import EntropyRunner, pad_id

    bridge = load_bridge(local, "cpu", torch.float32)
    got = EntropyRunner(bridge, 2, spec["heads"], pad_id(tok), "cpu").run(encoded, 4)
    ref = reference(local, encoded)
    np.testing.assert_allclose(got["raw"], ref["raw"], atol=1e-5, rtol=0)


def test_local_checkpoint_changed_after_pull_is_refused(realshape_project, realshape_dir):
    realshape_project("qwen25_05b")
    _cli("pull", "qwen25_05b-base")
    paths = project_paths()
    manifest = json.loads(paths.manifest("qwen25_05b-base").read_text())
    assert local_dir(manifest, None, [], paths) == realshape_dir("qwen25_05b", "base")
    manifest["files"][0]["sha256"] = "0" * 64
    with pytest.raises(UserError, match=r"does not match data/models/qwen25_05b/qwen25_05b-base.json .*restore the folder, "
                                        r"or run `selfref pull qwen25_05b-base`"):
        local_dir(manifest, None, [], paths)


def test_an_architecture_the_bridge_cannot_load_is_named(realshape_dir, monkeypatch):
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory

    def unsupported(cfg):
        raise ValueError(f"Unsupported architecture: {cfg.architecture}")

    monkeypatch.setattr(ArchitectureAdapterFactory, "select_architecture_adapter", classmethod(
        lambda cls, cfg: unsupported(cfg)))
    with pytest.raises(UserError, match="cannot load architecture Qwen2ForCausalLM"):
        load_bridge(realshape_dir("qwen25_05b", "base"), "cpu", torch.float32)
