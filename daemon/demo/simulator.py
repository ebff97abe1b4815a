"""A realistic upstream: the reviewer and the crop tool, as a separate process or in-process.

The end-to-end tests, the latency bench and the demo need input that arrives the way the real
tools deliver it: a project DB in WAL mode whose writer connection stays open, rows with
live-format group_ids committed one by one, real (tiny) image files that move between the review
folders, kind A sidecars written atomically next to the chosen image, crop rows UPDATEd later and
moved with their sidecar to ``__cropped/``, losers moved to ``__delete_staging/`` and some of
them deleted.  Per group, in this order (the reviewer's):

1. the 2-4 stage images appear in the image root (written to a temp name, then renamed);
2. the row is INSERTed and committed (``BEGIN IMMEDIATE`` ... ``COMMIT``): at once by default,
   or ``review_delay_seconds`` later (and not before the ``review_gate`` file exists, when one
   is given), so a daemon watching the root can embed and predict the group before its review;
3. the picked image (with its ``.yaml`` companion) moves to ``__selected/`` (approve) or
   ``__crop/`` / ``__crop_auto/`` (crop), and for a crop the kind A sidecar is written beside it;
4. the losers move to ``__delete_staging/``; a fraction of them is deleted after a short delay;
5. for a crop, ``crop_delay_seconds`` later: UPDATE final_crop_coords, crop_timestamp, crop_match,
   commit, then move image, companion and sidecar to ``__cropped/``.

With a delay, groups wait in the root together; how they stay apart: :mod:`.groups`.

Choices are deterministic under ``seed`` (file names, actions, boxes); only the clock-derived
values (group_id, timestamps) differ between runs.  It must not write anywhere but the given
decisions folder, image root and commit log, and must never leave a half-written file visible
under a final name.  SIGTERM/SIGINT only set a flag: the current step finishes, the DB closes,
the exit status is 0.

    python -m daemon.demo.simulator --decisions DIR --images ROOT --project NAME [--groups N]
        [--rate PER_SECOND] [--seed S] [--crop-delay-seconds X] [--delete-losers-fraction F]
        [--delete-delay-seconds X] [--review-delay-seconds X] [--review-gate FILE]
        [--commit-log FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import random
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from daemon.decisions.schema import INSERT_SQL, create_v3_db
from daemon.demo.groups import Due, ReviewedGroup, ShownGroup, box, draw_group
from daemon.demo.sample import STAGE_NAMES, iso_z, move_into, png_bytes, row_tuple, write_sidecar
from daemon.files import DELETE_STAGING
from daemon.fsutil import atomic_write_bytes

SELECTED, CROP, CROP_AUTO, CROPPED = ("__selected", "__crop", "__crop_auto", "__cropped")


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    decisions_dir: Path
    image_root: Path
    project: str
    groups: int = 20
    rate_per_second: float = 2.0  # groups reviewed per second; <= 0: as fast as possible
    seed: int = 0
    crop_delay_seconds: float = 2.0
    delete_losers_fraction: float = 0.5
    delete_delay_seconds: float = 0.5
    commit_log: Path | None = None
    #: images appear -> the row is committed; 0: in the same step, as before
    review_delay_seconds: float = 0.0
    #: reviews also wait until this file exists (the demo opens it once groups are predicted)
    review_gate: Path | None = None

    @property
    def overlapping(self) -> bool:
        """Whether unreviewed groups can wait in the image root together."""
        return self.review_delay_seconds > 0 or self.review_gate is not None

    @property
    def db_path(self) -> Path:
        return self.decisions_dir / f"{self.project}.db"


class Simulator:
    """The reviewer and the crop tool.  ``open()`` (or ``with``), then ``step()`` until
    ``done``; or ``run(stop)``.  One writer connection is held open for the whole run."""

    def __init__(
        self,
        config: SimulatorConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = random.Random(config.seed)
        self.reviewed: list[ReviewedGroup] = []
        self._due: list[Due] = []
        self._waiting: list[ShownGroup] = []  # images shown, review not yet committed
        self._shown = 0
        self._seq = 0
        self._conn: sqlite3.Connection | None = None
        self._log: TextIO | None = None
        self._start = 0.0
        self._offset = 0  # rows already in the DB: file names continue after them
        self._last_gid_time: datetime | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> Simulator:
        cfg = self.config
        cfg.decisions_dir.mkdir(parents=True, exist_ok=True)
        cfg.image_root.mkdir(parents=True, exist_ok=True)
        conn = create_v3_db(cfg.db_path, wal=True)  # creates only what is missing
        conn.execute("PRAGMA busy_timeout = 10000")
        self._offset = int(conn.execute("SELECT count(*) FROM ai_decisions").fetchone()[0])
        self._conn = conn
        if cfg.commit_log is not None:
            cfg.commit_log.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(cfg.commit_log, "a", encoding="utf-8")  # noqa: SIM115
        self._start = self.clock()
        return self

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Simulator:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scheduling -----------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Every group reviewed and every crop and delete carried out."""
        return len(self.reviewed) >= self.config.groups and not self._due and not self._waiting

    def _next_images_at(self) -> float | None:
        n = self._shown
        if n >= self.config.groups:
            return None
        rate = self.config.rate_per_second
        return self._start if rate <= 0 else self._start + n / rate

    def gate_open(self) -> bool:
        gate = self.config.review_gate
        return gate is None or gate.exists()

    def _next_review_at(self) -> float | None:
        if not self._waiting:
            return None
        if not self.gate_open():
            return self.clock() + 0.25  # poll the gate
        return self._waiting[0].shown_at + self.config.review_delay_seconds

    def next_due(self) -> float | None:
        """Clock time of the next step, or None when done."""
        times = [t for t in (self._next_images_at(), self._next_review_at(),
                             self._due[0].at if self._due else None) if t is not None]
        return min(times) if times else None

    def step(self) -> str | None:
        """Carry out at most one due action: the earliest due crop or delete, else the next
        group's images and (without a delay) its review, else a waiting group's review.
        Returns what it did ("review", "images", "crop", "delete")."""
        now = self.clock()
        if self._due and self._due[0].at <= now:
            due = heapq.heappop(self._due)
            if due.kind == "crop":
                self._crop(due.group)
            else:
                self._delete(due.group, due.names)
            return due.kind
        images_at = self._next_images_at()
        if images_at is not None and images_at <= now:
            self._waiting.append(self._show())
            if self.config.overlapping and self._log is not None:  # which groups now wait
                self._log.write(json.dumps({"event": "images", "project": self.config.project,
                                            "names": self._waiting[-1].names}) + "\n")
                self._log.flush()
            if not self.config.overlapping:  # the reviewer's pace: images, then the row
                self._review(self._waiting.pop(0))
                return "review"
            return "images"
        review_at = self._next_review_at()
        if review_at is not None and review_at <= now and self.gate_open():
            self._review(self._waiting.pop(0))
            return "review"
        return None

    def finish_now(self) -> None:
        """Carry out every pending crop and delete immediately (tests, the demo's end)."""
        while self._due:
            due = heapq.heappop(self._due)
            if due.kind == "crop":
                self._crop(due.group)
            else:
                self._delete(due.group, due.names)

    def run(self, stop: threading.Event) -> None:
        """Step until done or ``stop`` is set; waits on ``stop`` so a signal ends it at once."""
        while not stop.is_set() and not self.done:
            if self.step() is not None:
                continue
            nxt = self.next_due()
            if nxt is None:
                break
            stop.wait(max(0.0, min(nxt - self.clock(), 0.5)))

    def _schedule(self, delay: float, kind: str, group: ReviewedGroup,
                  names: tuple[str, ...] = ()) -> None:
        self._seq += 1
        heapq.heappush(self._due, Due(self.clock() + delay, self._seq, kind, group, names))

    # -- the reviewer ---------------------------------------------------------------------------

    def _group_time(self) -> datetime:
        # group_ids carry the commit time with microseconds; two in one microsecond must differ
        now = self.wall_clock()
        if self._last_gid_time is not None and now <= self._last_gid_time:
            now = self._last_gid_time + timedelta(microseconds=1)
        self._last_gid_time = now
        return now

    def _show(self) -> ShownGroup:
        """Draw the group's choices and write its images (step 1)."""
        cfg = self.config
        g = draw_group(self.rng, self._offset + self._shown, overlapping=cfg.overlapping,
                       delete_fraction=cfg.delete_losers_fraction, clock=self.clock())
        self._shown += 1
        # 1. the images exist before the review
        for stage, name in zip(g.stages, g.names, strict=True):
            atomic_write_bytes(cfg.image_root / name, png_bytes(g.size, g.color, stage))
            atomic_write_bytes(cfg.image_root / f"{Path(name).stem}.yaml",
                               f"stage: {STAGE_NAMES[stage]}\nseed: {cfg.seed}\n".encode())
        return g

    def _review(self, shown: ShownGroup) -> None:
        """Commit the row, then move and delete as the reviewer does (steps 2-5)."""
        cfg, g = self.config, shown
        n, names, size, pick, action, auto, ai_box = (g.n, g.names, g.size, g.pick, g.action,
                                                      g.auto, g.ai_box)
        ai_pick = len(names) - 1

        # 2. the row
        when = self._group_time()
        batch = n // 100 + 1
        group_id = f"{cfg.project}_group_{when:%Y%m%dT%H%M%S%f}_batch{batch:03d}_img{n % 1000:03d}"
        row: dict[str, Any] = {
            "group_id": group_id, "timestamp": iso_z(when), "project_id": cfg.project,
            "directory": str(cfg.image_root.resolve()), "batch_number": batch,
            "images": json.dumps(names), "ai_selected_index": ai_pick,
            "ai_crop_coords": json.dumps(ai_box) if ai_box is not None else None,
            "ai_confidence": shown.confidence, "user_selected_index": pick, "user_action": action,
            "final_crop_coords": None, "crop_timestamp": None,
            "image_width": size[0], "image_height": size[1],
            "selection_match": int(pick == ai_pick), "crop_match": None,
            "ai_crop_accepted": (1 if auto else None) if action == "crop" else None,
        }
        self._commit(INSERT_SQL, row_tuple(row), group_id, action, "insert")

        # 3. the picked image moves; a crop gets its sidecar beside it
        folder = SELECTED if action == "approve" else (CROP_AUTO if auto else CROP)
        picked = names[pick]
        dst = cfg.image_root / folder
        move_into(cfg.image_root / picked, dst)
        move_into(cfg.image_root / f"{Path(picked).stem}.yaml", dst)
        sidecar: Path | None = None
        if action == "crop":
            data: dict[str, Any] = {"group_id": group_id, "project_id": cfg.project,
                                    "needs_crop": True}
            if auto:
                data.update(ai_crop_coords=ai_box, ai_route="suggestion", ai_crop_accepted=True)
            elif g.shape == 1:
                data["ai_crop_coords"] = ai_box
            elif g.shape == 2:
                data.update(ai_route="manual", ai_crop_coords=None)
            sidecar = dst / f"{Path(picked).stem}.decision"
            write_sidecar(sidecar, data)
        group = ReviewedGroup(group_id, action, names, picked, folder, sidecar, g.final_box)
        self.reviewed.append(group)

        # 4. the losers go to delete staging; some are deleted soon after
        staging = cfg.image_root / DELETE_STAGING
        doomed: list[str] = []
        for k, name in enumerate(names):
            if k == pick:
                continue
            move_into(cfg.image_root / name, staging)
            move_into(cfg.image_root / f"{Path(name).stem}.yaml", staging)
            if shown.delete_mask[k]:
                doomed.append(name)
        if doomed:
            self._schedule(cfg.delete_delay_seconds, "delete", group, tuple(doomed))
        if action == "crop":
            self._schedule(cfg.crop_delay_seconds, "crop", group)

    # -- the crop tool --------------------------------------------------------------------------

    def _crop(self, group: ReviewedGroup) -> None:
        cfg = self.config
        assert self._conn is not None
        row = self._conn.execute("SELECT ai_crop_coords FROM ai_decisions WHERE group_id = ?",
                                 (group.group_id,)).fetchone()
        ai_box = json.loads(row[0]) if row and row[0] else None
        final = group.final_box or box(self.rng)
        match = int(ai_box is not None and all(abs(a - b) <= 0.05
                                               for a, b in zip(final, ai_box, strict=True)))
        self._commit(
            "UPDATE ai_decisions SET final_crop_coords = ?, crop_timestamp = ?, crop_match = ? "
            "WHERE group_id = ?",
            (json.dumps(final), iso_z(self.wall_clock()), match, group.group_id),
            group.group_id, "crop", "crop_update",
        )
        src = cfg.image_root / group.folder
        dst = cfg.image_root / CROPPED
        stem = Path(group.picked).stem
        for name in (group.picked, f"{stem}.yaml", f"{stem}.decision"):
            if (src / name).exists():
                move_into(src / name, dst)
        if group.sidecar is not None:
            group.sidecar = dst / group.sidecar.name
        group.cropped = True

    def _delete(self, group: ReviewedGroup, names: Sequence[str]) -> None:
        staging = self.config.image_root / DELETE_STAGING
        for name in names:
            for path in (staging / name, staging / f"{Path(name).stem}.yaml"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            group.deleted.append(name)

    # -- the DB ---------------------------------------------------------------------------------

    def _commit(self, sql: str, params: Sequence[Any], group_id: str, action: str,
                event: str) -> None:
        conn = self._conn
        assert conn is not None, "open() the simulator first"
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        mono, wall = time.monotonic(), time.time()
        if self._log is not None:
            self._log.write(json.dumps({
                "event": event, "project": self.config.project, "group_id": group_id,
                "action": action, "monotonic": mono, "wall": wall,
            }) + "\n")
            self._log.flush()


# -- the command line ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m daemon.demo.simulator",
        description="Behave like the reviewer and the crop tool for one project.")
    p.add_argument("--decisions", type=Path, required=True,
                   help="decisions folder: <project>.db is created there if missing")
    p.add_argument("--images", type=Path, required=True, help="the project's image root")
    p.add_argument("--project", required=True)
    p.add_argument("--groups", type=int, default=20, help="groups to review (default 20)")
    p.add_argument("--rate", type=float, default=2.0,
                   help="groups per second (default 2; 0 = as fast as possible)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop-delay-seconds", type=float, default=2.0,
                   help="review -> crop tool UPDATE (default 2)")
    p.add_argument("--delete-losers-fraction", type=float, default=0.5,
                   help="share of losers deleted from __delete_staging/ (default 0.5)")
    p.add_argument("--delete-delay-seconds", type=float, default=0.5,
                   help="delete staging -> deletion (default 0.5)")
    p.add_argument("--review-delay-seconds", type=float, default=0.0,
                   help="a group's images appear -> its row is committed (default 0: at once)")
    p.add_argument("--review-gate", type=Path, default=None,
                   help="reviews also wait until this file exists (images appear meanwhile)")
    p.add_argument("--commit-log", type=Path, default=None,
                   help="append one JSON line per committed INSERT/UPDATE (and, with a "
                   "delay or gate, one per group shown: event images)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.groups < 0 or not 0.0 <= args.delete_losers_fraction <= 1.0 \
            or not args.review_delay_seconds >= 0:
        print("--groups and --review-delay-seconds must be >= 0 and --delete-losers-fraction "
              "in [0, 1]", file=sys.stderr)
        return 2
    config = SimulatorConfig(
        decisions_dir=args.decisions, image_root=args.images, project=args.project,
        groups=args.groups, rate_per_second=args.rate, seed=args.seed,
        crop_delay_seconds=args.crop_delay_seconds,
        delete_losers_fraction=args.delete_losers_fraction,
        delete_delay_seconds=args.delete_delay_seconds, commit_log=args.commit_log,
        review_delay_seconds=args.review_delay_seconds, review_gate=args.review_gate,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()  # the loop finishes its step, then closes the DB

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sim = Simulator(config)
    with sim:
        sim.run(stop)
    crops = sum(1 for g in sim.reviewed if g.action == "crop")
    print(json.dumps({"event": "simulator.finished", "project": config.project,
                      "groups": len(sim.reviewed), "crops": crops,
                      "cropped": sum(1 for g in sim.reviewed if g.cropped),
                      "stopped": stop.is_set(), "db": str(config.db_path)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
