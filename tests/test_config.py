"""params.yaml is read once into a typed config; every bad value is refused there, in one line that names
the key, the value and what is allowed."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from analysis.core import config
from analysis.core.errors import UserError
from analysis.core.layout import project_paths
from conftest import REPO

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def _parse(**changes):
    """Parse this repo's params with `section.key` values replaced."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        params[section][key] = value
    return config.parse(params, project_paths(REPO))


def test_the_tracked_params_parse():
    cfg = config.load(project_paths(REPO))
    assert cfg.suite == "default" and cfg.stats.definitions == tuple(PARAMS["stats"]["definitions"])
    assert [c.name for c in cfg.checkpoints] == list(PARAMS["checkpoints"])
    # the default suite: the real checkpoints, then the demo families, each written once (a YAML merge key)
    assert cfg.families == [*PARAMS["suites"]["real"]["families"], *PARAMS["suites"]["demo"]["families"]]
    assert cfg.suites["default"] == cfg.suites["real"] + cfg.suites["demo"]
    assert (cfg.figures.width, cfg.figures.columns) == (PARAMS["figures"]["width"], PARAMS["figures"]["columns"])


@pytest.mark.parametrize(("key", "value", "message"), [
    ("stats__alpha", 2, r"stats.alpha: 2 is out of range; use a number > 0 and <= 0.5"),
    ("stats__alpha", 0, r"stats.alpha: 0 is out of range"),
    ("stats__confidence", 1.5, r"stats.confidence: 1.5 is out of range; use a number > 0 and < 1"),
    ("stats__n_resamples", 0, r"stats.n_resamples: 0 is out of range; use a whole number >= 100"),
    ("stats__n_permutations", "many", r"stats.n_permutations: 'many' is not a whole number"),
    ("stats__definitions", ["raw", "entropy"], r"stats.definitions\[1\]: 'entropy' is not allowed; use one of raw"),
    ("stats__headline_definition", "no_bos2", r"stats.headline_definition: 'no_bos2' is not allowed"),
    ("stats__headline_format", "html", r"stats.headline_format: 'html' is not allowed; use one of raw, chat"),
    ("extract__batch_size", 0, r"extract.batch_size: 0 is out of range; use a whole number from 1 to 4096"),
    ("extract__batch_size", -4, r"extract.batch_size: -4 is out of range"),
    ("extract__dtype", "fp8", r"extract.dtype: 'fp8' is not allowed; use one of auto, float32, bfloat16, float16"),
    ("extract__trust_remote_code", "yes", r"extract.trust_remote_code: 'yes' is not true or false"),
    ("extract__cpu_threads", "all", r"extract.cpu_threads: 'all' is not allowed; use auto, a number of threads"),
    ("extract__cpu_threads", 0, r"extract.cpu_threads: 0 is out of range; use a whole number from 1 to 1024"),
    ("prompts__min_per_category", 1.5, r"prompts.min_per_category: 1.5 is not a whole number"),
    ("patch__max_controls", 1, r"patch.max_controls: 1 is out of range; use a whole number >= 2"),
    ("patch__top_k", 0, r"patch.top_k: 0 is out of range"),
    ("patch__noise_floor", {"kl": 1e-6, "entropy_later": -1}, r"patch.noise_floor.entropy_later: -1 is out of range"),
    ("patch__noise_floor", {"kl": 1e-6}, r"patch.noise_floor: .* use a mapping with one floor .* kl, entropy_later"),
    ("stats__noise_floor", 1e-5, r"stats.noise_floor: .* for each of delta_rfc, delta_diff"),
    ("figures__width", 100, r"figures.width: 100 is out of range; use a whole number from 300 to 4000"),
    ("figures__width", "640px", r"figures.width: '640px' is not a whole number"),
    ("figures__columns", 0, r"figures.columns: 0 is out of range; use a whole number from 1 to 8"),
    ("extract__chat_system", "", r"extract.chat_system: '' is not allowed; use default, none, or one fixed system"),
    ("extract__chat_system", None, r"extract.chat_system: None is not allowed"),
    ("extract__chat_system", 3, r"extract.chat_system: 3 is not allowed"),
    ("extract__chat_date", datetime.date(2024, 7, 26), r"extract.chat_date: datetime.date\(2024, 7, 26\) is not "
     r"allowed; leave it empty or write a date as text"),
    ("preflight__flops", {"cuda": 1e14}, r"preflight.flops: use a mapping of device kind \(cpu, cuda, mps\) to "
     r"FLOP/s, with at least cpu"),
    ("preflight__flops", {"cpu": 1e10, "tpu": 1e14}, r"preflight.flops: 'tpu' is not allowed; use one of cpu, cuda"),
    ("preflight__flops", {"cpu": "2.0e14"}, r"preflight.flops.cpu: '2.0e14' is not a number; use a number > 0"),
    ("preflight__flops", {"cpu": 0}, r"preflight.flops.cpu: 0 is out of range; use a number > 0"),
    ("preflight__disk_margin", 0.5, r"preflight.disk_margin: 0.5 is out of range; use a number >= 1"),
    ("preflight__memory_margin", "lots", r"preflight.memory_margin: 'lots' is not a number"),
])
def test_a_bad_setting_is_refused_with_its_key_and_range(key, value, message):
    with pytest.raises(UserError, match=message):
        _parse(**{key: value})


def test_a_misspelt_or_missing_key_is_named():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["stats"]["aplha"] = params["stats"].pop("alpha")
    with pytest.raises(UserError, match=r"stats: missing alpha; unknown aplha"):
        config.parse(params, project_paths(REPO))


def test_the_figures_section_takes_exactly_width_columns_and_height():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["figures"]["depth"] = 300
    with pytest.raises(UserError, match=r"figures: unknown depth; the section takes width, columns, height"):
        config.parse(params, project_paths(REPO))
    del params["figures"]["depth"]
    params["figures"]["height"] = 50
    with pytest.raises(UserError, match=r"figures.height"):
        config.parse(params, project_paths(REPO))
    del params["figures"]
    with pytest.raises(UserError, match=r"figures: missing or not a mapping; restore the `figures:` section"):
        config.parse(params, project_paths(REPO))


def test_an_unknown_suite_and_a_stale_checkpoint_list_name_the_fix():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    with pytest.raises(UserError, match=r"suite: unknown suite 'nosuch'; known: demo, laptop, paper"):
        config.parse({**params, "suite": "nosuch"}, project_paths(REPO))
    with pytest.raises(UserError, match=r"does not match suite 'paper'; run `selfref suite use paper`"):
        config.parse({**params, "suite": "paper"}, project_paths(REPO))
    with pytest.raises(UserError, match=r"families: does not match suite 'default'"):
        config.parse({**params, "families": ["demo_llama"]}, project_paths(REPO))


def test_a_malformed_repo_id_is_refused():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["suites"]["paper"]["families"]["mistral_7b"]["base"]["repo"] = "https://huggingface.co/mistralai"
    with pytest.raises(UserError, match=r"mistral_7b.base.repo: .* is not a Hugging Face repository id"):
        config.parse(params, project_paths(REPO))


def test_invalid_yaml_is_one_line_with_line_and_column(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("suite: demo\nstats:\n  alpha: [0.05\n  seed: 1\n")
    with pytest.raises(UserError) as err:
        config.read_yaml(bad)
    text = str(err.value)
    assert "\n" not in text and "line 4, column" in text and "invalid YAML" in text


@pytest.mark.slow  # runs selfref in a subprocess
def test_cli_prints_one_line_without_traceback_and_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("alpha: 0.05", "alpha: 2"))
    env = {**os.environ, "SELFREF_ROOT": str(tmp_path)}
    env.pop("SELFREF_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "analysis.cli", "stats"], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: params.yaml stats.alpha: 2 is out of range; "
                                                "use a number > 0 and <= 0.5"]
    debug = subprocess.run([sys.executable, "-m", "analysis.cli", "--debug", "stats"], env=env, capture_output=True,
                           text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_suite_use_rewrites_suite_and_checkpoints_keeping_comments(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    paths = project_paths(tmp_path)
    config.use_suite("paper", paths)
    text = (tmp_path / "params.yaml").read_text()
    assert "# Every tunable of the pipeline" in text
    cfg = config.load(paths)
    assert cfg.suite == "paper" and [c.family for c in cfg.checkpoints][::2] == ["mistral_7b", "qwen25_7b", "llama31_8b"]
    assert "families: [mistral_7b, qwen25_7b, llama31_8b]" in text  # one patch@<family> stage each
    with pytest.raises(UserError, match="unknown suite 'nosuch'"):
        config.use_suite("nosuch", paths)


def test_the_chat_format_reads_the_family_instruct_template_and_a_family_without_one_has_none(tmp_path):
    """The chat format of every checkpoint of a family reads the family's instruct template, and a family without
    an instruct checkpoint is extracted in the raw format only."""
    from analysis.verbs.extract import formats_of

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    paths = project_paths(tmp_path)
    config.use_suite("real", paths)
    cfg = config.load(paths)
    entries = yaml.safe_load((tmp_path / "params.yaml").read_text())["checkpoints"]
    assert entries["gemma3_270m_q4-base"] == {"family": "gemma3_270m_q4", "variant": "base"}
    assert cfg.chat_template_source(cfg.checkpoint("gemma3_270m_q4-base")) is None
    assert cfg.chat_template_source(cfg.checkpoint("smollm2_135m_q4-instruct")).name == "smollm2_135m_q4-instruct"
    assert formats_of(cfg, "gemma3_270m_q4-base") == ("raw",)
    assert formats_of(cfg, "smollm2_135m_q4-instruct") == ("raw", "chat")
    config.use_suite("demo", paths)
    cfg = config.load(paths)
    assert cfg.chat_template_source(cfg.checkpoint("demo_stages-sft")).name == "demo_stages-instruct"
    assert formats_of(cfg, "demo_stages-base") == ("raw", "chat")


def test_the_new_extract_and_preflight_settings_are_typed():
    cfg = config.load(project_paths(REPO))
    assert cfg.extract.chat_system == "default" and cfg.extract.chat_date == PARAMS["extract"]["chat_date"]
    assert cfg.preflight.flops["cpu"] == 5.0e10 and cfg.preflight.disk_margin >= 1
    assert _parse(extract__chat_system="You are a helpful assistant.").extract.chat_system == \
        "You are a helpful assistant."
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["extract"]["chat_date"]  # optional: templates without a date ignore it
    assert config.parse(params, project_paths(REPO)).extract.chat_date is None
    params["preflight"]["flop"] = params["preflight"].pop("flops")
    with pytest.raises(UserError, match=r"preflight: missing flops; unknown flop"):
        config.parse(params, project_paths(REPO))


def _with_suite(entries: dict) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["suites"]["mine"] = {"families": {"x": entries}}
    return params


def test_a_local_source_is_validated_and_resolved_from_the_root(tmp_path):
    paths = project_paths(tmp_path)
    bad = _with_suite({"base": {"local": ""}, "instruct": {"local": "models/x-instruct"}})
    with pytest.raises(UserError, match=r"suites.mine.families.x.base.local: '' is not a folder; write the path"):
        config.parse(bad, paths, check_active=False)
    both = _with_suite({"base": {"local": "models/x", "repo": "o/x"}, "instruct": {"local": "models/x-instruct"}})
    with pytest.raises(UserError, match=r"x.base: give one of repo, demo, local, gguf, not repo and local"):
        config.parse(both, paths, check_active=False)
    neither = _with_suite({"base": {"revision": "main"}, "instruct": {"local": "models/x-instruct"}})
    with pytest.raises(UserError, match=r"needs `repo: <owner>/<name>` \(hub\), .*`local: <dir>`.* or `gguf: \{file: \.\.\.\}`"):
        config.parse(neither, paths, check_active=False)
    good = _with_suite({"base": {"local": "models/x"}, "instruct": {"local": str(tmp_path / "abs")}})
    base, instruct = config.parse(good, paths, check_active=False).suites["mine"]
    assert (base.source, base.local, instruct.source) == ("local", "models/x", "local")
    assert paths.local_checkpoint(base.local) == tmp_path / "models" / "x"
    assert paths.local_checkpoint(instruct.local) == tmp_path / "abs"


def test_dvc_reads_the_default_suite_through_the_merge_key():
    """DVC's params reader (ruamel, safe) resolves the `<<:` merge key as our loader does, so the stages' params
    `suites.default.families.<family>.<variant>` exist for the real and the demo families alike."""
    from dvc.utils.serialize import parse_yaml

    params = parse_yaml((REPO / "params.yaml").read_text(encoding="utf-8"), "params.yaml")
    merged = params["suites"]["default"]["families"]
    for suite in ("real", "demo"):
        for family, stages in params["suites"][suite]["families"].items():
            assert merged[family] == stages
