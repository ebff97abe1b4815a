"""``trainingd predict``, the ``predict`` trigger and the daemon's hook: settled images are
embedded, then a ``predict`` task predicts their groups (real pipeline, real embedding stage)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from daemon.embedding.stage import candidates_from_roots
from daemon.pipeline import Pipeline
from daemon.predict.cli import EXIT_NO_CHAMPION, add_predict_parser, cmd_predict
from daemon.predict.store import predictions_db
from daemon.store import StateStore
from daemon.tasks import TaskKind
from daemon.triggers import TASK_OF_ACTION, parse_trigger
from daemon.workqueue import Task
from tests import test_predict
from tests.conftest import NOW
from tests.test_predict import plant_champions, run

world = test_predict.world  # the same image root, champions and embedding stage


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_predict_parser(sub, argparse.ArgumentParser(add_help=False))
    return parser.parse_args(argv)


class TestCommand:
    """The command prints what it did and exits 3 when there is no champion."""

    def test_no_champion_exits_3(self, world: dict[str, Any], store: StateStore,
                                 capsys: pytest.CaptureFixture[str]) -> None:
        """No champion: a line that says so, exit 3, no predictions DB."""
        code = cmd_predict(parse(["predict", "--project", "mojo3"]), world["settings"])
        assert code == EXIT_NO_CHAMPION
        assert "nothing predicted: no ranker champion" in capsys.readouterr().out
        assert not predictions_db(world["settings"].data_root, "mojo3").exists()

    def test_bulk_from_cached_vectors(self, world: dict[str, Any], store: StateStore,
                                      capsys: pytest.CaptureFixture[str]) -> None:
        """With every vector cached the command predicts every group and embeds nothing."""
        plant_champions(world["settings"].models_dir, world["emb"].embedder_id, 1)
        world["stage"].run(candidates_from_roots(world["settings"], "mojo3"))
        code = cmd_predict(parse(["predict", "--project", "mojo3", "--bulk", "--json"]),
                           world["settings"])
        text = capsys.readouterr().out
        out = json.loads(text[text.index("{\n"):])  # after any log lines the test stream holds
        assert code == 0 and out["predicted"] == 6 and out["embedded"] == 0

    def test_unknown_project_is_a_config_error(self, world: dict[str, Any]) -> None:
        """A project without a [projects.X] section is refused before anything runs."""
        from daemon.errors import ConfigError

        with pytest.raises(ConfigError, match=r"no \[projects\.nope\]"):
            cmd_predict(parse(["predict", "--project", "nope"]), world["settings"])


class TestTriggerAndHook:
    """The trigger becomes a predict task; an embed task queues one after it."""

    def test_trigger_parses_to_a_predict_task(self, tmp_path: Path) -> None:
        """``predict.json`` with a project and bulk is a valid trigger for the predict kind."""
        action, args = parse_trigger("predict.json", b'{"project": "mojo3", "bulk": true}',
                                     projects={"mojo3"}, roots=[tmp_path])
        assert (action, args) == ("predict", {"project": "mojo3", "bulk": True})
        assert TASK_OF_ACTION["predict"] is TaskKind.PREDICT
        with pytest.raises(ValueError, match="unknown argument 'model'"):
            parse_trigger("predict.json", b'{"model": "x"}', projects={"mojo3"},
                          roots=[tmp_path])

    def test_embed_queues_predict_and_predict_writes(self, world: dict[str, Any],
                                                     store: StateStore) -> None:
        """After the embed of settled images the pipeline queues predict, which writes."""
        plant_champions(world["settings"].models_dir, world["emb"].embedder_id, 1)
        queued: list[Task] = []
        pipe = Pipeline(world["settings"], store, queued.append, clock=lambda: NOW,
                        embedder=world["emb"])
        pipe.run(Task(TaskKind.EMBED, "mojo3"), lambda: False)
        assert [t.kind for t in queued if t.kind == TaskKind.PREDICT] == [TaskKind.PREDICT]
        result = pipe.run(Task(TaskKind.PREDICT, "mojo3"), lambda: False).to_dict()
        assert result["projects"][0]["predicted"] == 6
        assert result["projects"][0]["embedded"] == 0
        again = run(world, store)
        assert again.unchanged == 6
