"""The command line: the registry table and the demo on the real packaged MiniLM."""

from __future__ import annotations

import re

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
