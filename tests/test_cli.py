"""The command line: the registry table and the demo on the real packaged MiniLM."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from typer.testing import CliRunner

from unipruner import methods
from unipruner.cli import app

runner = CliRunner()


def test_methods_table_lists_the_registry() -> None:
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for m in methods():
        assert m.name in result.output
    assert f"unipruner methods ({len(methods())})" in result.output


def test_methods_filters_and_errors() -> None:
    result = runner.invoke(app, ["methods", "--family", "diversity"], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and "divprune" in result.output and "snapkv" not in result.output
    bad = runner.invoke(app, ["methods", "--family", "magic"])
    assert bad.exit_code == 2 and "unknown family" in bad.output


def _listed(output: str) -> set[str]:
    """Method names in the first column of the table (a name is never wrapped)."""
    names = {m.name for m in methods()}
    return {line.split()[0] for line in output.splitlines() if line.split() and line.split()[0] in names}


def test_methods_domain_lists_exactly_what_the_domain_accepts() -> None:
    from unipruner.adapters.colbert import accepted_methods
    from unipruner.adapters.kv_cache import KV_METHODS
    from unipruner.adapters.rag import SCORERS
    from unipruner.adapters.vit import VIT_METHODS
    from unipruner.adapters.vlm import VLM_METHODS

    for domain, accepted in (("rag", set(SCORERS)), ("colbert", set(accepted_methods())), ("vit", set(VIT_METHODS)),
                             ("kv", set(KV_METHODS)), ("vlm", set(VLM_METHODS))):
        result = runner.invoke(app, ["methods", "--domain", domain], env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        assert _listed(result.output) == accepted == {m.name for m in methods(domain=domain)}


def test_methods_table_fits_80_columns() -> None:
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    assert _listed(result.output) == {m.name for m in methods()}


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and re.match(r"unipruner \d+\.\d+", result.output)


def test_demo_core_section_runs_on_real_minilm() -> None:
    result = runner.invoke(app, ["demo", "--section", "core"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("evit", "tome", "divprune", "zero_tprune", "random"):
        assert name in result.output
    assert "keeping 25%" in result.output


def test_demo_kv_section_answers_from_half_the_cache() -> None:
    result = runner.invoke(app, ["demo", "--section", "kv"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "snapkv 50%" in result.output and "1967" in result.output
    assert re.search(r"snapkv 50%.*\b(49|50|51)%", result.output)


def test_demo_vit_section_merges_to_a_quarter_of_the_patches() -> None:
    result = runner.invoke(app, ["demo", "--section", "vit"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "197 / 197 / 197" in result.output  # the unpatched row
    assert re.search(r"tome\s.*\b50\b", result.output)  # 197 -> 50 tokens after block 12 at ratio 0.25


def test_demo_rag_section_reports_the_achieved_budget_and_survival() -> None:
    result = runner.invoke(app, ["demo", "--section", "rag"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert re.search(r"kept \d+/\d+ tokens \((2[45]\.\d)%", result.output), result.output
    assert "survived:" in result.output


def test_demo_vlm_section_answers_with_fewer_visual_tokens() -> None:
    result = runner.invoke(app, ["demo", "--section", "vlm"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert re.search(r"\(25%\)", result.output) and re.search(r"\(11%\)", result.output), result.output
    assert "vlm_kept_patches.png" in result.output


def test_demo_diffusion_section_runs_every_method_on_the_offline_pipeline() -> None:
    result = runner.invoke(app, ["demo", "--section", "diffusion"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("unpatched", "tomesd", "todo"):
        assert re.search(rf"\b{name}\s.*\d\.\d{{3}}", result.output), result.output
    assert "keeping 25%" in result.output and "diffusion_merged_tokens.png" in result.output
    assert (Path(tempfile.gettempdir()) / "unipruner-demo" / "diffusion_merged_tokens.png").stat().st_size > 1000


def test_demo_every_adapter_has_a_section_and_unknown_sections_are_refused() -> None:
    from unipruner.demo import SECTIONS

    assert [name for name, _ in SECTIONS] == ["core", "kv", "vit", "rag", "colbert", "vlm", "diffusion"]
    bad = runner.invoke(app, ["demo", "--section", "vits"])
    assert bad.exit_code == 2 and "unknown demo section" in bad.output and "'vit'" in bad.output


def test_adapters_are_reachable_from_the_package_root() -> None:
    import unipruner

    assert callable(unipruner.kv.compress) and callable(unipruner.vit.patch)
    assert callable(unipruner.rag.ContextPruner) and callable(unipruner.colbert.compress)
    assert callable(unipruner.vlm.patch) and callable(unipruner.vlm.visualize)
