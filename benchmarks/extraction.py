"""Extraction benchmark: the project's extraction (A), a bare forward pass (B) and the naive approach (C).

Run by benchmarks/run.py. Its command line measures the peak memory of one method in a fresh process:
`python benchmarks/extraction.py --memory A --checkpoint DIR --json`, or the GPU figures with `--gpu`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would only clutter the benchmark's output

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from analysis import params as params_mod  # noqa: E402
from analysis import paths, synthetic  # noqa: E402
from analysis.artefacts import write_parquet  # noqa: E402
from analysis.entropy import DEFINITIONS  # noqa: E402
from analysis.inference import (  # noqa: E402
    EncodedPrompt,
    EntropyRunner,
    encode,
    entropy_frame,
    first_token_strings,
    length_sorted_batches,
    load_bridge,
    pad_batch,
    pad_id,
)
from analysis.prompts import load_prompts  # noqa: E402

# A checkpoint large enough that a CPU spends its time in the model, not in Python.
CPU_SPEC = {"architecture": "llama", "layers": 8, "hidden": 512, "heads": 8, "kv_heads": 8, "seed": 7,
            "planted": [], "self_focus": []}
QUICK_SPEC = {**CPU_SPEC, "layers": 4, "hidden": 256}
# Llama-3.1-8B's shape except the vocabulary (the demo tokenizer's, not 128,256 tokens).
LLAMA31_8B = {"layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 8, "intermediate": 14336, "rope_theta": 5.0e5}
PAPER_SHAPE = {"layers": 32, "heads": 32, "prompts": 160}
MB = 1_000_000


@dataclass
class Setup:
    """A loaded checkpoint with the prompt set tokenised for it."""

    bridge: Any
    tokenizer: Any
    prompts: pd.DataFrame
    encoded: list[EncodedPrompt]
    n_layers: int
    n_heads: int
    pad: int
    device: str

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def prompt_set() -> pd.DataFrame:
    """The project's prompt set (data/prompts.csv), validated as the pipeline does."""
    params = params_mod.load()
    return load_prompts(paths.PROMPTS, int(params["prompts"]["min_per_category"]))


def batch_size() -> int:
    return int(params_mod.load()["extract"]["batch_size"])


def build_checkpoint(spec: dict[str, Any], texts: list[str], out_dir: Path) -> Path:
    """A synthetic HF checkpoint of the spec's shape; its tokenizer is trained on the prompts."""
    synthetic.generate(spec, texts, out_dir, where="benchmark")
    return out_dir


def load_setup(local_dir: Path, device: str, dtype: torch.dtype, prompts: pd.DataFrame) -> Setup:
    """Load the bridge and tokenise every prompt (raw format), as `extract_checkpoint` does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(local_dir))
    encoded = [encode(tokenizer, text, "raw") for text in prompts["text"]]
    bridge = load_bridge(local_dir, device, dtype)
    return Setup(bridge, tokenizer, prompts, encoded, int(bridge.cfg.n_layers), int(bridge.cfg.n_heads),
                 pad_id(tokenizer), device)


# --- the three methods ---------------------------------------------------------------------------


def method_a(setup: Setup, size: int, out_path: Path) -> dict[str, Any]:
    """The project's extraction after model load: hooked batches, the long table, its parquet file."""
    start = time.perf_counter()
    runner = EntropyRunner(setup.bridge, setup.n_layers, setup.n_heads, setup.pad, setup.device)
    values = runner.run(setup.encoded, size, label="A")
    setup.sync()
    ran = time.perf_counter()
    frame = entropy_frame(setup.prompts, setup.encoded, values, "bench-base", "bench", "base",
                          first_token_strings(setup.tokenizer, setup.encoded), "raw")
    write_parquet(frame, out_path)
    split = {"hooked_forward": ran - start, "table_and_parquet": time.perf_counter() - ran}
    return {"bytes_written": out_path.stat().st_size, "rows": len(frame), "values": values, "split_s": split}


def method_b(setup: Setup, size: int, direct_hf: bool = False) -> dict[str, Any]:
    """The floor: the same batches through the bridge with no hooks (or, direct_hf, its HF model alone)."""
    first = next(setup.bridge.parameters()).device
    lengths = [len(p.input_ids) for p in setup.encoded]
    model = setup.bridge.original_model if direct_hf else None
    with torch.inference_mode():
        for batch in length_sorted_batches(lengths, size):
            ids, attention, _ = pad_batch([setup.encoded[i] for i in batch], setup.pad, first)
            if model is not None:
                model(input_ids=ids, attention_mask=attention)
            else:
                setup.bridge(ids, attention_mask=attention, return_type=None)
    setup.sync()
    return {"bytes_written": 0}


def naive_entropies(pattern: np.ndarray) -> dict[str, np.ndarray]:
    """The three entropy definitions of one prompt's cached patterns [layer, head, query, key], in numpy."""
    p = pattern.astype(np.float64)
    n = p.shape[-1]

    def rows(x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(x > 0, x * np.log(x), 0.0).sum(-1)

    raw_rows = rows(p)
    mass = p[..., 1:, 1:].sum(-1, keepdims=True)
    rest = np.divide(p[..., 1:, 1:], mass, out=np.zeros_like(p[..., 1:, 1:]), where=mass > 0)
    return {
        "raw": raw_rows.mean(-1),
        "no_bos": rows(rest).mean(-1),
        "normalised": (raw_rows[..., 1:] / np.log(np.arange(2, n + 1))).mean(-1),
    }


def method_c(setup: Setup, indices: list[int], out_dir: Path, cache: bool = True) -> dict[str, Any]:
    """The naive approach: one prompt at a time, `run_with_cache` of every attention pattern, arrays
    written to disk (.npy, where the original study pickled), entropies computed afterwards.
    With cache=False, only the one-prompt-at-a-time bare forward (the floor of any such approach)."""
    first = next(setup.bridge.parameters()).device
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(setup.n_layers)]
    cached: list[np.ndarray] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in indices:
            ids = torch.tensor([setup.encoded[i].input_ids], device=first)
            if not cache:
                setup.bridge(ids, return_type=None)
                continue
            _, store = setup.bridge.run_with_cache(ids, names_filter=names)
            cached.append(np.stack([store[name][0].float().cpu().numpy() for name in names]))
    setup.sync()
    forward = time.perf_counter() - start
    written = 0
    for k, array in enumerate(cached):
        path = out_dir / f"patterns_{k:04d}.npy"
        np.save(path, array)
        written += path.stat().st_size
    saved = time.perf_counter()
    values = [naive_entropies(array) for array in cached]
    done = time.perf_counter()
    return {"bytes_written": written, "cached_nbytes": sum(a.nbytes for a in cached), "values": values,
            "split_s": {"forward_and_cache": forward, "write": saved - start - forward, "entropies": done - saved}}


# --- timing --------------------------------------------------------------------------------------


def _timed(fn: Callable[[], dict[str, Any]]) -> tuple[float, float, dict[str, Any]]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def _summary(walls: list[float], cpus: list[float], n_prompts: int, scale: float = 1.0) -> dict[str, Any]:
    """Median and min of the runs; `scale` extrapolates a subset's time to the whole prompt set."""
    return {"runs_s": walls, "cpu_s": cpus, "median_s": statistics.median(walls) * scale,
            "min_s": min(walls) * scale, "median_cpu_s": statistics.median(cpus) * scale,
            "prompts_timed": n_prompts, "scaled_by": scale}


def time_methods(setup: Setup, size: int, reps: int, c_indices: list[int], c_reps: int, workdir: Path,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Wall time of A and B over the same batches (interleaved, alternating order), then of C."""
    n = len(setup.encoded)
    parquet = workdir / "entropy.parquet"
    method_b(setup, size)  # warm-up: first-call costs belong to neither method
    method_a(setup, size, parquet)
    runs: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in ("A", "B", "B_hf")}
    a_out: dict[str, Any] = {}
    for rep in range(reps):
        order = ("A", "B", "B_hf") if rep % 2 == 0 else ("B_hf", "B", "A")
        for name in order:
            fn = {"A": lambda: method_a(setup, size, parquet), "B": lambda: method_b(setup, size),
                  "B_hf": lambda: method_b(setup, size, direct_hf=True)}[name]
            wall, cpu, out = _timed(fn)
            runs[name][0].append(wall)
            runs[name][1].append(cpu)
            if name == "A":
                a_out = out
        log(f"  rep {rep + 1}/{reps}: A {runs['A'][0][-1]:.2f} s, B {runs['B'][0][-1]:.2f} s")
    result = {k: {**_summary(w, c, n), "bytes_written": 0} for k, (w, c) in runs.items()}
    result["A"].update(bytes_written=a_out["bytes_written"], rows=a_out["rows"], split_s=a_out["split_s"])

    scale = n / len(c_indices)
    c_runs: dict[str, tuple[list[float], list[float]]] = {"C": ([], []), "C_bare": ([], [])}
    c_out: dict[str, Any] = {}
    for rep in range(c_reps):
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            wall, cpu, c_out = _timed(lambda: method_c(setup, c_indices, Path(tmp)))
        c_runs["C"][0].append(wall)
        c_runs["C"][1].append(cpu)
        wall, cpu, _ = _timed(lambda: method_c(setup, c_indices, workdir, cache=False))
        c_runs["C_bare"][0].append(wall)
        c_runs["C_bare"][1].append(cpu)
        log(f"  C rep {rep + 1}/{c_reps}: {c_runs['C'][0][-1]:.2f} s over {len(c_indices)} prompts")
    for k, (w, c) in c_runs.items():
        result[k] = {**_summary(w, c, len(c_indices), scale), "bytes_written": 0}
    result["C"].update(bytes_written=c_out["bytes_written"], cached_nbytes=c_out["cached_nbytes"],
                       split_s=c_out["split_s"], bytes_scaled_by=scale)
    result["C_matches_A_max_abs"] = max(
        float(np.max(np.abs(a_out["values"][d][i] - v[d]))) for i, v in zip(c_indices, c_out["values"])
        for d in DEFINITIONS)
    return result


# --- memory, in a fresh process per method ------------------------------------------------------


def _status_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc/self/status."""
    with open("/proc/self/status", encoding="ascii") as fh:
        return int(re.search(rf"{field}:\s+(\d+)", fh.read()).group(1))


def _reset_peak() -> bool:
    """Reset this process's peak-RSS mark, VmHWM (Linux >= 4.0), so it reports the peak from here on."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_of(method: str, checkpoint: Path, c_limit: int | None) -> dict[str, Any]:
    """Peak RSS of one method's full pass, in this (fresh) process, after the model is loaded.

    Read from VmHWM, not ru_maxrss: on Linux ru_maxrss also counts the parent's RSS at the exec that
    started this process (signal->maxrss), which hid every method's peak under run.py's own."""
    import gc

    prompts = prompt_set()
    setup = load_setup(checkpoint, "cpu", torch.float32, prompts)
    size = batch_size()
    gc.collect()
    baseline = _status_kib("VmRSS")
    reset = _reset_peak()
    with tempfile.TemporaryDirectory() as tmp:
        if method == "A":
            method_a(setup, size, Path(tmp) / "entropy.parquet")
        elif method == "B":
            method_b(setup, size)
        elif method == "C":
            method_c(setup, list(range(len(prompts)))[:c_limit], Path(tmp))
        else:
            raise ValueError(f"unknown method {method!r}")
    peak = _status_kib("VmHWM")
    return {"method": method, "rss_after_load_kib": baseline, "peak_rss_kib": peak,
            "attributable_kib": peak - baseline, "peak_reset_after_load": reset,
            "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "prompts": len(prompts) if method != "C" or c_limit is None else min(c_limit, len(prompts))}


def memory_in_subprocess(method: str, checkpoint: Path, threads: int | None, c_limit: int | None) -> dict[str, Any]:
    """Run `memory_of` in a fresh interpreter, so no method inherits another's allocations."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory", method, "--checkpoint", str(checkpoint), "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    if c_limit:
        cmd += ["--c-limit", str(c_limit)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"memory of {method} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- artefact sizes ------------------------------------------------------------------------------


def paper_shape_artefact(prompts: pd.DataFrame, lengths: list[int], workdir: Path, seed: int = 0) -> dict[str, Any]:
    """Size of one checkpoint's entropy table at the paper's shape (32 x 32 x 160), written by write_parquet
    with the real columns; entropies are random floats spread as real ones are (no flattering compression)."""
    n_layers, n_heads, n_prompts = PAPER_SHAPE["layers"], PAPER_SHAPE["heads"], PAPER_SHAPE["prompts"]
    subset = prompts.head(n_prompts).reset_index(drop=True)
    tokens = np.array(lengths[:n_prompts])
    rng = np.random.default_rng(seed)
    ceiling = np.log(tokens)[:, None, None]  # mean entropy of a query is below log(number of keys)
    raw = ceiling * rng.beta(2.0, 2.0, size=(n_prompts, n_layers, n_heads))
    values = {"raw": raw, "no_bos": raw * rng.uniform(0.8, 1.2, size=raw.shape),
              "normalised": rng.beta(2.0, 2.0, size=raw.shape)}
    encoded = [EncodedPrompt([0] * int(t), [True] * int(t)) for t in tokens]
    frame = entropy_frame(subset, encoded, values, "llama31_8b-instruct", "llama31_8b", "instruct",
                          ["<|begin_of_text|>"] * n_prompts, "raw")
    path = workdir / "paper_shape.parquet"
    write_parquet(frame, path)
    # What the naive approach stores for the same prompts: float32 patterns, 32 x 32 x n x n per prompt.
    patterns = int(sum(n_layers * n_heads * t * t * 4 for t in tokens))
    return {"rows": len(frame), "bytes": path.stat().st_size, "naive_pattern_bytes": patterns,
            "mean_tokens": float(tokens.mean()), **PAPER_SHAPE}


# --- the CPU benchmark as a whole ----------------------------------------------------------------


def measure(quick: bool = False, threads: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every CPU figure of the extraction benchmark: times, peak memory, bytes written, artefact sizes."""
    if threads:
        torch.set_num_threads(threads)
    prompts = prompt_set()
    size = batch_size()
    spec = QUICK_SPEC if quick else CPU_SPEC
    reps, c_reps, c_count = (1, 1, 16) if quick else (5, 3, len(prompts))
    with tempfile.TemporaryDirectory(prefix="selfref-bench-") as tmp:
        workdir = Path(tmp)
        log(f"building a synthetic checkpoint: {spec['layers']} layers, d_model {spec['hidden']}, {spec['heads']} heads")
        checkpoint = build_checkpoint(spec, list(prompts["text"]), workdir / "checkpoint")
        setup = load_setup(checkpoint, "cpu", torch.float32, prompts)
        n_params = sum(p.numel() for p in setup.bridge.original_model.parameters())
        lengths = [len(e.input_ids) for e in setup.encoded]
        step = max(1, len(prompts) // c_count)
        c_indices = list(range(0, len(prompts), step))[:c_count]
        log(f"timing A, B ({reps} runs each) and C ({c_reps} run(s) over {len(c_indices)} prompts)")
        times = time_methods(setup, size, reps, c_indices, c_reps, workdir, log)
        del setup
        memory = {}
        for method in ("A", "B", "C"):
            log(f"peak memory of {method} in a fresh process")
            memory[method] = memory_in_subprocess(method, checkpoint, threads, c_count if quick else None)
        artefact = paper_shape_artefact(prompts, lengths, workdir)
    return {
        "checkpoint": {**spec, "intermediate": 2 * spec["hidden"], "parameters": n_params, "dtype": "float32"},
        "prompts": len(prompts), "batch_size": size, "mean_tokens": float(np.mean(lengths)),
        "max_tokens": int(max(lengths)), "threads": torch.get_num_threads(),
        "times": times, "memory": memory, "paper_artefact": artefact,
    }


# --- GPU: Llama-3.1-8B's shape, random weights ---------------------------------------------------


def build_llama31_8b_shape(texts: list[str], out_dir: Path, layers: int, device: str = "cuda") -> Path:
    """Random bfloat16 weights in Llama-3.1-8B's shape (demo vocabulary), saved as an HF checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = synthetic.build_tokenizer(texts)
    shape = LLAMA31_8B
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=layers, num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=512, rope_theta=shape["rope_theta"], tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialising 8B parameters on the GPU takes seconds, on a CPU minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out_dir


def measure_gpu(quick: bool = False, log: Callable[[str], None] = print, device: str = "cuda") -> dict[str, Any]:
    """A, B and C (on a subset) on the GPU with Llama-3.1-8B's shape in bfloat16; peak GPU memory per method."""
    prompts = prompt_set()
    size = batch_size()
    layers = 4 if quick else LLAMA31_8B["layers"]
    reps, c_count = (1, 8) if quick else (5, 32)
    result: dict[str, Any] = {"device_name": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                              "checkpoint": {**LLAMA31_8B, "layers": layers, "dtype": "bfloat16"},
                              "prompts": len(prompts), "batch_size": size}
    with tempfile.TemporaryDirectory(prefix="selfref-bench-gpu-") as tmp:
        workdir = Path(tmp)
        log(f"building a random checkpoint of Llama-3.1-8B's shape ({layers} layers) on the GPU")
        checkpoint = build_llama31_8b_shape(list(prompts["text"]), workdir / "checkpoint", layers, device)
        setup = load_setup(checkpoint, device, torch.bfloat16, prompts)
        result["checkpoint"]["vocab"] = len(setup.tokenizer)
        result["checkpoint"]["parameters"] = sum(p.numel() for p in setup.bridge.original_model.parameters())
        result["mean_tokens"] = float(np.mean([len(e.input_ids) for e in setup.encoded]))
        c_indices = list(range(0, len(prompts), max(1, len(prompts) // c_count)))[:c_count]
        result["times"] = time_methods(setup, size, reps, c_indices, 1, workdir, log)
        peaks = {}
        for name, fn in (("A", lambda: method_a(setup, size, workdir / "peak.parquet")),
                         ("B", lambda: method_b(setup, size)),
                         ("C", lambda: method_c(setup, c_indices, workdir))):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            peak = torch.cuda.max_memory_allocated()
            peaks[name] = {"peak_bytes": peak, "attributable_bytes": peak - before}
        result["memory"] = peaks
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", choices=("A", "B", "C"), help="peak memory of one method in this process")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder for --memory")
    parser.add_argument("--c-limit", type=int, help="with --memory C: only the first N prompts")
    parser.add_argument("--gpu", action="store_true", help="the GPU figures (needs CUDA)")
    parser.add_argument("--quick", action="store_true", help="a small, fast run")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    say = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    if args.memory:
        if args.checkpoint is None:
            parser.error("--memory needs --checkpoint")
        result = memory_of(args.memory, args.checkpoint, args.c_limit)
    elif args.gpu:
        if not torch.cuda.is_available():
            parser.error("--gpu: no CUDA device")
        result = measure_gpu(args.quick, say)
    else:
        result = measure(args.quick, args.threads, say)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
