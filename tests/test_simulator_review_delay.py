"""The simulated reviewer can review a while after the images appear (issue 13, the demo's live
accuracy): a real simulator process, its WAL DB read as another process would, and the image
root listed while its writer works.

Seen: the simulator committed each group's row in the same step that wrote its images, so a
daemon watching the root never had the time to embed and predict a group before its review,
and the demo's summary never showed a live-accuracy figure.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from daemon.demo.simulator import Simulator, SimulatorConfig
from daemon.predict.grouping import group_names
from tests.test_simulator import PROJECT, procs, read_rows, start, wait_for

__all__ = ["procs"]  # the fixture, shared with test_simulator.py


def waiting_images(root: Path) -> list[str]:
    """The images in the root itself, where the reviewer has not decided on them yet."""
    return sorted(p.name for p in root.glob("*.png"))


class TestReviewDelay:
    """Images first, the row later: the gap a daemon needs to predict the group."""

    def test_rows_come_after_their_images(
        self, tmp_path: Path, procs: list[subprocess.Popen[str]]
    ) -> None:
        """With --review-delay-seconds the group's images wait in the root with no row, then
        the row arrives naming exactly those images (the commit log names each group shown),
        and the run ends cleanly."""
        decisions, images = tmp_path / "decisions", tmp_path / "images"
        db = decisions / f"{PROJECT}.db"
        log = tmp_path / "commits.jsonl"
        proc = start(decisions, images, "--groups", "3", "--rate", "0", "--seed", "3",
                     "--review-delay-seconds", "3", "--crop-delay-seconds", "0.1",
                     "--delete-delay-seconds", "0.1", "--commit-log", str(log))
        procs.append(proc)
        wait_for(lambda: len(group_names(waiting_images(images))) == 3, what="3 groups shown")
        shown = group_names(waiting_images(images))
        assert read_rows(db) == [], "a row was committed before its review delay"
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
        assert [json.loads(r["images"]) for r in read_rows(db)] == shown
        events = [json.loads(line) for line in log.read_text().splitlines()]
        assert [e["names"] for e in events if e["event"] == "images"] == shown
        assert [e["event"] for e in events].index("insert") == 3, "all shown, then reviewed"
        assert waiting_images(images) == [], "every image left the root once reviewed"

    def test_gate_holds_reviews_until_it_exists(
        self, tmp_path: Path, procs: list[subprocess.Popen[str]]
    ) -> None:
        """With --review-gate every group's images appear but no row is written until the
        gate file exists; then all groups are reviewed."""
        decisions, images = tmp_path / "decisions", tmp_path / "images"
        db, gate = decisions / f"{PROJECT}.db", tmp_path / "open"
        proc = start(decisions, images, "--groups", "4", "--rate", "0", "--seed", "4",
                     "--review-gate", str(gate), "--crop-delay-seconds", "0.1",
                     "--delete-delay-seconds", "0.1")
        procs.append(proc)
        wait_for(lambda: len(group_names(waiting_images(images))) == 4, what="4 groups shown")
        assert proc.poll() is None and read_rows(db) == []
        gate.write_text("")
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
        assert len(read_rows(db)) == 4

    def test_negative_delay_is_refused(
        self, tmp_path: Path, procs: list[subprocess.Popen[str]]
    ) -> None:
        """A negative --review-delay-seconds is a usage error (exit 2), not a silent 0."""
        proc = start(tmp_path / "d", tmp_path / "i", "--review-delay-seconds", "-1")
        procs.append(proc)
        assert proc.wait(timeout=60) == 2
        assert "--review-delay-seconds" in (proc.stderr.read() if proc.stderr else "")


class TestWaitingGroupsStayApart:
    """Groups waiting together are the groups the upstream rule finds."""

    def test_upstream_rule_finds_each_waiting_group(self, tmp_path: Path) -> None:
        """40 groups shown behind a closed gate: the ported grouping rule over the root's
        files gives exactly the simulator's groups (without the first-image rule, a group
        of stages 1-1.5 and the next of 2-3 would merge)."""
        config = SimulatorConfig(decisions_dir=tmp_path / "decisions",
                                 image_root=tmp_path / "images", project=PROJECT, groups=40,
                                 rate_per_second=0, seed=9, review_gate=tmp_path / "closed")
        with Simulator(config) as sim:
            while sim.step() == "images":
                pass
            assert sim.reviewed == []
        files = waiting_images(config.image_root)
        groups = group_names(files)
        assert len(groups) == 40 and sum(len(g) for g in groups) == len(files)
        assert all("stage1_generated" in g[0] for g in groups)

    def test_default_is_one_step_per_review(self, tmp_path: Path) -> None:
        """Without a delay or gate each step still shows a group and reviews it at once."""
        config = SimulatorConfig(decisions_dir=tmp_path / "decisions",
                                 image_root=tmp_path / "images", project=PROJECT, groups=3,
                                 rate_per_second=0, seed=2)
        with Simulator(config) as sim:
            assert [sim.step() for _ in range(3)] == ["review"] * 3
            assert waiting_images(config.image_root) == []
