"""Drop-in trigger files: claimed atomically, arguments are data, bad ones fail with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.triggers import TriggerBox, parse_trigger

ROOTS = [Path("/srv/data"), Path("/srv/img")]


class TestParse:
    """The rules for a trigger's name and body."""

    @pytest.mark.parametrize(("name", "body", "expected"), [
        ("validate", b"", ("validate", {})),
        ("validate.json", b'{"project": "mojo3", "full": true}',
         ("validate", {"project": "mojo3", "full": True})),
        ("backfill.json", b'{"csv": ["/srv/data/legacy/a.csv"], "project": "new"}',
         ("backfill", {"csv": ["/srv/data/legacy/a.csv"], "project": "new"})),
        ("pause", b"  \n", ("pause", {})),
    ])
    def test_accepted(self, name: str, body: bytes, expected: tuple[str, dict[str, object]]
                      ) -> None:
        assert parse_trigger(name, body, projects={"mojo3"}, roots=ROOTS) == expected

    @pytest.mark.parametrize(("name", "body", "reason"), [
        ("explode", b"", "unknown action 'explode'"),
        ("retrain.20251125.json", b'{"model": "crop"}', "named exactly '<action>'"),
        ("validate", b"{not json", "not valid JSON"),
        ("validate", b"[1, 2]", "must be a JSON object"),
        ("validate", b'{"project": "nope"}', "unknown project 'nope'"),
        ("validate", b'{"rm": "-rf /"}', "unknown argument 'rm'"),
        ("validate", b'{"full": "yes"}', "full must be a bool"),
        ("embed", b'{"limit": -3}', "non-negative integer"),
        ("retrain", b'{"model": "gpt"}', "model must be one of"),
        ("backfill", b'{"csv": ["/etc/passwd"]}', "outside the configured data roots"),
        ("backfill", b'{"csv": ["/srv/data/../../etc/passwd"]}', "outside"),
        ("backfill", b'{"csv": ["relative.csv"]}', "outside"),
        ("backfill", b'{"out": "/tmp/x.db"}', "outside"),
        ("validate", b"\xff\xfe", "codec"),
    ])
    def test_refused(self, name: str, body: bytes, reason: str) -> None:
        with pytest.raises((ValueError, UnicodeDecodeError), match=reason):
            parse_trigger(name, body, projects={"mojo3"}, roots=ROOTS)


class TestBox:
    """Claim, finish, and recovery after a crash."""

    def make(self, tmp_path: Path) -> TriggerBox:
        return TriggerBox(tmp_path / "triggers", roots=lambda: [tmp_path],
                          projects=lambda: {"mojo3"})

    def test_claim_moves_into_processing_then_done(self, tmp_path: Path) -> None:
        box = self.make(tmp_path)
        (box.folder / "validate.json").write_text('{"project": "mojo3"}')
        (box.folder / ".half-written.tmp").write_text("{")
        (task,) = box.claim()
        assert task.kind == "validate" and task.project == "mojo3" and task.urgent
        claimed = Path(task.trigger or "")
        assert claimed.parent == box.processing and not (box.folder / "validate.json").exists()
        dest = box.finish(claimed, ok=True, result={"rows": 3})
        assert dest == box.done / "validate.json" and dest.read_text() == '{"project": "mojo3"}'
        result = json.loads((box.done / "validate.json.result.json").read_text())
        assert result["status"] == "done" and result["rows"] == 3
        assert (box.folder / ".half-written.tmp").exists()

    def test_bad_trigger_goes_to_failed_with_reason(self, tmp_path: Path) -> None:
        box = self.make(tmp_path)
        (box.folder / "shell").write_text("rm -rf /")
        assert box.claim() == []
        result = json.loads((box.failed / "shell.result.json").read_text())
        assert result["status"] == "failed" and "unknown action 'shell'" in result["error"]
        assert (box.failed / "shell").read_text() == "rm -rf /"

    def test_claim_left_by_a_crash_is_run_again(self, tmp_path: Path) -> None:
        box = self.make(tmp_path)
        (box.processing / "summary").write_text("")
        assert [t.kind for t in box.claim()] == ["summary"]

    def test_same_name_twice_keeps_both_results(self, tmp_path: Path) -> None:
        box = self.make(tmp_path)
        for _ in range(2):
            (box.folder / "reconcile").write_text("")
            (task,) = box.claim()
            box.finish(Path(task.trigger or ""), ok=True, result={})
        assert len([p for p in box.done.iterdir() if p.name.endswith(".result.json")]) == 2
