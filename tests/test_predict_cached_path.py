"""The prediction pass's cached path (issue 13, bench/predict_bench.py): vectors read in one
batch into a matrix, scored with one ranker and one crop pass per batch, the image facts read
through the store's images repository.  The speed itself is the bench's; these tests pin what
the fast path must keep: the same picks, confidences and boxes as the champion computes group
by group, and a damaged cache file becomes an issue record instead of a crash or a silent
garbage pick."""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.embedding.cache import VectorCache, vector_bytes
from daemon.embedding.ledger import Ledger
from daemon.predict.run import MISSING_CODE
from daemon.predict.store import predictions_db
from daemon.store import StateStore
from tests import test_predict
from tests.conftest import NOW
from tests.test_predict import plant_champions, run

#: the fixture of tests/test_predict.py: real image files, the tiny embedder, the real stage
world = test_predict.world
ROOT = Path(__file__).resolve().parents[1]
_SQL = re.compile(r"\.(execute|executemany|executescript)\(|store\.conn\b")


def predictions(world: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The predictions DB's rows by their first image name."""
    conn = sqlite3.connect(predictions_db(world["settings"].data_root, "mojo3"))
    conn.row_factory = sqlite3.Row
    try:
        return {json.loads(r["images"])[0]: dict(r)
                for r in conn.execute("SELECT * FROM ai_decisions")}
    finally:
        conn.close()


def damage(world: dict[str, Any], store: StateStore, how: str) -> str:
    """Damage the cached vector of the first group's last image; its file name."""
    victim = world["groups"][0][-1]
    sha = Ledger(store).shas_for("mojo3", [victim.name])[victim.name]
    path = VectorCache(world["settings"].cache_dir, world["emb"].embedder_id).vector_path(sha)
    good = np.load(path)
    if how == "not_unit":
        path.write_bytes(vector_bytes(good * 3.0))
    elif how == "nan":
        path.write_bytes(vector_bytes(np.full_like(good, np.nan)))
    elif how == "other_dim":
        path.write_bytes(vector_bytes(np.full(16, 0.25, dtype=np.float32)))
    elif how == "truncated":
        path.write_bytes(vector_bytes(good)[:-100])
    elif how == "folder":
        path.unlink()
        path.mkdir()
    else:  # pragma: no cover
        raise AssertionError(how)
    return victim.name


class TestDamagedCacheFiles:
    """A bad .npy in the cache leaves its group predicted over the rest, with an issue."""

    @pytest.mark.parametrize(("how", "says"), [
        ("not_unit", "not unit length"),
        ("nan", "not unit length"),
        ("other_dim", "not this embedder's"),
        ("truncated", "not a whole .npy"),
        ("folder", "a folder in its place"),
    ])
    def test_damaged_vector_is_left_out_with_an_issue(self, world: dict[str, Any],
                                                      store: StateStore, how: str,
                                                      says: str) -> None:
        """The damaged image is named in missing_images and in an issue saying why."""
        emb = world["emb"]
        s = world["settings"]
        plant_champions(s.models_dir, emb.embedder_id, 1)
        assert run(world, store).predicted == 6
        name = damage(world, store, how)
        plant_champions(s.models_dir, emb.embedder_id, 2, seed=1)  # everything predicted again
        result = run(world, store, now=NOW + timedelta(hours=1))
        assert result.status == "predicted" and result.predicted == 6 and result.partial == 1
        row = predictions(world)[world["groups"][0][0].name]
        assert json.loads(row["missing_images"]) == [name]
        assert row["ranker_version"] == 2
        assert 0 <= row["ai_selected_index"] < 2  # the damaged last image is never the pick
        assert row["ai_confidence"] == row["ai_confidence"]  # not NaN
        issues = [i for i in store.issues("mojo3") if i.code == MISSING_CODE]
        assert len(issues) == 1 and name in issues[0].value_repr and says in issues[0].message
        assert issues[0].db_file == str(world["groups"][0][-1])


class TestBatchedScoring:
    """The vectorised scorer equals the champion applied group by group."""

    def test_scores_equal_the_per_group_champion(self, tmp_path: Path) -> None:
        """Pick, softmax confidence and projected box equal a per-group torch computation,
        with groups of 1-4 vectors, images without a vector and picks of unknown size."""
        import torch

        from daemon.predict.scoring import Rows, load_champions, score_rows
        from daemon.training.models import project_box

        plant_champions(tmp_path, "emb", 1, dim=32)
        champs = load_champions(tmp_path, "emb", "cpu")
        rng = np.random.default_rng(3)
        groups = []
        for g in range(300):
            size = int(rng.integers(2, 5))
            has = [bool(rng.random() > 0.15) or g % 7 == 0 for _ in range(size)]
            if g % 50 == 1:
                has = [False] * size  # no vector at all
            vecs = rng.standard_normal((size, 32)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            dims = [(0, 0) if g % 11 == 0 else (int(rng.integers(500, 3000)),
                                                 int(rng.integers(500, 3000)))
                    for _ in range(size)]
            groups.append((vecs, has, dims))
        cols: dict[str, list[Any]] = {k: [] for k in ("x", "group", "position", "rank", "w",
                                                      "h")}
        for g, (vecs, has, dims) in enumerate(groups):
            for i in range(len(has)):
                if has[i]:
                    for k, v in zip(cols, (vecs[i], g, i, i - (len(has) - 1), *dims[i]),
                                    strict=True):
                        cols[k].append(v)
        rows = Rows(np.array(cols["x"], dtype=np.float32).reshape(-1, 32),
                    np.array(cols["group"], dtype=np.int64),
                    np.array(cols["position"], dtype=np.int64),
                    np.array(cols["rank"], dtype=np.float32),
                    np.array(cols["w"], dtype=np.float64), np.array(cols["h"], dtype=np.float64),
                    np.zeros(len(cols["group"])))
        got = score_rows(champs, rows, len(groups))
        assert champs.crop is not None
        with torch.inference_mode():
            for g, (vecs, has, dims) in enumerate(groups):
                idx = [i for i in range(len(has)) if has[i]]
                if not idx:
                    assert got.index[g] == -1 and np.isnan(got.box[g]).all()
                    continue
                x = torch.from_numpy(vecs[idx])
                rank = torch.tensor([i - (len(has) - 1) for i in idx], dtype=torch.float32)
                scores = champs.ranker(x, rank)
                best = int(torch.argmax(scores))
                assert got.index[g] == idx[best]
                assert got.confidence[g] == pytest.approx(
                    float(torch.softmax(scores, 0)[best]), abs=1e-6)
                w, h = dims[idx[best]]
                if w == 0:
                    assert np.isnan(got.box[g]).all()
                    continue
                inp = torch.cat([x[best], torch.tensor([w / 2048.0, h / 2048.0])])[None]
                box = project_box(champs.crop(inp))[0].numpy()
                np.testing.assert_allclose(got.box[g], box, atol=1e-6)


class TestImageFactsInTheStore:
    """The prediction pass's input comes from the store's images repository."""

    def test_facts_of_a_project_and_of_some_paths(self, store: StateStore) -> None:
        """All present images by path, or those of 1,200 named paths (more than one IN chunk);
        gone files and other projects are left out."""
        with store.transaction():
            for i in range(1500):
                store.images.upsert_seen("p", f"/img/p/{i:05d}_stage2_upscaled.png",
                                         f"{i:05d}_stage2_upscaled.png", 10, 1, 2.0, NOW)
            store.images.upsert_seen("q", "/img/q/a.png", "a.png", 1, 1, None, NOW)
            store.images.mark_gone("p", ["/img/p/00003_stage2_upscaled.png"], NOW)
        every = store.images.facts("p")
        assert len(every) == 1499 and [f.path for f in every] == sorted(f.path for f in every)
        assert every[0] == ("00000_stage2_upscaled.png", "/img/p/00000_stage2_upscaled.png",
                            None, None, None, 2.0, None)
        wanted = [f"/img/p/{i:05d}_stage2_upscaled.png" for i in range(1200, 0, -1)]
        some = store.images.facts("p", [*wanted, "/img/q/a.png", "/img/p/nowhere.png"])
        assert [f.path for f in some] == sorted(set(wanted) - {
            "/img/p/00003_stage2_upscaled.png"})

    def test_predict_runs_no_sql_outside_its_own_db(self) -> None:
        """daemon/predict/ runs SQL only in store.py (its own predictions DB): the state DB's
        images are read through store.images."""
        found = [f"{p.name}:{n}" for p in sorted((ROOT / "daemon" / "predict").glob("*.py"))
                 if p.name != "store.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if _SQL.search(line)]
        assert found == []
