"""Extraction benchmark: the project's extraction (A) against a bare forward pass (B) and the naive approach (C).

A is `analysis.extraction.runner`: `extract_checkpoint` end to end, and its `EntropyRunner` on a loaded bridge.
B runs the same batches through the same bridge with no hooks. C runs one prompt at a time with
`run_with_cache` of every attention pattern, saves the arrays and computes entropies afterwards in numpy.
`python benchmarks/extraction.py --memory A|B|C --checkpoint DIR` prints one method's peak memory (run in a
fresh process by `measure`); `--gpu` runs the figures on a CUDA device in Llama-3.1-8B's shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from analysis.core import config as config_mod  # noqa: E402
from analysis.models import synthetic  # noqa: E402
from analysis.core.artefacts import write_parquet  # noqa: E402
from analysis.extraction.runner import (  # noqa: E402
    EncodedPrompt,
    EntropyRunner,
    encode,
    entropy_frame,
    extract_checkpoint,
    first_token_strings,
    length_sorted_batches,
    load_bridge,
    pad_batch,
    pad_id,
)
from analysis.core.prompts import load_prompts  # noqa: E402
from analysis.core.quantities import DEFINITIONS  # noqa: E402

# Large enough that a CPU spends its time in the model rather than in Python.
CPU_SPEC = {"architecture": "llama", "layers": 8, "hidden": 512, "heads": 8, "kv_heads": 8, "seed": 7}
QUICK_SPEC = {**CPU_SPEC, "layers": 4, "hidden": 256}
# Llama-3.1-8B's shape, except the vocabulary (the demo tokenizer's).
LLAMA31_8B = {"layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 8, "intermediate": 14336, "rope_theta": 5.0e5}
PAPER_SHAPE = {"layers": 32, "heads": 32, "prompts": 160}


class Loaded:
    """A checkpoint loaded the way `extract_checkpoint` loads it, with every prompt tokenised (raw format)."""

    def __init__(self, local_dir: Path, prompts: pd.DataFrame, device: str, dtype: torch.dtype):
        from transformers import AutoTokenizer

        self.device, self.prompts = device, prompts
        self.tokenizer = AutoTokenizer.from_pretrained(str(local_dir))
        self.encoded = [encode(self.tokenizer, text, "raw") for text in prompts["text"]]
        self.bridge = load_bridge(local_dir, device, dtype)
        self.n_layers, self.n_heads = int(self.bridge.cfg.n_layers), int(self.bridge.cfg.n_heads)
        self.pad = pad_id(self.tokenizer)
        self.first = next(self.bridge.parameters()).device

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def settings(device: str, dtype: str) -> config_mod.ExtractSettings:
    """params.yaml's `extract` settings with the device and dtype of this benchmark."""
    return dataclasses.replace(config_mod.load().extract, device=device, dtype=dtype)


def prompt_set() -> pd.DataFrame:
    config = config_mod.load()
    return load_prompts(config.paths.prompts, config.prompts.min_per_category)


# --- the methods --------------------------------------------------------------------------------


def a_end_to_end(local_dir: Path, prompts: pd.DataFrame, out: Path, extract: config_mod.ExtractSettings) -> int:
    """A as the extract stage runs it: `extract_checkpoint` (load, tokenise, hooked batches, table), then its parquet."""
    frame = extract_checkpoint(local_dir, prompts, checkpoint="bench-base", family="bench", variant="base",
                               settings=extract)
    write_parquet(frame, out)
    return len(frame)


def a_loaded(m: Loaded, batch_size: int, out: Path) -> dict[str, np.ndarray]:
    """A after loading: `EntropyRunner.run`, the long table and its parquet file."""
    runner = EntropyRunner(m.bridge, m.n_layers, m.n_heads, m.pad, m.device)
    values = runner.run(m.encoded, batch_size, label="A")
    m.sync()
    frame = entropy_frame(m.prompts, m.encoded, values, "bench-base", "bench", "base",
                          first_token_strings(m.tokenizer, m.encoded), "raw")
    write_parquet(frame, out)
    return values


def b_bare(m: Loaded, batch_size: int) -> None:
    """B, the floor: the same length-sorted batches through the same bridge, no hooks."""
    with torch.inference_mode():
        for batch in length_sorted_batches([len(p.input_ids) for p in m.encoded], batch_size):
            ids, attention, _ = pad_batch([m.encoded[i] for i in batch], m.pad, m.first)
            m.bridge(ids, attention_mask=attention, return_type=None)
    m.sync()


def naive_entropies(pattern: np.ndarray) -> dict[str, np.ndarray]:
    """The three definitions from one prompt's cached patterns [layer, head, query, key], in numpy."""
    p = pattern.astype(np.float64)

    def rows(x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(x > 0, x * np.log(x), 0.0).sum(-1)

    raw = rows(p)
    rest = p[..., 1:, 1:]
    mass = rest.sum(-1, keepdims=True)
    rest = np.divide(rest, mass, out=np.zeros_like(rest), where=mass > 0)
    return {"raw": raw.mean(-1), "no_bos": rows(rest).mean(-1),
            "normalised": (raw[..., 1:] / np.log(np.arange(2, p.shape[-1] + 1))).mean(-1)}


def c_naive(m: Loaded, indices: list[int], out_dir: Path, cache: bool = True) -> list[dict[str, np.ndarray]]:
    """C: one prompt at a time, `run_with_cache` of every pattern, .npy files, numpy entropies afterwards.
    cache=False runs only the one-prompt-at-a-time bare forward (C_bare, the floor of any such approach)."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(m.n_layers)]
    with torch.inference_mode():
        for k, i in enumerate(indices):
            ids = torch.tensor([m.encoded[i].input_ids], device=m.first)
            if not cache:
                m.bridge(ids, return_type=None)
                continue
            _, store = m.bridge.run_with_cache(ids, names_filter=names)
            np.save(out_dir / f"patterns_{k:04d}.npy", np.stack([store[n][0].float().cpu().numpy() for n in names]))
    m.sync()
    return [naive_entropies(np.load(out_dir / f"patterns_{k:04d}.npy")) for k in range(len(indices)) if cache]


# --- timing -------------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _summary(walls: list[float], prompts_timed: int, scale: float = 1.0) -> dict[str, Any]:
    """Median and min of the runs; `scale` extrapolates a subset's time to the whole prompt set."""
    return {"median_s": statistics.median(walls) * scale, "min_s": min(walls) * scale, "runs_s": walls,
            "prompts_timed": prompts_timed, "scaled_by": scale}


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, log: Callable[[str], None]) -> dict[str, list[float]]:
    """Wall times of each function, run in turn, the order reversed every other repetition."""
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps):
        for name in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
            runs[name].append(_timed(fns[name])[0])
        log("  rep %d/%d: %s" % (rep + 1, reps, ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items())))
    return runs


def time_methods(m: Loaded, local_dir: Path | None, extract: config_mod.ExtractSettings, reps: int,
                 c_indices: list[int], work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """End-to-end A and B (loading included), then A and B on the loaded bridge, then C and C_bare."""
    n, size = len(m.encoded), extract.batch_size
    out: dict[str, Any] = {}
    if local_dir is not None:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[extract.dtype]
        log("A (extract_checkpoint) and B (load + bare forward), loading included")
        e2e = interleaved({
            "A_end_to_end": lambda: a_end_to_end(local_dir, m.prompts, work / "e2e.parquet", extract),
            "B_end_to_end": lambda: b_bare(Loaded(local_dir, m.prompts, m.device, dtype), size)}, reps, log)
        out.update({k: _summary(v, n) for k, v in e2e.items()})
    b_bare(m, size)  # warm-up: first-call costs belong to neither method
    a_values = a_loaded(m, size, work / "a.parquet")
    log("A (EntropyRunner) and B (bare forward) on the loaded bridge")
    loaded = interleaved({"A": lambda: a_loaded(m, size, work / "a.parquet"), "B": lambda: b_bare(m, size)},
                         reps + 2, log)
    out.update({k: _summary(v, n) for k, v in loaded.items()})
    out["A"]["bytes_written"] = (work / "a.parquet").stat().st_size
    scale = n / len(c_indices)
    log(f"C (one prompt at a time, run_with_cache) over {len(c_indices)} prompts")
    c_out: dict[str, Any] = {}

    def c_run() -> None:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            c_out["values"] = c_naive(m, c_indices, Path(tmp))
            c_out["bytes"] = sum(f.stat().st_size for f in Path(tmp).iterdir())

    c_runs = interleaved({"C": c_run, "C_bare": lambda: c_naive(m, c_indices, work, cache=False)}, reps, log)
    out.update({k: _summary(v, len(c_indices), scale) for k, v in c_runs.items()})
    out["C"]["bytes_written"] = c_out["bytes"] * scale
    out["C_matches_A_max_abs"] = max(float(np.max(np.abs(a_values[d][i] - v[d])))
                                     for i, v in zip(c_indices, c_out["values"]) for d in DEFINITIONS)
    return out


# --- memory, each method in a fresh process -------------------------------------------------------


def _status_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in KiB, from /proc/self/status (Linux)."""
    text = Path("/proc/self/status").read_text(encoding="ascii")
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def memory_of(method: str, local_dir: Path) -> dict[str, Any]:
    """Peak RSS of this whole process (interpreter, libraries, model, activations) running one method from load.

    VmHWM rather than ru_maxrss: on Linux ru_maxrss also counts the parent's RSS at the exec that started
    this process, which would show run.py's own peak for every method."""
    prompts = prompt_set()
    extract = settings("cpu", "float32")
    with tempfile.TemporaryDirectory() as tmp:
        if method == "A":
            a_end_to_end(local_dir, prompts, Path(tmp) / "a.parquet", extract)
        else:
            m = Loaded(local_dir, prompts, "cpu", torch.float32)
            b_bare(m, extract.batch_size) if method == "B" else c_naive(m, list(range(len(prompts))), Path(tmp))
    return {"method": method, "peak_rss_mib": _status_kib("VmHWM") / 1024}


def memory_in_subprocess(method: str, local_dir: Path, threads: int | None) -> dict[str, Any]:
    import subprocess

    cmd = [sys.executable, __file__, "--memory", method, "--checkpoint", str(local_dir)]
    cmd += ["--threads", str(threads)] if threads else []
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"peak memory of {method} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- artefact size at the paper's shape -----------------------------------------------------------


def paper_artefact(prompts: pd.DataFrame, lengths: list[int], work: Path, seed: int = 0) -> dict[str, Any]:
    """Bytes of one checkpoint's entropy table at 32 layers x 32 heads x 160 prompts, built by `entropy_frame`
    and written by `write_parquet`; the entropies are random floats spread as real ones (no flattering zeros)."""
    n_l, n_h, n_p = PAPER_SHAPE["layers"], PAPER_SHAPE["heads"], PAPER_SHAPE["prompts"]
    tokens = np.array(lengths[:n_p])
    rng = np.random.default_rng(seed)
    raw = np.log(tokens)[:, None, None] * rng.beta(2.0, 2.0, size=(n_p, n_l, n_h))
    values = {"raw": raw, "no_bos": raw * rng.uniform(0.8, 1.2, size=raw.shape),
              "normalised": rng.beta(2.0, 2.0, size=raw.shape)}
    encoded = [EncodedPrompt([0] * int(t), [True] * int(t)) for t in tokens]
    frame = entropy_frame(prompts.head(n_p).reset_index(drop=True), encoded, values, "llama31_8b-instruct",
                          "llama31_8b", "instruct", ["<|begin_of_text|>"] * n_p, "raw")
    write_parquet(frame, work / "paper.parquet")
    return {**PAPER_SHAPE, "rows": len(frame), "mb": (work / "paper.parquet").stat().st_size / 1e6,
            "naive_patterns_mb": float(sum(n_l * n_h * t * t * 4 for t in tokens)) / 1e6,
            "mean_tokens": float(tokens.mean())}


# --- the benchmark as a whole ---------------------------------------------------------------------


def measure(quick: bool = False, threads: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every CPU figure: times of A, B, C, peak memory of each, bytes written, the paper-shape artefact."""
    if threads:
        torch.set_num_threads(threads)
    prompts = prompt_set()
    extract = settings("cpu", "float32")
    spec = QUICK_SPEC if quick else CPU_SPEC
    reps = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="selfref-bench-") as tmp:
        work = Path(tmp)
        local = work / "checkpoint"
        log(f"synthetic checkpoint: {spec['layers']} layers, d_model {spec['hidden']}, {spec['heads']} heads")
        synthetic.generate(spec, list(prompts["text"]), local, where="benchmark")
        m = Loaded(local, prompts, "cpu", torch.float32)
        n_params = sum(p.numel() for p in m.bridge.original_model.parameters())
        lengths = [len(e.input_ids) for e in m.encoded]
        c_indices = list(range(0, len(prompts), 10 if quick else 1))
        times = time_methods(m, local, extract, reps, c_indices, work, log)
        del m
        memory = {}
        for method in ("A", "B", "C"):
            log(f"peak memory of {method} in a fresh process")
            memory[method] = memory_in_subprocess(method, local, threads)
        artefact = paper_artefact(prompts, lengths, work)
    return {"checkpoint": {**spec, "parameters": n_params, "dtype": "float32"}, "prompts": len(prompts),
            "batch_size": extract.batch_size, "mean_tokens": float(np.mean(lengths)), "max_tokens": max(lengths),
            "threads": torch.get_num_threads(), "times": times, "memory": memory, "paper_artefact": artefact,
            "ratios": ratios(times, memory, extract.batch_size, len(prompts))}


def ratios(t: dict[str, Any], memory: dict[str, Any], batch_size: int, n: int) -> dict[str, float]:
    """The ratios the goals judge, and what bounds C/A: how much batching buys on this device."""
    med = {k: v["median_s"] for k, v in t.items() if isinstance(v, dict)}
    out = {"a_over_b": med["A"] / med["B"], "c_over_a": med["C"] / med["A"], "c_over_b": med["C"] / med["B"],
           "c_bare_over_b": med["C_bare"] / med["B"],
           "batch_cost_in_prompts": (med["B"] / -(-n // batch_size)) / (med["C_bare"] / n),
           "c_cache_extra_s": med["C"] - med["C_bare"]}
    if "A_end_to_end" in med:
        out["a_over_b_end_to_end"] = med["A_end_to_end"] / med["B_end_to_end"]
    if memory:
        key = "peak_rss_mib" if "peak_rss_mib" in memory["A"] else "peak_mib"
        out["memory_a_over_b"] = memory["A"][key] / memory["B"][key]
    return out


def build_llama31_8b(texts: list[str], out_dir: Path, layers: int, device: str) -> Path:
    """Random bfloat16 weights in Llama-3.1-8B's shape (demo vocabulary), initialised on `device`, saved as safetensors."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = synthetic.build_tokenizer(texts)
    s = LLAMA31_8B
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=layers, num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      max_position_embeddings=512, rope_theta=s["rope_theta"], tie_word_embeddings=False,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def measure_gpu(quick: bool = False, log: Callable[[str], None] = print, device: str = "cuda") -> dict[str, Any]:
    """A, B and C on a GPU in Llama-3.1-8B's shape (bfloat16), with peak GPU memory per method."""
    prompts = prompt_set()
    extract = settings(device, "bfloat16")
    layers = 4 if quick else LLAMA31_8B["layers"]
    with tempfile.TemporaryDirectory(prefix="selfref-bench-gpu-") as tmp:
        work = Path(tmp)
        log(f"random checkpoint of Llama-3.1-8B's shape, {layers} layers, on {device}")
        local = build_llama31_8b(list(prompts["text"]), work / "checkpoint", layers, device)
        torch.cuda.empty_cache()
        m = Loaded(local, prompts, device, torch.bfloat16)
        c_indices = list(range(0, len(prompts), 4))
        times = time_methods(m, local, extract, 1 if quick else 3, c_indices, work, log)
        memory = {}
        for name, fn in (("A", lambda: a_loaded(m, extract.batch_size, work / "peak.parquet")),
                         ("B", lambda: b_bare(m, extract.batch_size)), ("C", lambda: c_naive(m, c_indices, work))):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            memory[name] = {"peak_mib": torch.cuda.max_memory_allocated() / 2**20}
        return {"device_name": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                "checkpoint": {**LLAMA31_8B, "layers": layers, "vocab": len(m.tokenizer), "dtype": "bfloat16",
                               "parameters": sum(p.numel() for p in m.bridge.original_model.parameters())},
                "prompts": len(prompts), "batch_size": extract.batch_size, "times": times, "memory": memory,
                "ratios": ratios(times, memory, extract.batch_size, len(prompts))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", choices=("A", "B", "C"), help="peak memory of one method, in this process")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder for --memory")
    parser.add_argument("--gpu", action="store_true", help="the GPU figures (needs CUDA)")
    parser.add_argument("--quick", action="store_true", help="a small, fast run")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 - stdout carries the JSON
    if args.memory:
        if args.checkpoint is None:
            parser.error("--memory needs --checkpoint")
        result = memory_of(args.memory, args.checkpoint)
    elif args.gpu:
        if not torch.cuda.is_available():
            parser.error("--gpu: no CUDA device on this machine")
        result = measure_gpu(args.quick, say)
    else:
        result = measure(args.quick, args.threads, say)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
