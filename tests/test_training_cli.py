"""``trainingd train`` and ``trainingd summary`` as the CLI runs them."""

from __future__ import annotations

import argparse

import pytest
import structlog
import structlog.testing

from daemon.settings import Settings
from daemon.store import StateStore
from daemon.summary.cli import add_summary_parser, cmd_summary
from daemon.training.cli import (
    add_train_parser,
    cmd_train,
    metrics_table,
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    add_train_parser(sub, common)
    add_summary_parser(sub, common)
    return parser.parse_args(argv)


class TestTrainCommand:
    def test_not_due_without_labels(self, settings: Settings, store: StateStore,
                                    capsys: pytest.CaptureFixture[str]) -> None:
        """Without labels the policy says not due and the command exits 0."""
        assert cmd_train(parse(["train", "ranker"]), settings) == 0
        assert "not_due" in capsys.readouterr().out

    def test_forced_without_embeddings_fails_softly(
            self, settings: Settings, store: StateStore,
            capsys: pytest.CaptureFixture[str]) -> None:
        """--force runs the child; with no embedding source it reports failure, exit 1."""
        assert cmd_train(parse(["train", "crop", "--force"]), settings) == 1
        assert "crop: failed" in capsys.readouterr().out

    def test_metrics_table_shows_baselines(self) -> None:
        """The ranker table puts the model beside both baselines."""
        fig = {"groups": 10, "anomaly_groups": 2, "top1": 0.9, "top1_normal": 1.0,
               "top1_anomaly": 0.5}
        text = metrics_table("ranker", {"model": fig, "baseline_highest_stage": fig,
                                        "recorded_ai_pick": {}})
        assert text.splitlines()[0].split() == ["holdout", "model", "highest", "stage",
                                                "recorded", "AI"]
        assert "50.0%" in text and text.splitlines()[-1].endswith("-")


class TestSummaryCommand:
    def test_prints_both_paths(self, settings: Settings, store: StateStore,
                               capsys: pytest.CaptureFixture[str]) -> None:
        """The command writes the summary and prints the JSON and Markdown paths (log lines
        go to the log stream, captured here as records, never between the paths)."""
        with structlog.testing.capture_logs() as logs:
            assert cmd_summary(parse(["summary"]), settings) == 0
        out = capsys.readouterr().out.split()
        assert [p.rsplit(".", 1)[1] for p in out] == ["json", "md"]
        assert [e["json"] for e in logs if e["event"] == "summary.written"] == [out[0]]
