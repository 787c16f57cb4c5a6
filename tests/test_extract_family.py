"""The extract@<family> stage's folders hold the family's current checkpoints only."""

from __future__ import annotations

from analysis.core import config
from analysis.core.layout import project_paths
from conftest import REPO


def test_a_checkpoint_taken_out_of_its_family_leaves_nothing_in_the_family_folders(tmp_path):
    from analysis.verbs.extract import remove_former_members

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    paths = project_paths(tmp_path)
    config.use_suite("demo", paths)
    cfg = config.load(paths)
    current = [c.name for c in cfg.family_checkpoints("demo_llama")]
    assert current == ["demo_llama-base", "demo_llama-instruct"]
    written = []
    for name in [*current, "demo_llama-sft"]:  # demo_llama-sft: a stage the family had before
        for path in (paths.manifest(name), paths.residual_file(name), paths.entropy_table(name, "raw")):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
            written.append(path)
    other = paths.manifest("demo_qwen-base")  # another family's folder is not this stage's to clean
    other.parent.mkdir(parents=True)
    other.write_text("x")
    remove_former_members(cfg, "demo_llama")
    kept = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.joinpath("data").rglob("*") if p.is_file())
    assert kept == sorted(str(p.relative_to(tmp_path)) for p in [*written[:6], other])
    assert not paths.entropy_tables("demo_llama-sft").exists()
