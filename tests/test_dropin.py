"""The drop-in export (issue 13, item 1): the champion reaches exactly the files the upstream
reviewer loads, in a form its own classes load with ``strict=True``, the file it replaces is
kept, ``trainingd models`` says what the reviewer has, and ``models rollback`` gives it back.

The reviewer's classes are restated here from reading the upstream repository
(``scripts/01_ai_assisted_reviewer.py`` in eriksjaastad/image-workflow-scripts): layer shapes
only.  It loads ``<root>/data/ai_data/models/ranker_v3_w10.pt`` into a 512-input scorer and
``crop_proposer_v2.pt`` into a 514-input crop net (embedding + ``[w/2048, h/2048]``) with
``torch.load(path, map_location=device)`` and the default (strict) ``load_state_dict``, takes the
argmax of the scores and reads the crop net's raw output as ``x1, y1, x2, y2``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs
from torch import nn

from daemon.settings import Settings
from daemon.training import dropin, registry
from daemon.training.models import CropNet, Scorer

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)


# -- the upstream reviewer's networks, restated (layer shapes only) ---------------------------

class ReviewerRanker(nn.Module):
    """The reviewer's scorer: 512 -> 256 -> 64 -> 1 under ``net`` (dropout at index 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x).squeeze(-1)
        return out


class ReviewerCrop(nn.Module):
    """The reviewer's crop net: 514 -> 512 -> 256 -> 128 -> 4, Sigmoid, under ``net``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(514, 512), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 4), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def load_as_reviewer(cls: type[nn.Module], path: Path) -> nn.Module:
    """As the reviewer does: plain ``torch.load`` with a map_location, strict load."""
    model = cls()
    model.load_state_dict(torch.load(path, map_location="cpu"), strict=True)
    model.eval()
    return model


# -- helpers ----------------------------------------------------------------------------

def reviewer_settings(settings: Settings, **reviewer: Any) -> Settings:
    new = settings.model_copy(update={"reviewer": settings.reviewer.model_copy(update=reviewer)})
    new._base_dir = settings.base_dir
    return new


def exported_meta(kind: str, version: int) -> dict[str, Any]:
    """A version's metadata as core writes it, with test-side figures and a passed export."""
    comparisons = [{"challenger": 0.93, "other": 0.88, "against": "baseline highest_stage",
                    "n": 140, "difference": 0.05, "ci_low": 0.01, "ci_high": 0.09,
                    "alpha": 0.05, "p": 0.01, "test": "mcnemar"}]
    decision = {"promoted": True, "metric": "top1" if kind == "ranker" else "mean_iou",
                "n_test": 140, "best_baseline": "highest_stage", "comparisons": comparisons}
    prefix = registry.PREFIX[kind]
    return {"kind": kind, "version": version, "file": f"{prefix}_v{version}.pt",
            "created_at": "2026-12-01T14:00:00Z", "embedder_id": "ViT-B-32/openai",
            "embedder_random": False, "promoted": True, "promotion_reason": "beats both",
            "architecture": {"in_features": 512 if kind == "ranker" else 514, "dropout": 0.2},
            "metrics": {"model": {"top1": 0.93, "mean_iou": 0.81}}, "promotion": decision,
            "test_size": 140,
            "reviewer_export": {"exported": True, "decision": decision, "metrics": {"top1": 0.93},
                                "evaluated_as": "argmax"}}


def promote(settings: Settings, kind: str, version: int, now: datetime = T0,
            seed: int | None = None) -> dict[str, torch.Tensor]:
    """Register and promote ``version`` with reviewer-format weights, as core does."""
    torch.manual_seed(version if seed is None else seed)
    net = Scorer(512) if kind == "ranker" else CropNet(514)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    meta = exported_meta(kind, version)
    registry.save_model(settings.models_dir, kind, version, state, meta)
    registry.promote(settings.models_dir, kind, version, state, meta, now,
                     reviewer=(state, registry.reviewer_metadata(meta)),
                     dropin=registry.dropin_target(settings))
    return state


def state_bytes(state: dict[str, torch.Tensor]) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_mode, p.lstat().st_size,
                                       p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``trainingd`` in a real child process, on a config that points at this test's tree."""
    cfg = settings.base_dir / "dropin.toml"
    lines = [f'[paths]\ndata_root = "{settings.data_root}"\n[reviewer]\n']
    if settings.reviewer.models_dir is not None:
        lines.append(f'models_dir = "{settings.reviewer_dir}"\n')
    lines.append(f"backups_kept = {settings.reviewer.backups_kept}\n")
    cfg.write_text("".join(lines))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAININGD_")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "daemon", *args, "--config", str(cfg)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- tests ----------------------------------------------------------------------------

class TestTheReviewerLoadsTheExport:
    """The files the reviewer loads are trainingd's champion, loadable by its own classes."""

    def test_ranker_file_loads_strict_and_picks_what_trainingd_picks(
            self, settings: Settings) -> None:
        """ranker_v3_w10.pt loads strictly into the reviewer's 512-input scorer and its argmax
        over each group's vectors equals trainingd's own scorer's pick."""
        settings.models_dir.mkdir(parents=True)
        promote(settings, "ranker", 1)
        path = settings.reviewer_dir / "ranker_v3_w10.pt"
        theirs = load_as_reviewer(ReviewerRanker, path)
        ours = Scorer(512)
        ours.load_state_dict(registry.load_state(registry.reviewer_paths(
            settings.models_dir, "ranker")[0]))
        ours.eval()
        rng = np.random.default_rng(0)
        with torch.no_grad():
            for size in [2, 3, 4] * 40:
                vecs = torch.from_numpy(rng.standard_normal((size, 512)).astype(np.float32))
                vecs = vecs / vecs.norm(dim=-1, keepdim=True)
                assert int(theirs(vecs).argmax()) == int(ours(vecs).argmax())
                assert torch.equal(theirs(vecs), ours(vecs))

    def test_crop_file_loads_strict_and_boxes_equal_trainingds(self, settings: Settings) -> None:
        """crop_proposer_v2.pt loads strictly into the reviewer's 514-input crop net and its raw
        boxes for embedding + [w/2048, h/2048] equal trainingd's crop net's."""
        settings.models_dir.mkdir(parents=True)
        state = promote(settings, "crop", 1)
        theirs = load_as_reviewer(ReviewerCrop, settings.reviewer_dir / "crop_proposer_v2.pt")
        ours = CropNet(514)
        ours.load_state_dict(state)
        ours.eval()
        rng = np.random.default_rng(1)
        emb = torch.from_numpy(rng.standard_normal((200, 512)).astype(np.float32))
        dims = torch.from_numpy(rng.integers(512, 4096, (200, 2)).astype(np.float32)) / 2048.0
        x = torch.cat([emb / emb.norm(dim=-1, keepdim=True), dims], dim=1)
        with torch.no_grad():
            assert torch.equal(theirs(x), ours(x))

    @pytest.mark.slow
    def test_a_trained_champion_reaches_the_reviewers_file(self, settings: Settings,
                                                           make_db: Any, validator: Any) -> None:
        """A real training run on planted data: the promoted scorer is written to
        ranker_v3_w10.pt, loads strictly into the reviewer's class, picks what trainingd's
        reviewer-format scorer picks on every training group, and our metadata names the
        version, the embedder and the file's sha256."""
        from daemon.training.runner import train_model
        from tests.test_training_helpers import MemorySource
        from tests.test_training_truth import planted_groups, tuned, write_planted

        source = MemorySource("planted-synthetic-512")
        groups = planted_groups(650, 512, seed=1)
        write_planted(make_db("planted"), source, groups)
        validator.validate_all()
        out = train_model(tuned(settings), "ranker", force=True, vectors=source)
        assert out.status == "promoted" and out.reviewer_export["exported"], out.reason
        path = settings.reviewer_dir / "ranker_v3_w10.pt"
        theirs = load_as_reviewer(ReviewerRanker, path)
        ours = Scorer(512)
        ours.load_state_dict(registry.load_state(settings.models_dir / "reviewer" / "ranker.pt"))
        ours.eval()
        with torch.no_grad():
            for g in groups:
                vecs = torch.from_numpy(g["vectors"])
                assert int(theirs(vecs).argmax()) == int(ours(vecs).argmax())
        meta = json.loads((settings.reviewer_dir / "ranker_v3_w10.trainingd.json").read_text())
        assert meta["version"] == out.version
        assert meta["embedder_id"] == "planted-synthetic-512"
        assert meta["sha256"] == dropin.file_sha256(path)
        assert meta["test"]["n"] >= 100


class TestBackupsAndRollback:
    """The replaced file is kept, and a rollback gives it back and can itself be undone."""

    def test_replaced_file_is_kept_as_a_dated_backup(self, settings: Settings) -> None:
        """The reviewer's own model and metadata before trainingd's first export: the model is
        kept byte for byte in trainingd-backups/, its metadata file is never touched."""
        folder = settings.reviewer_dir
        folder.mkdir(parents=True)
        (folder / "ranker_v3_w10.pt").write_bytes(b"the reviewer's own ranker")
        (folder / "ranker_v3_w10_metadata.json").write_text('{"theirs": true}')
        promote(settings, "ranker", 1)
        backups = sorted((folder / "trainingd-backups").glob("ranker_v3_w10.pt.*.bak"))
        assert [p.name for p in backups] == ["ranker_v3_w10.pt.2026-12-01T150000Z.bak"]
        assert backups[0].read_bytes() == b"the reviewer's own ranker"
        assert (folder / "ranker_v3_w10_metadata.json").read_text() == '{"theirs": true}'
        assert (folder / "ranker_v3_w10.pt").read_bytes() != b"the reviewer's own ranker"

    def test_backups_are_capped(self, settings: Settings) -> None:
        """With backups_kept = 2, five exports leave the two newest backups."""
        s = reviewer_settings(settings, backups_kept=2)
        s.models_dir.mkdir(parents=True)
        for v in range(1, 6):
            promote(s, "ranker", v, T0 + timedelta(minutes=v))
        names = sorted(p.name for p in (s.reviewer_dir / "trainingd-backups").glob("*.bak"))
        assert names == ["ranker_v3_w10.pt.2026-12-01T150400Z.bak",
                         "ranker_v3_w10.pt.2026-12-01T150500Z.bak"]

    @pytest.mark.slow
    def test_rollback_restores_the_previous_file_and_records_it(self, settings: Settings
                                                                ) -> None:
        """v1 then v3 exported: `models rollback ranker` puts v1's bytes back, exits 0, and the
        listing, our metadata and the registry's reviewer copy all say v1."""
        settings.models_dir.mkdir(parents=True)
        v1 = state_bytes(promote(settings, "ranker", 1))
        promote(settings, "ranker", 3, T0 + timedelta(minutes=1))
        done = cli(settings, "models", "rollback", "ranker")
        assert done.returncode == 0, done.stderr
        assert "trainingd v1 again" in done.stdout
        path = settings.reviewer_dir / "ranker_v3_w10.pt"
        assert path.read_bytes() == v1
        meta = json.loads((settings.reviewer_dir / "ranker_v3_w10.trainingd.json").read_text())
        assert meta["version"] == 1 and meta["sha256"] == dropin.file_sha256(path)
        assert (settings.models_dir / "reviewer" / "ranker.pt").read_bytes() == v1
        listed = json.loads(cli(settings, "models", "--json").stdout)
        reviewer = listed["kinds"]["ranker"]["reviewer"]
        assert reviewer["version"] == 1 and reviewer["state"].startswith("matches")

    @pytest.mark.slow
    def test_a_rollback_can_be_undone(self, settings: Settings) -> None:
        """rollback then rollback --undo: the reviewer has v2 again, byte for byte."""
        settings.models_dir.mkdir(parents=True)
        promote(settings, "ranker", 1)
        v3 = state_bytes(promote(settings, "ranker", 3, T0 + timedelta(minutes=1)))
        assert cli(settings, "models", "rollback", "ranker").returncode == 0
        undone = cli(settings, "models", "rollback", "ranker", "--undo")
        assert undone.returncode == 0, undone.stderr
        assert (settings.reviewer_dir / "ranker_v3_w10.pt").read_bytes() == v3
        again = cli(settings, "models", "rollback", "ranker", "--undo")
        assert again.returncode == 1 and "no rollback of ranker to undo" in again.stderr

    def test_nothing_to_roll_back_exits_1(self, settings: Settings) -> None:
        """A kind trainingd never replaced: exit 1, a sentence, nothing written."""
        settings.models_dir.mkdir(parents=True)
        before = snapshot(settings.data_root)
        done = cli(settings, "models", "rollback", "crop")
        assert done.returncode == 1
        assert "nothing to roll back for crop" in done.stderr
        assert snapshot(settings.data_root).keys() - before.keys() <= {
            "ai_data/models/.reviewer_exports.lock", "ai_data/models/reviewer_exports.json"}

    def test_missing_reviewer_folder_is_a_config_error(self, settings: Settings) -> None:
        """reviewer.models_dir naming no folder: rollback exits 78 naming the key; the folder
        is not created."""
        s = reviewer_settings(settings, models_dir=settings.data_root / "no-such-reviewer")
        done = cli(s, "models", "rollback", "ranker")
        assert done.returncode == 78, done.stderr
        assert "reviewer.models_dir" in done.stderr
        assert not (settings.data_root / "no-such-reviewer").exists()


class TestChangesOutsideTrainingd:
    """A file someone else changed or removed is reported, and never lost."""

    @pytest.mark.slow
    def test_a_file_changed_outside_is_reported_and_listing_writes_nothing(
            self, settings: Settings) -> None:
        """The reviewer's file overwritten by hand: `trainingd models` says "changed outside
        trainingd" and leaves every file as it was."""
        settings.models_dir.mkdir(parents=True)
        promote(settings, "ranker", 1)
        (settings.reviewer_dir / "ranker_v3_w10.pt").write_bytes(b"hand-made")
        before = snapshot(settings.data_root)
        listed = cli(settings, "models", "--json")
        assert listed.returncode == 0, listed.stderr
        reviewer = json.loads(listed.stdout)["kinds"]["ranker"]["reviewer"]
        assert reviewer["state"] == "changed outside trainingd"
        assert reviewer["version"] is None
        text = cli(settings, "models")
        assert "ranker_v3_w10.pt: changed outside trainingd" in text.stdout
        assert snapshot(settings.data_root) == before

    @pytest.mark.slow
    def test_the_next_export_backs_up_the_outside_file(self, settings: Settings) -> None:
        """Then v2 is exported: the hand-made file is in the backups, and a rollback brings it
        back."""
        settings.models_dir.mkdir(parents=True)
        promote(settings, "ranker", 1)
        path = settings.reviewer_dir / "ranker_v3_w10.pt"
        path.write_bytes(b"hand-made")
        promote(settings, "ranker", 3, T0 + timedelta(minutes=1))
        kept = [p.read_bytes() for p in (settings.reviewer_dir / "trainingd-backups")
                .glob("*.bak")]
        assert b"hand-made" in kept
        assert cli(settings, "models", "rollback", "ranker").returncode == 0
        assert path.read_bytes() == b"hand-made"
        assert not (settings.reviewer_dir / "ranker_v3_w10.trainingd.json").exists()

    def test_a_removed_file_reads_as_missing(self, settings: Settings) -> None:
        """The reviewer's file deleted by hand: the listing says missing (rules only)."""
        settings.models_dir.mkdir(parents=True)
        promote(settings, "crop", 1)
        (settings.reviewer_dir / "crop_proposer_v2.pt").unlink()
        doc = json.loads(cli(settings, "models", "--json").stdout)
        assert doc["kinds"]["crop"]["reviewer"]["state"].startswith("missing")

    def test_missing_reviewer_folder_skips_the_export_not_the_promotion(
            self, settings: Settings) -> None:
        """reviewer.models_dir naming no folder: the champion is promoted for trainingd, the
        export is skipped with a log record naming the key, and no folder is created."""
        s = reviewer_settings(settings, models_dir=settings.data_root / "no-such-reviewer")
        s.models_dir.mkdir(parents=True)
        with capture_logs() as logs:
            promote(s, "ranker", 1)
        assert registry.champion_version(s.models_dir, "ranker") == 1
        assert not (settings.data_root / "no-such-reviewer").exists()
        skipped = [e for e in logs if e["event"] == "dropin.export_skipped"]
        assert skipped and skipped[0]["key"] == "reviewer.models_dir"
        doc = json.loads(cli(s, "models", "--json").stdout)
        assert doc["kinds"]["ranker"]["reviewer"]["state"] == "folder missing"


class TestHostileFiles:
    """Something other than a model file where the reviewer's file should be."""

    def test_a_fifo_in_place_fails_the_export_not_the_promotion(self, settings: Settings
                                                                ) -> None:
        """ranker_v3_w10.pt is a FIFO: nothing blocks, the FIFO is left as it is, the export is
        logged as failed, the champion still moves, the listing says unreadable, a rollback
        exits 74 with a sentence."""
        settings.models_dir.mkdir(parents=True)
        fifo = settings.reviewer_dir / "ranker_v3_w10.pt"
        os.mkfifo(fifo)
        with capture_logs() as logs:
            promote(settings, "ranker", 1)
        assert registry.champion_version(settings.models_dir, "ranker") == 1
        assert stat.S_ISFIFO(fifo.lstat().st_mode)
        failed = [e for e in logs if e["event"] == "dropin.export_failed"]
        assert failed and "FIFO" in failed[0]["error"]
        doc = json.loads(cli(settings, "models", "--json").stdout)
        assert doc["kinds"]["ranker"]["reviewer"]["state"].startswith("unreadable")
        done = cli(settings, "models", "rollback", "ranker")
        assert done.returncode == 74 and "cannot roll back ranker" in done.stderr

    def test_a_damaged_ledger_is_read_without_failing(self, settings: Settings) -> None:
        """A ledger whose states are not objects: the listing and the next export go on."""
        settings.models_dir.mkdir(parents=True)
        (settings.models_dir / dropin.LEDGER).write_text(
            '{"ranker": {"states": [1, "x", null], "rolled_back": 7}}')
        promote(settings, "ranker", 1)
        doc = json.loads(cli(settings, "models", "--json").stdout)
        assert doc["kinds"]["ranker"]["reviewer"]["state"] == "matches"


class TestNames:
    """The reviewer's names and trainingd's registry never collide."""

    def test_registry_never_uses_or_reads_the_reviewers_crop_name(self, settings: Settings
                                                                  ) -> None:
        """Registry and reviewer share data/ai_data/models: after crop v1 the next version is 3
        (crop_proposer_v2.pt is the reviewer's), and the reviewer's own crop_proposer_v2 files
        are not listed as a trainingd version."""
        folder = settings.models_dir
        folder.mkdir(parents=True)
        (folder / "crop_proposer_v2.pt").write_bytes(b"the reviewer's crop net")
        (folder / "crop_proposer_v2_metadata.json").write_text('{"theirs": true}')
        promote(settings, "crop", 1)
        assert registry.next_version(folder, "crop") == 3
        assert registry.versions(folder, "crop") == [1]
        assert [m["version"] for m in registry.all_metadata(folder, "crop")] == [1]
        assert json.loads((folder / "crop_proposer_v2_metadata.json").read_text()) == {
            "theirs": True}

    def test_a_configured_name_the_registry_uses_is_refused(self, settings: Settings) -> None:
        """reviewer.ranker_file = "ranker_v7.pt" in the registry's folder would be overwritten
        by trainingd's own version 7: the export is skipped with a reason naming the key."""
        s = reviewer_settings(settings, ranker_file="ranker_v7.pt")
        s.models_dir.mkdir(parents=True)
        with capture_logs() as logs:
            promote(s, "ranker", 1)
        assert not (s.models_dir / "ranker_v7.pt").exists()
        reasons = [e.get("reason", "") for e in logs if e["event"] == "dropin.export_skipped"]
        assert reasons and "reviewer.ranker_file" in reasons[0]


class TestListing:
    """`trainingd models` shows versions, champion, figures and what the reviewer has."""

    def test_lists_figures_champion_and_a_matching_reviewer_file(self, settings: Settings
                                                                 ) -> None:
        """Per version: test-side score, best baseline and its score, n and the difference's
        CI; the champion; the reviewer's file as trainingd v1 with a matching sha256."""
        settings.models_dir.mkdir(parents=True)
        promote(settings, "ranker", 1)
        done = cli(settings, "models", "--json")
        assert done.returncode == 0, done.stderr
        ranker = json.loads(done.stdout)["kinds"]["ranker"]
        assert ranker["champion"] == 1
        row = ranker["versions"][0]
        assert (row["score"], row["best_baseline"], row["baseline_score"], row["n"]) == (
            0.93, "highest_stage", 0.88, 140)
        assert row["ci"] == [0.01, 0.09]
        assert ranker["reviewer"]["state"] == "matches"
        assert ranker["reviewer"]["sha256"] == dropin.file_sha256(
            settings.reviewer_dir / "ranker_v3_w10.pt")
        text = cli(settings, "models").stdout
        assert "trainingd v1, sha256 matches" in text
        assert "crop_proposer_v2.pt: missing (the reviewer uses rules only)" in text


CHILD = """
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from daemon.settings import load_settings
from tests.test_dropin import promote
s = load_settings(Path(sys.argv[1]))
s.models_dir.mkdir(parents=True, exist_ok=True)
(s.reviewer_dir / "ranker_v3_w10.pt").write_bytes(b"before")
promote(s, "ranker", 1)
promote(s, "ranker", 3, datetime(2026, 12, 1, 16, 0, tzinfo=UTC))
"""


class TestUmask:
    """Everything the export writes has the mode the umask gives, so the reviewer (another
    user) can load it."""

    @pytest.mark.parametrize("mask", [0o022, 0o027])
    def test_dropin_files_honour_the_umask(self, tmp_path: Path, mask: int) -> None:
        """Model, our metadata, the backups and the ledger: 0644 under 022, 0640 under 027."""
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[paths]\ndata_root = "{tmp_path / "data"}"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAININGD_")}
        old = os.umask(mask)
        try:
            subprocess.run([sys.executable, "-c", CHILD, str(cfg), str(REPO)], check=True,
                           env=env, cwd=tmp_path, timeout=120)
        finally:
            os.umask(old)
        folder = tmp_path / "data" / "ai_data" / "models"
        files = [folder / "ranker_v3_w10.pt", folder / "ranker_v3_w10.trainingd.json",
                 folder / "reviewer_exports.json",
                 *(folder / "trainingd-backups").glob("*")]
        assert len(files) >= 5
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


LOOP = """
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from daemon.settings import load_settings
from tests.test_dropin import promote
s = load_settings(Path(sys.argv[1]))
s.models_dir.mkdir(parents=True, exist_ok=True)
v = 0
while True:
    v += 1
    promote(s, "ranker", v, datetime(2026, 12, 1, 15, 0, tzinfo=UTC) + timedelta(seconds=v))
"""


class TestKilledMidway:
    """An export killed with SIGKILL at any moment never makes trainingd's own file look
    foreign, and the next export leaves no temp file and metadata that matches the file."""

    @pytest.mark.slow
    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_kill_during_exports(self, settings: Settings, seed: int) -> None:
        """Kill a process exporting in a loop at a random moment; then the listing says the
        file is trainingd's, and one more export cleans up and matches."""
        import random
        import signal
        import time

        from daemon.models_cli import describe

        settings.models_dir.mkdir(parents=True)
        cfg = settings.base_dir / "loop.toml"
        cfg.write_text(f'[paths]\ndata_root = "{settings.data_root}"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAININGD_")}
        child = subprocess.Popen([sys.executable, "-c", LOOP, str(cfg), str(REPO)], env=env,
                                 cwd=settings.base_dir)
        try:
            ledger = settings.models_dir / dropin.LEDGER
            deadline = time.monotonic() + 120
            while not ledger.exists() and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ledger.exists(), "the child never exported"
            time.sleep(random.Random(seed).uniform(0.0, 1.5))  # the moment of the kill
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        target = dropin.target(settings)
        assert describe(target, "ranker").state in ("matches", "missing"), seed
        promote(settings, "ranker", 10_000, T0 + timedelta(days=1))
        after = describe(target, "ranker")
        assert (after.state, after.version) == ("matches", 10_000)
        meta = json.loads(target.meta_path("ranker").read_text())
        assert meta["sha256"] == dropin.file_sha256(target.path("ranker"))
        leftovers = [*target.folder.glob(".ranker_v3_w10.*.tmp"), *target.backups.glob(".*")]
        assert leftovers == []
        assert "pending" not in dropin.read_ledger(settings.models_dir)["ranker"]
