"""Pipeline stages beyond validation: the audit pass (newly flagged rows go to the configured
hook, an argv never a shell; verdicts kept, tokens counted per day, paused above the soft
limit) and bad images recorded as issues."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from daemon.pipeline import Pipeline
from daemon.settings import Settings
from daemon.store import StateStore
from daemon.training.audit import audit_budget
from daemon.validation import Validator
from daemon.workqueue import Task
from tests.conftest import NOW

HOOK = """\
import json, sys
rows = json.load(sys.stdin)["rows"]
print(json.dumps({"verdicts": [{"group_id": r["group_id"], "code": r["code"], "ok": False}
                               for r in rows], "tokens_used": TOKENS}))
"""


def with_hook(settings: Settings, tmp_path: Path, tokens: int, soft_limit: int) -> Settings:
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK.replace("TOKENS", str(tokens)))
    new = settings.model_copy(update={"audit": settings.audit.model_copy(update={
        "command": [sys.executable, str(hook)], "soft_limit_tokens_per_day": soft_limit,
        "max_rows_per_call": 5})})
    new._base_dir = settings.base_dir
    return new


class TestAuditPass:
    """Flagged rows, verdicts, and the token budget."""

    def test_flagged_rows_reach_the_hook_once(self, make_db: Any, settings: Settings,
                                              store: StateStore, tmp_path: Path) -> None:
        db = make_db(checks=False)
        db.insert_many(5)
        for _ in range(3):
            db.insert(user_action="crop", final_crop_coords="[0.1, 0.1, 0.9, 0.5]",
                      crop_timestamp="2025-10-24T10:00:00Z")  # crop_aspect_mismatch: warning
        s = with_hook(settings, tmp_path, tokens=700, soft_limit=10_000)
        Validator(store, s, clock=lambda: NOW).validate_all()
        pipe = Pipeline(s, store, lambda task: None, clock=lambda: NOW)
        first = pipe.handle(Task("audit"), lambda: False)
        assert first == {"status": "ok", "rows": 3, "tokens": 700}
        verdicts = [json.loads(x) for x in
                    (s.summaries_dir / "audit_verdicts.jsonl").read_text().splitlines()]
        assert {v["verdict"]["code"] for v in verdicts} == {"crop_aspect_mismatch"}
        assert pipe.handle(Task("audit"), lambda: False) == {"status": "nothing flagged"}
        budget = audit_budget(store, s, NOW)
        assert (budget.tokens_used, budget.calls, budget.paused) == (700, 1, False)

    def test_audits_pause_above_the_soft_limit(self, make_db: Any, settings: Settings,
                                               store: StateStore, tmp_path: Path) -> None:
        db = make_db(checks=False)
        for _ in range(12):
            db.insert(user_action="crop", final_crop_coords="[0.1, 0.1, 0.9, 0.5]",
                      crop_timestamp="2025-10-24T10:00:00Z")
        s = with_hook(settings, tmp_path, tokens=6_000, soft_limit=10_000)
        Validator(store, s, clock=lambda: NOW).validate_all()
        pipe = Pipeline(s, store, lambda task: None, clock=lambda: NOW)
        assert pipe.handle(Task("audit"), lambda: False)["status"] == "ok"  # 6,000
        assert pipe.handle(Task("audit"), lambda: False)["status"] == "ok"  # 12,000: warned
        third = pipe.handle(Task("audit"), lambda: False)
        assert third["status"] == "paused" and third["tokens"] == 0
        assert audit_budget(store, s, NOW).paused


class TestImageIssues:
    """Bad images reach the issue table (and the inspection report) like bad rows do."""

    def test_bad_image_becomes_an_issue_and_leaves_when_fixed(
        self, settings: Settings, store: StateStore, tmp_path: Path
    ) -> None:
        from PIL import Image

        from daemon.images import ImageIndex
        from tests.embedding_helpers import tiny_embedder, with_embedding

        root = tmp_path / "photos"
        root.mkdir()
        good, bad = root / "20250101_000000_stage2_upscaled.png", root / "broken.png"
        Image.new("RGB", (40, 60), (200, 10, 10)).save(good)
        bad.write_bytes(b"")
        s = with_embedding(settings, {"p": [root]})
        pipe = Pipeline(s, store, lambda task: None, clock=lambda: NOW,
                        embedder=tiny_embedder(s))
        with store.transaction():
            for path in (good, bad):
                ImageIndex(store).observe("p", path, NOW)
        pipe.handle(Task("embed", "p"), lambda: False)
        (issue,) = store.issues("p")
        assert issue.code == "image_empty" and issue.db_file == str(bad)
        Image.new("RGB", (40, 60), (10, 200, 10)).save(bad)
        with store.transaction():
            ImageIndex(store).observe("p", bad, NOW)
        pipe.handle(Task("embed", "p"), lambda: False)
        assert store.issues("p") == []
