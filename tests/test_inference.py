"""Extraction through TransformerBridge against an independent computation with Hugging Face eager attention."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from analysis.core.errors import UserError
from reference_entropy import eager_entropies
from analysis.core.config import ExtractSettings
from analysis.extraction.runner import encode, extract_checkpoint, length_sorted_batches

SETTINGS = ExtractSettings(batch_size=7, device="cpu", dtype="auto", trust_remote_code=False, device_map=None,
                           chat_system="default", chat_date=None)
CHECKPOINTS = [("demo_llama", "base"), ("demo_mistral", "base"), ("demo_qwen", "instruct")]


def reference_entropies(local_dir, texts) -> dict[str, np.ndarray]:
    """The independent computation on raw prompts (every position counted)."""
    tok = AutoTokenizer.from_pretrained(local_dir)
    encoded = [tok(text)["input_ids"] for text in texts]
    return eager_entropies(local_dir, [(ids, [True] * len(ids)) for ids in encoded])


@pytest.mark.parametrize("family,variant", CHECKPOINTS)
def test_entropies_match_transformers_eager(demo_dir, prompt_subset, family, variant):
    local = demo_dir(family, variant)
    frame = extract_checkpoint(local, prompt_subset, checkpoint=f"{family}-{variant}", family=family,
                               variant=variant, settings=SETTINGS)
    ref = reference_entropies(local, list(prompt_subset["text"]))
    n_prompts, n_layers, n_heads = ref["raw"].shape
    ordered = frame.set_index(["prompt_id", "layer", "head"]).sort_index()
    for d, column in (("raw", "entropy"), ("no_bos", "entropy_no_bos"), ("normalised", "entropy_normalised")):
        for i, pid in enumerate(prompt_subset["prompt_id"]):
            got = ordered.loc[pid, column].to_numpy().reshape(n_layers, n_heads)
            np.testing.assert_allclose(got, ref[d][i], atol=1e-5, rtol=0)


def test_every_layer_head_prompt_present_and_finite(demo_dir, prompt_subset):
    local = demo_dir("demo_mistral", "base")
    frame = extract_checkpoint(local, prompt_subset, checkpoint="m-base", family="m", variant="base",
                               settings=SETTINGS, expected_shape=(6, 8))
    assert len(frame) == len(prompt_subset) * 6 * 8
    assert not frame.duplicated(["prompt_id", "layer", "head"]).any()
    assert set(frame["head"]) == set(range(8)) and set(frame["layer"]) == set(range(6))
    assert np.isfinite(frame[["entropy", "entropy_no_bos", "entropy_normalised"]]).all().all()
    assert (frame["first_token"] == "<|bos|>").all()


def test_batched_with_padding_equals_one_at_a_time(demo_dir, prompt_subset):
    local = demo_dir("demo_llama", "base")
    kwargs = dict(checkpoint="l-base", family="l", variant="base")
    one = extract_checkpoint(local, prompt_subset, settings=dataclasses.replace(SETTINGS, batch_size=1), **kwargs)
    many = extract_checkpoint(local, prompt_subset, settings=dataclasses.replace(SETTINGS, batch_size=9), **kwargs)
    assert one["n_tokens"].nunique() > 1, "the subset must have prompts of different lengths to test padding"
    pd.testing.assert_frame_equal(one.drop(columns=["entropy", "entropy_no_bos", "entropy_normalised"]),
                                  many.drop(columns=["entropy", "entropy_no_bos", "entropy_normalised"]))
    for column in ("entropy", "entropy_no_bos", "entropy_normalised"):
        np.testing.assert_allclose(one[column], many[column], atol=1e-6)


def test_shape_mismatch_with_manifest_is_an_error(demo_dir, prompt_subset):
    with pytest.raises(UserError, match="manifest says"):
        extract_checkpoint(demo_dir("demo_llama", "base"), prompt_subset, checkpoint="x", family="x",
                           variant="base", settings=SETTINGS, expected_shape=(6, 28))


def test_chat_format_counts_only_the_users_text(demo_dir):
    tok = AutoTokenizer.from_pretrained(demo_dir("demo_llama", "instruct"))
    text = "What is your name?"
    raw = encode(tok, text, "raw")
    chat = encode(tok, text, "chat")
    assert chat.input_ids.count(tok.bos_token_id) == 1 and chat.input_ids[0] == tok.bos_token_id
    counted = [i for i, m in zip(chat.input_ids, chat.query_mask) if m]
    assert tok.decode(counted).strip() == text
    assert sum(chat.query_mask) == len(raw.input_ids) - 1  # the raw prompt's tokens less its BOS
    assert len(chat.input_ids) > len(raw.input_ids)


def test_chat_format_extracts_and_stays_finite(demo_dir, prompt_subset):
    local = demo_dir("demo_qwen", "base")
    frame = extract_checkpoint(local, prompt_subset, checkpoint="q-base", family="q", variant="base",
                               settings=SETTINGS, prompt_format="chat",
                               chat_dir=demo_dir("demo_qwen", "instruct"))
    assert (frame["prompt_format"] == "chat").all()
    assert (frame["n_query"] < frame["n_tokens"]).all()
    assert np.isfinite(frame["entropy"]).all()


def test_double_bos_is_refused(demo_dir):
    tok = AutoTokenizer.from_pretrained(demo_dir("demo_llama", "base"))
    with pytest.raises(UserError, match="BOS token added twice"):
        encode(tok, tok.bos_token + "What is your name?", "raw")


def test_length_sorted_batches_cover_every_prompt_once():
    lengths = [5, 3, 9, 3, 7, 5, 1]
    batches = length_sorted_batches(lengths, 3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)


HOST_OOM = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                        "you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("failure", [MemoryError("simulated"), HOST_OOM, torch.OutOfMemoryError("CUDA out of memory")],
                         ids=["python", "host-allocator", "device"])
def test_out_of_memory_batches_are_split_and_retried(demo_dir, prompt_subset, monkeypatch, caplog, failure):
    """A batch whose allocation fails (Python, torch's CPU allocator, a device) is halved and retried with
    a log line; results are unchanged."""
    from analysis.extraction.runner import EntropyRunner

    folder = demo_dir("demo_llama", "base")
    kwargs = dict(checkpoint="demo_llama-base", family="demo_llama", variant="base",
                  settings=dataclasses.replace(SETTINGS, batch_size=8))
    expected = extract_checkpoint(folder, prompt_subset, **kwargs)
    original = EntropyRunner._forward

    def small_memory(self, prompts, *args, **kwargs):
        if len(prompts) > 3:
            raise failure
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(EntropyRunner, "_forward", small_memory)
    with caplog.at_level("WARNING", logger="analysis.extraction.runner"):
        got = extract_checkpoint(folder, prompt_subset, **kwargs)
    pd.testing.assert_frame_equal(got, expected, check_exact=False, atol=1e-6, rtol=0)
    assert "out of memory on a batch of 8 prompts; retrying as 4 + 4" in caplog.text


def test_out_of_memory_on_one_prompt_is_a_clear_error(demo_dir, prompt_subset, monkeypatch):
    """When even one prompt does not fit, the error says what to change instead of crashing."""
    from analysis.extraction.runner import EntropyRunner

    monkeypatch.setattr(EntropyRunner, "_forward",
                        lambda self, prompts, *args, **kwargs: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(UserError, match="out of memory on a single prompt"):
        extract_checkpoint(demo_dir("demo_null", "base"), prompt_subset.head(2), checkpoint="demo_null-base",
                           family="demo_null", variant="base", settings=SETTINGS)


def test_other_runtime_errors_are_not_taken_for_out_of_memory(demo_dir, prompt_subset, monkeypatch):
    from analysis.extraction.runner import EntropyRunner

    monkeypatch.setattr(EntropyRunner, "_forward",
                        lambda self, prompts, *args, **kwargs: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        extract_checkpoint(demo_dir("demo_null", "base"), prompt_subset.head(4), checkpoint="demo_null-base",
                           family="demo_null", variant="base", settings=SETTINGS)


def test_a_prompt_longer_than_the_context_is_named(demo_dir, prompt_subset, tmp_path):
    """A prompt the model's position table cannot hold is refused before any forward pass, by its id."""
    import json
    import shutil

    folder = tmp_path / "short-context"
    shutil.copytree(demo_dir("demo_null", "base"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 6
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"prompt \S+ is \d+ tokens, longer than the model's context of 6"):
        extract_checkpoint(folder, prompt_subset, checkpoint="demo_null-base", family="demo_null", variant="base",
                           settings=SETTINGS)
