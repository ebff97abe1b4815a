"""Live accuracy (issue 13 item 3): decision rows written the way the reviewer writes them (WAL,
writer open, crops UPDATEd later) for groups trainingd predicted, matched by file names, recorded
with the champion version, and shown in the daily summary with n, a 95% interval and a plot."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from typing import Any

from daemon.predict.grouping import stage_number
from daemon.predict.live import iou
from daemon.predict.store import predictions_db
from daemon.store import StateStore
from daemon.summary import write_daily_summary
from daemon.timeparse import iso_utc
from tests import test_predict
from tests.conftest import NOW
from tests.test_predict import plant_champions, run

LATER = NOW + timedelta(hours=1)
world = test_predict.world  # the same image root, champions and embedding stage


def predictions(w: dict[str, Any]) -> list[dict[str, Any]]:
    conn = sqlite3.connect(predictions_db(w["settings"].data_root, "mojo3"))
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM ai_decisions ORDER BY group_id")]
    finally:
        conn.close()


def reviews(w: dict[str, Any]) -> dict[str, dict[str, Any]]:
    conn = sqlite3.connect(predictions_db(w["settings"].data_root, "mojo3"))
    conn.row_factory = sqlite3.Row
    try:
        return {r["group_id"]: dict(r) for r in conn.execute("SELECT * FROM live_reviews")}
    finally:
        conn.close()


def review(db: Any, pred: dict[str, Any], *, pick: int, action: str = "approve",
           when: Any = LATER, final: Any = None) -> dict[str, Any]:
    images = json.loads(pred["images"])
    return db.insert(group_id=f"mojo3_group_{db.n:04d}", timestamp=iso_utc(when),
                     images=json.dumps(images), ai_selected_index=0, ai_crop_coords=None,
                     ai_confidence=None, user_selected_index=pick, user_action=action,
                     final_crop_coords=final, crop_timestamp=None,
                     selection_match=0, crop_match=0)


def predicted(w: dict[str, Any], store: StateStore) -> list[dict[str, Any]]:
    plant_champions(w["settings"].models_dir, w["emb"].embedder_id, 1)
    assert run(w, store).predicted == 6
    return predictions(w)


class TestLiveReviews:
    """A review of a group predicted before it is recorded with the champion's version."""

    def test_matching_and_missing_picks_are_recorded(self, world: dict[str, Any],
                                                     make_db: Any, store: StateStore) -> None:
        """Pick match, the rule's match on the same group and the crop IoU of an approve."""
        preds = predicted(world, store)
        db = make_db("mojo3")
        hit, miss = preds[0], preds[1]
        review(db, hit, pick=hit["ai_selected_index"])
        other = (miss["ai_selected_index"] + 1) % len(json.loads(miss["images"]))
        review(db, miss, pick=other)
        result = run(world, store, now=LATER + timedelta(minutes=5))
        assert result.live == {"rows_read": 2, "reviews_recorded": 2}
        got = reviews(world)
        assert got[hit["group_id"]]["pick_match"] == 1 and got[miss["group_id"]]["pick_match"] == 0
        assert got[hit["group_id"]]["ranker_version"] == 1
        names = json.loads(miss["images"])
        top = max(range(len(names)), key=lambda i: (stage_number(names[i]), i))
        assert got[miss["group_id"]]["rule_match"] == int(other == top)
        box = json.loads(hit["ai_crop_coords"])
        assert got[hit["group_id"]]["crop_iou"] == round(iou(box, (0, 0, 1, 1)), 6)
        again = run(world, store, now=LATER + timedelta(minutes=10))
        assert again.live == {"rows_read": 0, "reviews_recorded": 0}

    def test_crop_waits_for_the_crop_tool(self, world: dict[str, Any], make_db: Any,
                                          store: StateStore) -> None:
        """A crop row counts its IoU once the crop tool UPDATEs the final box in place."""
        pred = predicted(world, store)[2]
        db = make_db("mojo3")
        row = review(db, pred, pick=pred["ai_selected_index"], action="crop")
        run(world, store, now=LATER + timedelta(minutes=5))
        got = reviews(world)[pred["group_id"]]
        assert got["crop_pending"] == 1 and got["crop_iou"] is None
        db.update(row["group_id"], final_crop_coords="[0.1, 0.1, 0.6, 0.6]",
                  crop_timestamp=iso_utc(LATER + timedelta(minutes=7)))
        result = run(world, store, now=LATER + timedelta(minutes=10))
        got = reviews(world)[pred["group_id"]]
        assert result.live["reviews_recorded"] == 1 and got["crop_pending"] == 0
        box = json.loads(pred["ai_crop_coords"])
        assert got["crop_iou"] == round(iou(box, (0.1, 0.1, 0.6, 0.6)), 6)

    def test_reviews_before_the_prediction_do_not_count(self, world: dict[str, Any],
                                                        make_db: Any, store: StateStore) -> None:
        """A group reviewed before trainingd predicted it is no live evidence."""
        pred = predicted(world, store)[0]
        db = make_db("mojo3")
        review(db, pred, pick=0, when=NOW - timedelta(minutes=1))
        result = run(world, store, now=LATER)
        assert result.live == {"rows_read": 1, "reviews_recorded": 0} and reviews(world) == {}

    def test_bad_and_unknown_rows_are_skipped(self, world: dict[str, Any], make_db: Any,
                                              store: StateStore) -> None:
        """Rows with unparseable images, another group's names or a pick out of range pass."""
        preds = predicted(world, store)
        db = make_db("mojo3", checks=False)
        review(db, preds[0], pick=0)
        db.update(f"mojo3_group_{db.n - 1:04d}", images="[not json")
        db.insert(group_id="x1", timestamp=iso_utc(LATER), images=json.dumps(["a.png", "b.png"]),
                  user_selected_index=0)
        review(db, preds[1], pick=3 if len(json.loads(preds[1]["images"])) == 3 else 2)
        result = run(world, store, now=LATER + timedelta(minutes=5))
        assert result.live == {"rows_read": 3, "reviews_recorded": 0}

    def test_reviewed_group_keeps_its_prediction_after_a_promotion(
            self, world: dict[str, Any], make_db: Any, store: StateStore) -> None:
        """A new champion re-predicts only what is not yet reviewed."""
        preds = predicted(world, store)
        db = make_db("mojo3")
        review(db, preds[0], pick=preds[0]["ai_selected_index"])
        run(world, store, now=LATER + timedelta(minutes=5))
        plant_champions(world["settings"].models_dir, world["emb"].embedder_id, 2, seed=3)
        result = run(world, store, now=LATER + timedelta(minutes=10))
        assert (result.predicted, result.reviewed_kept) == (5, 1)
        versions = {p["group_id"]: p["ranker_version"] for p in predictions(world)}
        assert versions[preds[0]["group_id"]] == 1 and set(versions.values()) == {1, 2}


class TestSummary:
    """The daily summary shows the live figures per champion with n, interval and a plot."""

    def test_live_table_and_plot(self, world: dict[str, Any], make_db: Any,
                                 store: StateStore) -> None:
        """Live top-1, the rule on the same groups and the test side, each with n and a CI."""
        preds = predicted(world, store)
        db = make_db("mojo3")
        for p in preds[:4]:
            review(db, p, pick=p["ai_selected_index"])
        run(world, store, now=LATER + timedelta(minutes=5))
        json_path, md_path = write_daily_summary(world["settings"], store,
                                                 LATER + timedelta(hours=1))
        live = json.loads(json_path.read_text())["live_accuracy"]
        r = live["ranker"][0]
        assert (r["version"], r["n"], r["champion"]) == (1, 4, True)
        assert r["live_top1"]["value"] == 1.0 and r["live_top1"]["method"] == "wilson"
        assert 0 < r["live_top1"]["low"] < 1.0 and r["rule_top1"]["n"] == 4
        assert live["crop"][0]["n"] == 4 and live["crop"][0]["live_mean_iou"]["value"] > 0
        md = md_path.read_text()
        assert "## Live accuracy" in md and "| v1 | yes | 4 | 1.000 [" in md
        png = json_path.with_name(json_path.stem + "_live_accuracy.png")
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
