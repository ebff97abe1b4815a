"""Soak: the real daemon for N minutes beside a realistic upstream, with faults on a schedule.

Runs ``trainingd run`` (a real process, restarted like systemd's ``Restart=always`` whenever it
exits or is killed) next to the upstream simulator (reviewer + crop tool rates, WAL DB with the
writer open, images and sidecars), and injects, at fixed fractions of the run:

- bad rows in a second project DB (deep JSON in ``images`` and in a crop, a number of more
  than 4,300 digits, an inverted crop), three times;
- bad triggers: deep JSON, a symlink, a FIFO, 50 MB, ``retrain.json.orig``;
- a FIFO named like an image in the image root;
- disk full for 30 s (the data root is a small tmpfs mounted for the run; needs root);
- the state DB deleted while the daemon runs;
- kill -9 of the daemon every few minutes.

It prints counts and ratios only (the machine is shared): rows written vs validated, issues
expected vs found per fault kind, where each bad trigger went, restarts by cause, and the
daemon's RSS after warm-up vs at the end (target: flat within 10%).  It reports what it sees,
including faults that still break the daemon.

    python bench/soak_bench.py [--minutes 20] [--rate 1.0] [--seed 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon.decisions.schema import INSERT_SQL, create_legacy_db  # noqa: E402
from daemon.demo.sample import reviewer_row, row_tuple  # noqa: E402

CHILD = REPO / "tests" / "crash_helpers.py"  # trainingd with the tiny random-init CLIP
DEEP = "[" * 60_000
HUGE = "1" * 5_000
BAD_ROWS: dict[str, dict[str, Any]] = {
    "deep_json_images": {"images": DEEP},
    "deep_json_crop": {"user_action": "crop", "final_crop_coords": DEEP,
                       "crop_timestamp": "2025-10-24T10:00:00Z"},
    "huge_number": {"user_action": "crop", "final_crop_coords": f"[{HUGE}, 0, 1, 1]",
                    "crop_timestamp": "2025-10-24T10:00:00Z"},
    "bad_crop": {"user_action": "crop", "final_crop_coords": "[0.8, 0.1, 0.2, 0.7]",
                 "crop_timestamp": "2025-10-24T10:00:00Z"},
}
CONFIG = """\
[paths]
data_root = "{data}"
decisions_dir = "{decisions}"

[watcher]
settle_seconds = 0.5
max_wait_seconds = 3.0

[service]
heartbeat_seconds = 2
shutdown_budget_seconds = 10

[embedding]
model = "trainingd-tiny"
pretrained = "none"
device = "cpu"
batch_size = 8
decode_workers = 1

[training]
min_new_labels = 100
min_train_groups = 10
min_holdout_groups = 3
epochs = 5
crop_epochs = 5

[projects.studio]
image_roots = ["{photos}"]
"""


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Incarnation:
    """One daemon process between two restarts."""

    proc: subprocess.Popen[bytes]
    started: float
    rss_warm: int | None = None
    rss_last: int | None = None


@dataclass
class Soak:
    root: Path
    seconds: float
    rate: float
    seed: int
    rng: random.Random = field(init=False)
    restarts: Counter[str] = field(default_factory=Counter)
    exits: Counter[str] = field(default_factory=Counter)
    bad_rows: dict[str, str] = field(default_factory=dict)  # group_id -> fault kind
    clean_rows: int = 0
    triggers: dict[str, str] = field(default_factory=dict)  # fault kind -> outcome
    notes: list[str] = field(default_factory=list)
    lives: list[Incarnation] = field(default_factory=list)
    mounted: bool = False
    kill_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.data = self.root / "data"
        self.upstream = self.root / "upstream"
        self.decisions = self.upstream / "decisions"
        self.photos = self.upstream / "photos"
        self.log = self.root / "daemon.log"
        for d in (self.data, self.decisions, self.photos):
            d.mkdir(parents=True, exist_ok=True)
        self.config = self.root / "config.toml"
        self.config.write_text(CONFIG.format(data=self.data, decisions=self.decisions,
                                             photos=self.photos))
        self.triggers_dir = self.data / "triggers"
        self.state_db = self.data / "daemon" / "state.db"

    # -- processes --------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
        env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
                    "OMP_NUM_THREADS": "1"})
        return env

    def start_daemon(self) -> None:
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, str(CHILD), "run", "--config", str(self.config),
                 "--log-format", "json"], stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                cwd=self.root)
        self.lives.append(Incarnation(proc, time.monotonic()))

    @property
    def daemon(self) -> Incarnation:
        return self.lives[-1]

    def start_writer(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon.demo.simulator", "--decisions", str(self.decisions),
             "--images", str(self.photos), "--project", "studio", "--groups", "1000000",
             "--rate", str(self.rate), "--seed", str(self.seed), "--crop-delay-seconds", "3",
             "--delete-delay-seconds", "30"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, env=self.env())

    # -- faults -----------------------------------------------------------------------------

    def insert_bad_rows(self) -> None:
        """Each bad kind once, among clean rows, into the CHECK-less ``intake`` DB."""
        path = self.decisions / "intake.db"
        conn = create_legacy_db(path) if not path.exists() else sqlite3.connect(
            path, isolation_level=None)
        try:
            start = self.clean_rows + len(self.bad_rows)
            rows = [reviewer_row("intake", start + k, self.rng) for k in range(12)]
            for k, (kind, changes) in enumerate(BAD_ROWS.items()):
                rows[2 * k + 1].update(changes)
                self.bad_rows[rows[2 * k + 1]["group_id"]] = kind
            self.clean_rows += len(rows) - len(BAD_ROWS)
            conn.execute("BEGIN")
            conn.executemany(INSERT_SQL, [row_tuple(r) for r in rows])
            conn.execute("COMMIT")
        finally:
            conn.close()

    def drop_bad_triggers(self) -> None:
        """One bad trigger at a time; where it went is looked up at the end."""
        t = self.triggers_dir
        t.mkdir(parents=True, exist_ok=True)
        target = self.root / "outside.json"
        target.write_text(json.dumps({"model": "ranker", "force": True, "secret": "leak"}))
        makers: list[tuple[str, str, Callable[[Path], None]]] = [
            ("deep_json", "retrain.json", lambda p: p.write_text(DEEP)),
            ("symlink", "inspect", lambda p: p.symlink_to(target)),
            ("fifo", "summary", lambda p: os.mkfifo(p)),
            ("50_mb", "retrain.json",
             lambda p: p.write_bytes(b'{"model": "ranker", "pad": "' + b" " * (50 << 20)
                                     + b'"}')),
            ("orig_suffix", "retrain.json.orig",
             lambda p: p.write_text(json.dumps({"model": "ranker", "force": True}))),
        ]
        for kind, name, make in makers:
            path = t / name
            before = self._trigger_listing()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            make(path)
            gone = wait_for(lambda p=path: not os.path.lexists(p), 20.0)  # type: ignore[misc]
            after = self._trigger_listing()
            new = sorted(after - before)
            where = ",".join(sorted({n.split("/")[0] for n in new})) or "nowhere"
            self.triggers[kind] = (f"{'consumed' if gone else 'STILL IN triggers/'}; "
                                   f"new entries in: {where}")
            if not gone:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _trigger_listing(self) -> set[str]:
        out = set()
        for sub in ("done", "failed", "processing"):
            folder = self.triggers_dir / sub
            if folder.is_dir():
                out |= {f"{sub}/{p.name}" for p in folder.iterdir()}
        return out

    def fifo_in_image_root(self) -> Path:
        path = self.photos / "20250101_000000_stage2_upscaled.png"
        os.mkfifo(path)
        return path

    def mount_data_tmpfs(self, mib: int) -> None:
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs",
                            str(self.data)], check=True, capture_output=True, timeout=30)
            self.mounted = True
        except (OSError, subprocess.SubprocessError) as exc:
            self.notes.append(f"disk full: no tmpfs ({exc}); the fault is skipped")

    def fill_disk(self, seconds: float, tick: Callable[[], None]) -> str:
        if not self.mounted:
            return "skipped (no tmpfs)"
        filler = self.data / "filler.bin"
        chunk = b"\0" * (1 << 20)
        with filler.open("wb") as fh:
            try:
                while True:
                    fh.write(chunk)
                    fh.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            tick()
            time.sleep(0.5)
        filler.unlink()
        return "held full, then freed"

    def delete_state_db(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{self.state_db}{suffix}").unlink()

    # -- the supervisor ---------------------------------------------------------------------

    def supervise(self) -> None:
        """Restart a daemon that exited (as systemd would, after 1 s); sample its RSS."""
        life = self.daemon
        code = life.proc.poll()
        if code is not None:
            self.exits[f"exit {code}"] += 1
            self.restarts["after exit " + str(code)] += 1
            time.sleep(1.0)  # RestartSec
            self.start_daemon()
            return
        rss = rss_kib(life.proc.pid)
        if rss is not None:
            life.rss_last = rss
            if life.rss_warm is None and time.monotonic() - life.started > self.warmup:
                life.rss_warm = rss

    def kill_daemon(self) -> None:
        self.kill_times.append(time.time())
        self.daemon.proc.send_signal(signal.SIGKILL)
        self.daemon.proc.wait(30)
        self.restarts["kill -9"] += 1
        time.sleep(1.0)
        self.start_daemon()

    @property
    def warmup(self) -> float:
        return min(60.0, 0.1 * self.seconds)

    def run(self) -> int:
        if os.geteuid() == 0:
            self.mount_data_tmpfs(256)
        else:
            self.notes.append("not root: no tmpfs, disk full is skipped")
        writer = self.start_writer()
        self.start_daemon()
        begin = time.monotonic()
        fifo: Path | None = None
        disk = "not reached"
        kill_every = min(240.0, self.seconds / 3)
        schedule: list[tuple[float, str]] = sorted(
            [(0.05, "bad_rows"), (0.10, "bad_triggers"), (0.15, "fifo"), (0.20, "disk_full"),
             (0.55, "state_db_deleted"), (0.60, "bad_rows"), (0.85, "bad_rows")]
            + [(0.1 + k * kill_every / self.seconds, "kill")
               for k in range(1, int(self.seconds / kill_every) + 1)
               if 0.1 * self.seconds + k * kill_every < 0.9 * self.seconds])
        deleted_at: float | None = None
        try:
            while time.monotonic() - begin < self.seconds:
                self.supervise()
                elapsed = (time.monotonic() - begin) / self.seconds
                while schedule and schedule[0][0] <= elapsed:
                    _, what = schedule.pop(0)
                    if what == "bad_rows":
                        self.insert_bad_rows()
                    elif what == "bad_triggers":
                        self.drop_bad_triggers()
                    elif what == "fifo":
                        fifo = self.fifo_in_image_root()
                    elif what == "disk_full":
                        disk = self.fill_disk(min(30.0, 0.2 * self.seconds), self.supervise)
                    elif what == "state_db_deleted":
                        self.delete_state_db()
                        deleted_at = time.time()
                    elif what == "kill":
                        self.kill_daemon()
                time.sleep(0.5)
            writer.send_signal(signal.SIGTERM)
            writer.wait(60)
            caught_up = wait_for(lambda: self._validated() == self._written(), 120.0,
                                 tick=self.supervise)
            end_rss = rss_kib(self.daemon.proc.pid)
            self.daemon.proc.send_signal(signal.SIGTERM)
            try:
                final_exit: int | str = self.daemon.proc.wait(60)
            except subprocess.TimeoutExpired:
                final_exit = "did not stop within 60 s of SIGTERM (killed)"
                self.daemon.proc.kill()
                self.daemon.proc.wait(30)
            self.report(caught_up, end_rss, final_exit, fifo, disk, deleted_at)
        finally:
            for proc in (writer, self.daemon.proc):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
            if self.mounted:
                subprocess.run(["umount", "-l", str(self.data)], check=False)
        return 0

    # -- what was seen ----------------------------------------------------------------------

    def _written(self) -> dict[str, int]:
        out = {}
        for db in sorted(self.decisions.glob("*.db")):
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                out[db.stem] = conn.execute("SELECT count(*) FROM ai_decisions").fetchone()[0]
            finally:
                conn.close()
        return out

    def _state(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            conn = sqlite3.connect(f"file:{self.state_db}?mode=ro", uri=True, timeout=5)
        except sqlite3.Error:
            return []
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error:
            return []
        finally:
            conn.close()

    def _validated(self) -> dict[str, int]:
        return {p: n for p, n in self._state(
            "SELECT project, count(*) FROM row_state GROUP BY project ORDER BY project")}

    def _events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def report(self, caught_up: bool, end_rss: int | None, final_exit: int | str,
               fifo: Path | None, disk: str, deleted_at: float | None) -> None:
        written, validated = self._written(), self._validated()
        print(f"soak: {self.seconds / 60:g} min, writer rate {self.rate}/s, seed {self.seed}")
        print("\nrows written vs validated (every source row has one row_state):")
        for project, n in written.items():
            v = validated.get(project, 0)
            print(f"  {project:8} {n:7} written  {v:7} validated  ratio {v / max(n, 1):.3f}")
        print(f"  caught up after the writer stopped: {'yes' if caught_up else 'NO'}")

        print("\nbad rows: expected (rows planted) vs found (those rows with >= 1 error):")
        issued = {g: c for g, c in self._state(
            "SELECT group_id, group_concat(DISTINCT code) FROM issues "
            "WHERE project = 'intake' AND severity = 'error' GROUP BY group_id")}
        by_kind: dict[str, list[str]] = {}
        for gid, kind in self.bad_rows.items():
            by_kind.setdefault(kind, []).append(gid)
        for kind, gids in by_kind.items():
            found = [g for g in gids if g in issued]
            codes = sorted({c for g in found for c in str(issued[g]).split(",")})
            print(f"  {kind:18} expected {len(gids):3}  found {len(found):3}  "
                  f"codes {', '.join(codes) or '-'}")
        clean_flagged = sum(1 for g in issued if g not in self.bad_rows)
        print(f"  clean intake rows flagged (expected 0): {clean_flagged} of {self.clean_rows}")

        print("\nbad triggers: expected each consumed into failed/ with a reason:")
        for kind, outcome in self.triggers.items():
            print(f"  {kind:12} {outcome}")
        leaked = [p for p in (self.triggers_dir / "failed").glob("*.result.json")
                  if "leak" in p.read_text(errors="replace")] if (
            self.triggers_dir / "failed").is_dir() else []
        print(f"  results that leak the symlink target's keys (expected 0): {len(leaked)}")

        print("\nFIFO in the image root: expected one issue and no hang:")
        if fifo is not None:
            rows = self._state("SELECT count(*) FROM images WHERE path = ? AND "
                               "embed_status = 'failed'", (str(fifo),))
            other = self._state("SELECT count(*) FROM issues WHERE value_repr LIKE ? OR "
                                "message LIKE ?", (f"%{fifo.name}%", f"%{fifo.name}%"))
            n = (rows[0][0] if rows else 0) + (other[0][0] if other else 0)
            print(f"  records naming it: {n} (expected >= 1); rows kept flowing: "
                  f"{'yes' if caught_up else 'NO'}")

        events = self._events()
        print(f"\ndisk full: {disk}")
        errors = Counter(str(e.get("event")) for e in events if e.get("level") == "error")
        print(f"  error events over the run, by name: {dict(errors.most_common(8)) or '-'}")

        print("\nstate DB deleted while running: expected detected and rebuilt by the running "
              "daemon (before any restart):")
        if deleted_at is not None:
            until = min([t for t in self.kill_times if t > deleted_at], default=time.time())
            after = Counter(str(e.get("event")) for e in events
                            if (str(e.get("event", "")).startswith("store.")
                                or "state" in str(e.get("event", "")))
                            and deleted_at <= _ts(e) < until)
            print(f"  store/state events before the next kill: {dict(after) or 'none'}")
            print(f"  state DB present at the end: {self.state_db.exists()}")

        print("\nrestarts:")
        for why, n in sorted(self.restarts.items()):
            print(f"  {why:14} {n}")
        print(f"  final SIGTERM exit: {final_exit}")

        print("\nRSS (KiB), from /proc, after warm-up vs later:")
        first = self.lives[0]
        if first.rss_warm and end_rss:
            print(f"  first daemon after warm-up {first.rss_warm}; last daemon at the end "
                  f"{end_rss}; ratio {end_rss / first.rss_warm:.3f} (target 0.9..1.1)")
        for k, life in enumerate(self.lives):
            if life.rss_warm and life.rss_last:
                print(f"  daemon #{k + 1}: warm {life.rss_warm}, last {life.rss_last}, "
                      f"ratio {life.rss_last / life.rss_warm:.3f}")
        for note in self.notes:
            print(f"note: {note}")


def _ts(event: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(event.get("timestamp")).replace("Z", "+00:00")
                                      ).astimezone(UTC).timestamp()
    except ValueError:
        return 0.0


def wait_for(pred: Callable[[], bool], timeout: float,
             tick: Callable[[], None] | None = None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        if tick is not None:
            tick()
        time.sleep(0.25)
    return pred()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--rate", type=float, default=1.0,
                   help="reviewer groups per second (the crop tool follows 3 s later)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", type=Path, help="run in this folder and keep it")
    args = p.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        return Soak(args.keep.resolve(), args.minutes * 60, args.rate, args.seed).run()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        return Soak(Path(tmp), args.minutes * 60, args.rate, args.seed).run()


if __name__ == "__main__":
    sys.exit(main())
