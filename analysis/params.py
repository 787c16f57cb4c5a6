"""Reads params.yaml: the active suite, its checkpoints and the settings of each stage."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from analysis import paths
from analysis.errors import UserError

VARIANTS = ("base", "instruct")
SOURCES = ("repo", "demo", "local")  # the kinds of checkpoint source a suite entry may name


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a family: a hub repo at a revision, a synthetic demo spec, or a local folder."""

    family: str
    variant: str
    repo: str | None = None
    revision: str = "main"
    demo: dict[str, Any] | None = None
    local: str | None = None

    @property
    def name(self) -> str:
        return f"{self.family}-{self.variant}"

    @property
    def source(self) -> str:
        return "demo" if self.demo is not None else "local" if self.local is not None else "hub"

    @property
    def local_path(self) -> Path:
        """A `local:` folder, relative paths taken from the project root."""
        path = Path(self.local).expanduser()
        return path if path.is_absolute() else paths.ROOT / path


def load(path: Path | None = None) -> dict[str, Any]:
    """The whole params.yaml as a dict."""
    path = path or paths.PARAMS
    try:
        with open(path, encoding="utf-8") as fh:
            params = yaml.safe_load(fh)
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run from the repository root or set SELFREF_ROOT") from None
    if not isinstance(params, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return params


def _checkpoint(family: str, variant: str, spec: Any) -> Checkpoint:
    where = f"params.yaml suites: {family}.{variant}"
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected a mapping with `repo`, `demo` or `local`")
    kinds = [k for k in SOURCES if k in spec]
    if len(kinds) > 1:
        raise UserError(f"{where}: give one of {', '.join(SOURCES)}, not {' and '.join(kinds)}")
    if "local" in spec:
        if not isinstance(spec["local"], str) or not spec["local"].strip():
            raise UserError(f"{where}.local: expected the path of a Hugging Face checkpoint folder "
                            "(config.json, *.safetensors, tokenizer files)")
        return Checkpoint(family, variant, local=spec["local"].strip())
    if "demo" in spec:
        if not isinstance(spec["demo"], dict):
            raise UserError(f"{where}.demo: expected a mapping of generator settings")
        return Checkpoint(family, variant, demo=dict(spec["demo"]))
    if "repo" not in spec:
        raise UserError(f"{where}: needs `repo: <owner>/<name>` (hub), `demo: {{...}}` (synthetic) "
                        "or `local: <dir>` (a Hugging Face folder on disk)")
    return Checkpoint(family, variant, repo=str(spec["repo"]), revision=str(spec.get("revision", "main")))


def suite_checkpoints(params: dict[str, Any], suite: str) -> list[Checkpoint]:
    """Every checkpoint of a suite, family by family, base before instruct."""
    suites = params.get("suites") or {}
    if suite not in suites:
        raise UserError(f"params.yaml: unknown suite {suite!r}; known: {', '.join(suites) or 'none'}")
    families = suites[suite].get("families") or {}
    out = []
    for family, variants in families.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", str(family)):
            raise UserError(f"params.yaml suites.{suite}: family name {family!r} may use only letters, digits and _ "
                            "(it becomes part of DVC stage names and params keys)")
        missing = [v for v in VARIANTS if v not in (variants or {})]
        if missing:
            raise UserError(f"params.yaml suites.{suite}.{family}: missing {', '.join(missing)} checkpoint")
        out.extend(_checkpoint(family, v, variants[v]) for v in VARIANTS)
    return out


def checkpoint_entries(checkpoints: list[Checkpoint]) -> dict[str, dict[str, str]]:
    """The `checkpoints:` mapping that dvc.yaml iterates over (stage names `extract@<checkpoint>`)."""
    return {c.name: {"family": c.family, "variant": c.variant} for c in checkpoints}


def active_checkpoints(params: dict[str, Any]) -> list[Checkpoint]:
    """Checkpoints of the active suite, after checking `checkpoints:` agrees with it."""
    suite = params.get("suite")
    expected = suite_checkpoints(params, suite)
    if params.get("checkpoints") != checkpoint_entries(expected):
        raise UserError(
            f"params.yaml: `checkpoints` does not match suite {suite!r}; run `selfref suite use {suite}`"
        )
    return expected


def find_checkpoint(params: dict[str, Any], name: str) -> Checkpoint:
    """The active suite's checkpoint called `<family>-<variant>`."""
    for ckpt in active_checkpoints(params):
        if ckpt.name == name:
            return ckpt
    known = ", ".join(c.name for c in active_checkpoints(params))
    raise UserError(f"checkpoint {name!r} is not in suite {params.get('suite')!r}; known: {known}")


def families(checkpoints: list[Checkpoint]) -> list[str]:
    """Family names in params order."""
    return list(dict.fromkeys(c.family for c in checkpoints))


def use_suite(name: str, path: Path | None = None) -> list[Checkpoint]:
    """Make `name` the active suite: rewrite `suite` and `checkpoints` in params.yaml, keeping comments."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    path = path or paths.PARAMS
    checkpoints = suite_checkpoints(load(path), name)
    yml = YAML()
    yml.preserve_quotes = True
    yml.width = 4096
    with open(path, encoding="utf-8") as fh:
        doc = yml.load(fh)
    doc["suite"] = name
    entries = CommentedMap()
    for name, entry in checkpoint_entries(checkpoints).items():
        item = CommentedMap(entry)
        item.fa.set_flow_style()
        entries[name] = item
    doc["checkpoints"] = entries
    tmp = path.with_suffix(".yaml.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        yml.dump(doc, fh)
    tmp.replace(path)
    return checkpoints
