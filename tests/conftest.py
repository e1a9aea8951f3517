"""Suite-wide rule: no test may skip.

Every optional dependency (transformers, scikit-learn, the packaged models, the bundled data) is part of the test
setup (``make test`` installs it), so a skip can only hide a broken setup: a skipped test, doctest or module fails
with the skip's reason. Registered as a plugin (not a plain conftest hook) so it also covers the doctests collected
under ``unipruner/`` and runs inside pytest-xdist workers.
"""

from __future__ import annotations

from typing import Any

import pytest

RULE = "no test may skip (tests/conftest.py): install what it needs (make test does) or fix it"


def _reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])  # (path, line, "Skipped: reason")
    return str(longrepr)


class NoSkips:
    """Turns skip outcomes of tests and of collection into failures."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        rep = yield
        if rep.skipped and not hasattr(rep, "wasxfail"):
            rep.outcome = "failed"
            rep.longrepr = f"{item.nodeid} skipped ({_reason(rep.longrepr)}): {RULE}"
        return rep

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector) -> Any:
        rep = yield
        if rep.skipped:
            rep.outcome = "failed"
            rep.longrepr = f"{collector.nodeid} skipped at collection ({_reason(rep.longrepr)}): {RULE}"
        return rep


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("unipruner-no-skips"):
        config.pluginmanager.register(NoSkips(), "unipruner-no-skips")
