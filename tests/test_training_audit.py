"""The audit hook and its per-day token ledger."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

from daemon.settings import AuditSettings, Settings
from daemon.store import StateStore
from daemon.training.audit import audit_budget, run_audit
from tests.conftest import NOW

HOOK = """
import json, sys, time
rows = json.load(sys.stdin)["rows"]
if rows and rows[0].get("hang"):
    time.sleep(60)
print(json.dumps({"verdicts": [{"group_id": r["group_id"], "ok": True} for r in rows],
                  "tokens_used": 6000}))
"""


def with_hook(settings: Settings, tmp_path: Path, **kw: object) -> Settings:
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    audit = AuditSettings(command=[sys.executable, str(hook)], **kw)  # type: ignore[arg-type]
    new = settings.model_copy(update={"audit": audit})
    new._base_dir = settings.base_dir
    return new


class TestAudit:
    def test_no_hook_configured(self, settings: Settings, store: StateStore) -> None:
        """Without a command nothing runs and nothing is spent."""
        assert run_audit(store, settings, [{"group_id": "g"}], NOW).status == "disabled"
        assert audit_budget(store, settings, NOW).tokens_used == 0

    def test_ledger_warns_then_pauses_until_the_next_day(
            self, settings: Settings, store: StateStore, tmp_path: Path) -> None:
        """Tokens add up per day; past the soft limit audits pause until the next day."""
        s = with_hook(settings, tmp_path)
        first = run_audit(store, s, [{"group_id": "g1"}, {"group_id": "g2"}], NOW)
        assert first.status == "ok" and first.tokens_used == 6000
        assert first.verdicts == [{"group_id": "g1", "ok": True}, {"group_id": "g2", "ok": True}]
        assert run_audit(store, s, [{"group_id": "g3"}], NOW).status == "ok"
        budget = audit_budget(store, s, NOW)
        assert (budget.tokens_used, budget.calls, budget.warning, budget.paused) == \
            (12_000, 2, True, True)
        assert run_audit(store, s, [{"group_id": "g4"}], NOW).status == "paused"
        tomorrow = NOW + timedelta(days=1)
        assert audit_budget(store, s, tomorrow).paused is False
        assert run_audit(store, s, [{"group_id": "g5"}], tomorrow).status == "ok"

    def test_hook_past_its_timeout_is_killed(self, settings: Settings, store: StateStore,
                                             tmp_path: Path) -> None:
        """A hanging hook is stopped at the timeout and costs nothing."""
        s = with_hook(settings, tmp_path, timeout_seconds=1.0)
        result = run_audit(store, s, [{"group_id": "g", "hang": True}], NOW)
        assert result.status == "timeout"
        assert audit_budget(store, s, NOW).calls == 0

    def test_rows_are_capped_per_call(self, settings: Settings, store: StateStore,
                                      tmp_path: Path) -> None:
        """At most max_rows_per_call rows go to the hook."""
        s = with_hook(settings, tmp_path, max_rows_per_call=2)
        result = run_audit(store, s, [{"group_id": f"g{i}"} for i in range(5)], NOW)
        assert len(result.verdicts) == 2
        assert json.loads(json.dumps(result.verdicts))[1]["group_id"] == "g1"
