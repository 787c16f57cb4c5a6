"""Where every file of the project lives. Other modules ask here; none builds a path itself."""

from __future__ import annotations

import os
from pathlib import Path

def use_root(root: Path) -> None:
    """Point every path at another project root (tests, benchmarks); the default is this checkout."""
    global ROOT, PARAMS, DATA, PROMPTS, PROMPT_SUMMARY, MANIFESTS, ENTROPY, STATS, LAYERS, DELTAS
    global CROSS_FAMILY, HEADS, TOKEN_LENGTHS, ROBUSTNESS, LENGTH_CONTROL, SPLIT_HALF, METRICS, PLOTS
    global DELTA_RFC_PLOT, HEAD_FAMILIES, CANDIDATE_HEADS, LENGTH_DISAGREEMENTS, CORRELATION_PAIRS
    global DEMO_MODELS, REPORT, REPORT_QMD, FIGURES, REPORT_OUTPUT, REPORT_HTML, REPORT_PDF, QUARTO_OFFLINE
    ROOT = Path(root)
    PARAMS = ROOT / "params.yaml"
    DATA = ROOT / "data"
    PROMPTS = DATA / "prompts.csv"
    PROMPT_SUMMARY = DATA / "prompts" / "summary.json"
    MANIFESTS = DATA / "models"
    ENTROPY = DATA / "entropy"
    STATS = DATA / "stats"
    LAYERS = STATS / "layers.parquet"
    DELTAS = STATS / "deltas.parquet"
    CROSS_FAMILY = STATS / "cross_family.parquet"
    HEADS = STATS / "heads.parquet"
    TOKEN_LENGTHS = STATS / "token_lengths.parquet"
    ROBUSTNESS = STATS / "robustness.parquet"
    LENGTH_CONTROL = STATS / "length_control.parquet"
    SPLIT_HALF = STATS / "split_half.parquet"
    HEAD_FAMILIES = STATS / "head_families.parquet"  # the report's selections (analysis.report_tables)
    CANDIDATE_HEADS = STATS / "candidate_heads.parquet"
    LENGTH_DISAGREEMENTS = STATS / "length_disagreements.parquet"
    CORRELATION_PAIRS = STATS / "correlation_pairs.parquet"
    METRICS = STATS / "metrics.json"
    PLOTS = STATS / "plots"
    DELTA_RFC_PLOT = PLOTS / "delta_rfc.csv"
    # Synthetic demo checkpoints are regenerated from params, so they live outside git and DVC's cache.
    DEMO_MODELS = Path(os.environ.get("SELFREF_DEMO_MODELS", ROOT / "models" / "demo"))
    REPORT = ROOT / "report"
    REPORT_QMD = REPORT / "index.qmd"
    FIGURES = REPORT / "figures"
    REPORT_OUTPUT = REPORT / "_output"
    REPORT_HTML = REPORT_OUTPUT / "index.html"
    REPORT_PDF = REPORT_OUTPUT / "index.pdf"
    QUARTO_OFFLINE = ROOT / ".quarto-offline"  # where `make quarto QUARTO_INSTALLER=...` installs Quarto (git-ignored)


use_root(Path(os.environ.get("SELFREF_ROOT", Path(__file__).resolve().parent.parent)))


def manifest(checkpoint: str) -> Path:
    """Tracked manifest of one checkpoint (`<family>-<variant>`)."""
    return MANIFESTS / f"{checkpoint}.json"


def entropy_table(checkpoint: str, prompt_format: str = "raw") -> Path:
    """Per (prompt, layer, head) entropy table of one checkpoint with prompts in one format (raw or chat)."""
    return ENTROPY / prompt_format / f"{checkpoint}.parquet"


def demo_model_dir(checkpoint: str) -> Path:
    """Local Hugging Face directory of a synthetic demo checkpoint."""
    return DEMO_MODELS / checkpoint
