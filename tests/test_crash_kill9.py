"""kill -9 at 100 random moments across validation, the daemon, backfill, embedding and training.

Each family runs its real work as real processes (``trainingd validate``, ``trainingd run`` fed
by the upstream simulator, ``trainingd backfill --execute``, ``trainingd embed``, ``trainingd
train``), is killed with SIGKILL at a random moment inside the work (its duration measured once
by an uninterrupted run), and is restarted, as systemd or an operator would.  After a last clean
run the data must be exactly what one uninterrupted run makes: no row lost or doubled, no issue
duplicated, one vector per content hash, every CSV line once, only complete models behind a
consistent pointer, no partial file under a final name, and no temp file left behind.  The
leftover and partial-file checks are shown to fail on planted files, so a pass means something.

The seed is printed; rerun one with ``KILL9_SEED=<n>``.  Kills hit the whole process group
(the training command's child too), as systemd's ``KillMode=control-group`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.decisions.schema import COLUMNS, INSERT_SQL
from daemon.demo.sample import row_tuple
from daemon.settings import Settings
from daemon.store import StateStore
from daemon.validation import ProjectSource, Validator
from tests.conftest import ReviewerDB
from tests.crash_helpers import check_file, leftover_temps, partial_files
from tests.daemon_harness import wait_until, write_config
from tests.embedding_helpers import make_images

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "crash_helpers.py"
SEED = int(os.environ.get("KILL9_SEED", "20251126"))
#: real kills per family (a kill that comes after the process ended is retried, not counted)
QUOTA = {"validate": 36, "daemon": 26, "backfill": 22, "embed": 8, "train": 8}


# -- processes ----------------------------------------------------------------------------------


class Proc:
    """One command of ours in its own process group, its JSON log lines in a file."""

    def __init__(self, home: Path, argv: list[str], *, log_name: str) -> None:
        self.log_path = home / "logs" / f"{log_name}-{time.monotonic_ns()}.log"
        self.log_path.parent.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
        env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
                    "TMPDIR": str(home / "tmp"), "OMP_NUM_THREADS": "1"})
        (home / "tmp").mkdir(exist_ok=True)
        self.started = time.monotonic()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HELPER), *argv, "--config", str(home / "config.toml"),
                 "--log-format", "json"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home,
                start_new_session=True)

    def events(self) -> list[str]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(str(json.loads(line).get("event")))
            except (ValueError, AttributeError):
                continue
        return out

    def wait_marker(self, event: str | None, timeout: float = 120.0) -> float:
        """Block until ``event`` is logged (or the process ends); the time it was seen."""
        if event is not None:
            wait_until(lambda: event in self.events() or self.proc.poll() is not None,
                       timeout, what=f"{event} in {self.log_path.name}")
        return time.monotonic()

    def kill(self) -> bool:
        """SIGKILL the whole group; True when it was still running (a real kill)."""
        alive = self.proc.poll() is None
        with contextlib.suppress(ProcessLookupError):  # it ended, and its group with it
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        return alive

    def finish(self, timeout: float = 300.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@dataclass
class Killer:
    """Seeded random moments and the tally of what was hit."""

    rng: random.Random
    kills: Counter[str] = field(default_factory=Counter)
    missed: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # reported together at the end

    def strike(self, family: str, proc: Proc, marker: str | None, window_s: float) -> None:
        """Wait for the work to begin, then kill at a random moment inside ``window_s``."""
        seen = proc.wait_marker(marker)
        moment = self.rng.uniform(0.0, window_s)
        # the random moment is the point of the test, not a wait for a condition
        time.sleep(max(0.0, seen + moment - time.monotonic()))
        if proc.kill():
            self.kills[family] += 1
        else:
            self.missed[family] += 1

    def run_family(self, family: str, cycle: Any, max_tries: int) -> None:
        for _ in range(max_tries):
            if self.kills[family] >= QUOTA[family]:
                return
            cycle()
        assert self.kills[family] >= QUOTA[family], (family, self.kills, self.missed)


def measured(proc: Proc, marker: str | None) -> float:
    """Seconds from ``marker`` to the end of an uninterrupted run."""
    seen = proc.wait_marker(marker)
    code = proc.finish()
    assert code in (0, 1), proc.tail()
    # a little under the measured time: a moment after the end is a retry, and retries of the
    # families that import torch cost seconds each
    return max(0.05, 0.9 * (time.monotonic() - seen))


def home_for(root: Path, name: str, text: str = "",
             image_roots: dict[str, list[Path]] | None = None) -> Path:
    home = root / name
    (home / "data" / "training" / "ai_training_decisions").mkdir(parents=True)
    write_config(home / "config.toml", '[logging]\nlevel = "info"\n' + text,
                 image_roots=image_roots)
    return home


def decisions(home: Path) -> Path:
    return home / "data" / "training" / "ai_training_decisions"


def settings_of(home: Path) -> Settings:
    return Settings().with_data_root(home / "data")


# -- what must hold afterwards -------------------------------------------------------------------


def source_keys(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("SELECT group_id FROM ai_decisions")]
    finally:
        conn.close()


def validation_snapshot(store: StateStore, project: str) -> tuple[Any, ...]:
    rows = sorted(store.conn.execute(
        "SELECT row_key, digest, errors, warnings, pending_crop FROM row_state "
        "WHERE project = ?", (project,)).fetchall())
    issues = sorted((i.group_id or "", i.rowid or 0, i.code, i.field or "", i.value_repr)
                    for i in store.issues(project))
    return rows, issues


def assert_validation_exact(home: Path, projects: list[str]) -> int:
    """Every source row has exactly one row_state, no issue twice, and the state equals one
    uninterrupted validation from scratch.  Returns the number of rows checked."""
    settings = settings_of(home)
    store = StateStore(settings.state_db, read_only=True)
    fresh = StateStore(":memory:")
    total = 0
    try:
        dup_issues = store.conn.execute(
            "SELECT project, row_key, code, field, value_repr, count(*) FROM issues "
            "GROUP BY 1, 2, 3, 4, 5 HAVING count(*) > 1").fetchall()
        assert dup_issues == [], dup_issues
        for project in projects:
            db = decisions(home) / f"{project}.db"
            keys = source_keys(db)
            assert len(keys) == len(set(keys))
            state_keys = [r[0] for r in store.conn.execute(
                "SELECT row_key FROM row_state WHERE project = ?", (project,))]
            assert len(state_keys) == len(keys), (project, len(state_keys), len(keys))
            assert set(state_keys) == set(keys)
            Validator(fresh, settings).validate_project(ProjectSource(project, db), full=True)
            assert validation_snapshot(store, project) == validation_snapshot(fresh, project)
            cp = store.checkpoint(project)
            assert cp is not None and cp.row_count == len(keys)
            total += len(keys)
    finally:
        store.close()
        fresh.close()
    return total


def tree_problems(home: Path) -> list[str]:
    """Incomplete files under final names, temp files and scratch folders left behind (after
    the family's last clean run, which should have removed what the killed runs left)."""
    problems = [f"partial: {p}" for p in partial_files(home / "data", skip=[decisions(home)])]
    problems += [f"left behind: {p.relative_to(home)}"
                 for p in leftover_temps(home / "data", scratch=home / "tmp")]
    return problems


# -- the families --------------------------------------------------------------------------------


def validate_family(root: Path, killer: Killer) -> str:
    """``trainingd validate`` (full and incremental) while the reviewer keeps writing (WAL,
    writer open) and the crop tool finishes crops in place."""
    home = home_for(root, "validate")
    dbs = [ReviewerDB(decisions(home) / f"{p}.db") for p in ("alpha", "beta")]
    rng = random.Random(killer.rng.random())

    def write_batch(count: int) -> None:
        for db in dbs:
            rows = [db.row() for _ in range(count)]
            for r in rows:  # a crop row arrives without its box; the crop tool adds it later
                if r["user_action"] == "crop" and rng.random() < 0.5:
                    r.update(final_crop_coords=None, crop_timestamp=None, crop_match=None)
            db.conn.execute("BEGIN")
            db.conn.executemany(INSERT_SQL, [row_tuple(r) for r in rows])
            db.conn.execute("COMMIT")
            pending = [r[0] for r in db.execute(
                "SELECT group_id FROM ai_decisions WHERE user_action = 'crop' AND "
                "final_crop_coords IS NULL")]
            for gid in rng.sample(pending, len(pending) // 2):
                box = [0.1, 0.1, 0.8, 0.8] if rng.random() < 0.9 else [0.5, 0.5, 1.7, 0.9]
                db.update(gid, final_crop_coords=json.dumps(box),
                          crop_timestamp="2025-11-01T00:00:00Z")

    modes = {"full": ["validate", "--full"], "incremental": ["validate"]}
    try:
        write_batch(2000)
        setup = Proc(home, modes["incremental"], log_name="validate-setup")
        assert setup.finish() in (0, 1), setup.tail()
        # measured on runs like the killed ones: a first run writes every row, later ones less
        window = {"full": measured(Proc(home, modes["full"], log_name="v"), None)}
        write_batch(150)
        window["incremental"] = measured(Proc(home, modes["incremental"], log_name="v"), None)

        def cycle() -> None:
            write_batch(150)
            mode = "full" if killer.rng.random() < 0.75 else "incremental"
            proc = Proc(home, modes[mode], log_name=f"validate-{mode}")
            killer.strike("validate", proc, None, window[mode])

        killer.run_family("validate", cycle, QUOTA["validate"] * 3)
        final = Proc(home, ["validate"], log_name="validate-final")
        assert final.finish() in (0, 1), final.tail()
        rows = assert_validation_exact(home, ["alpha", "beta"])
    finally:
        for db in dbs:
            db.close()
    killer.problems.extend(tree_problems(home))
    return f"validate: {rows} rows, each once"


def simulator(home: Path, seed: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.demo.simulator", "--decisions", str(decisions(home)),
         "--images", str(home / "photos"), "--project", "studio", "--groups", "100000",
         "--rate", "12", "--seed", str(seed), "--crop-delay-seconds", "0.3"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})


def row_figures(home: Path) -> dict[str, int]:
    try:
        store = StateStore(settings_of(home).state_db, read_only=True)
    except Exception:  # not created yet, or being rebuilt
        return {}
    try:
        return store.row_figures("studio")
    except sqlite3.Error:
        return {}
    finally:
        store.close()


def source_figures(home: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{decisions(home) / 'studio.db'}?mode=ro", uri=True)
    try:
        total, pending = conn.execute(
            "SELECT count(*), sum(user_action = 'crop' AND final_crop_coords IS NULL) "
            "FROM ai_decisions").fetchone()
    finally:
        conn.close()
    return {"validated": total, "pending_crops": pending or 0}


def daemon_family(root: Path, killer: Killer) -> str:
    """``trainingd run`` fed by the simulator (reviewer + crop tool), triggers dropped in."""
    home = home_for(root, "daemon")
    triggers = home / "data" / "triggers"
    sim = simulator(home, killer.rng.randrange(1 << 30))
    dropped = 0
    try:
        def cycle() -> None:
            nonlocal dropped
            if killer.rng.random() < 0.3:  # report writing is among the moments killed
                triggers.mkdir(parents=True, exist_ok=True)
                name = killer.rng.choice(["inspect", "summary"])
                (triggers / f"{name}").write_text("")
                dropped += 1
            proc = Proc(home, ["run"], log_name="run")
            killer.strike("daemon", proc, "service.started", 1.2)

        killer.run_family("daemon", cycle, QUOTA["daemon"] * 3)
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(60)
    final = Proc(home, ["run"], log_name="run-final")
    try:
        wait_until(lambda: row_figures(home) == {**row_figures(home), **source_figures(home)}
                   and not any((triggers / "processing").glob("*"))
                   and not [p for p in triggers.iterdir() if p.is_file()],
                   timeout=180, what="every simulator row validated, every trigger handled")
    finally:
        final.proc.send_signal(signal.SIGTERM)
        assert final.finish(60) == 0, final.tail()
    rows = assert_validation_exact(home, ["studio"])
    handled = [p for sub in ("done", "failed") if (triggers / sub).is_dir()
               for p in (triggers / sub).iterdir() if not p.name.endswith(".result.json")]
    killer.problems.extend(tree_problems(home))
    return f"daemon: {rows} rows, each once; {dropped} triggers dropped, {len(handled)} handled"


CROP_HEADER = ("session_id,set_id,directory,image_count,chosen_index,chosen_path,crop_x1,"
               "crop_y1,crop_x2,crop_y2,timestamp,image_0_path,image_0_stage,width_0,height_0,"
               "image_1_path,image_1_stage,width_1,height_1")


def legacy_csv(path: Path, lines: int) -> list[str]:
    """A legacy crop log of ``lines`` distinct crops; returns the chosen image names."""
    names, out = [], [CROP_HEADER]
    for i in range(lines):
        name = f"20250{1 + i % 9}{1 + i % 28:02d}_{i:06d}_stage3_enhanced.png"
        ts = f"2025-10-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:{(i // 60) % 60:02d}.{i:06d}Z"
        out.append(f"2025-10-08 14:46:56,s{i},mojo1,1,0,mojo1/{name},0.0,66.0,1787.0,1853.0,"
                   f"{ts},mojo1/{name},stage3_enhanced,3072,3072,,,,")
        names.append(name)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return names


def backfill_family(root: Path, killer: Killer) -> str:
    """``trainingd backfill --execute`` of a legacy CSV, restarted after each kill."""
    home = home_for(root, "backfill")
    csv_path = home / "select_crop_log.csv"
    names = legacy_csv(csv_path, 6000)
    target = home / "data" / "backfill" / "mojo1.db"
    target.parent.mkdir(parents=True)
    argv = ["backfill", str(csv_path), "--project", "mojo1", "--execute", "--out", str(target)]
    window = measured(Proc(home, argv, log_name="backfill"), None)
    assert_backfilled_once(target, names)
    target.unlink()  # the measuring run: its DB is checked, the kills start from nothing
    completed = 0

    def cycle() -> None:
        nonlocal completed
        proc = Proc(home, argv, log_name="backfill")
        killer.strike("backfill", proc, None, window)
        if target.exists():  # killed after the DB was placed: it must be whole, then again
            assert_backfilled_once(target, names)
            target.unlink()
            completed += 1

    killer.run_family("backfill", cycle, QUOTA["backfill"] * 3)
    final = Proc(home, argv, log_name="backfill-final")
    assert final.finish() == 0, final.tail()
    assert_backfilled_once(target, names)
    killer.problems.extend(tree_problems(home))
    return f"backfill: {len(names)} CSV lines, each once ({completed} kills after placing)"


def assert_backfilled_once(db: Path, names: list[str]) -> None:
    assert check_file(db) is None
    conn = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    try:
        rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM ai_decisions").fetchall()
    finally:
        conn.close()
    gids = [r[0] for r in rows]
    chosen = Counter(json.loads(r[COLUMNS.index("images")])[0] for r in rows)
    assert len(gids) == len(set(gids)) == len(names)
    assert chosen == Counter(names)


def embed_family(root: Path, killer: Killer) -> str:
    """``trainingd embed`` (tiny random-init open_clip) while the crop tool adds images."""
    photos = root / "embed-photos"
    home = home_for(root, "embed", '[embedding]\nmodel = "trainingd-tiny"\npretrained = "none"\n'
                    'device = "cpu"\nbatch_size = 4\ndecode_workers = 1\n',
                    image_roots={"studio": [photos]})
    per_cycle = 60
    added = 0

    def add_images() -> None:
        nonlocal added
        make_images(photos / f"batch{added // per_cycle:03d}", per_cycle, start_seed=added)
        added += per_cycle

    add_images()
    window = measured(Proc(home, ["embed"], log_name="embed"), "embedding.model_loaded")

    def cycle() -> None:
        add_images()
        proc = Proc(home, ["embed"], log_name="embed")
        killer.strike("embed", proc, "embedding.model_loaded", window)

    killer.run_family("embed", cycle, QUOTA["embed"] * 3)
    # the cache removes a killed writer's temp file once it is an hour old (a younger one may
    # belong to a live `trainingd embed` beside the daemon): age them instead of waiting
    cache = settings_of(home).cache_dir
    aged = time.time() - 2 * 3600
    for tmp in leftover_temps(cache):
        os.utime(tmp, (aged, aged))
    final = Proc(home, ["embed"], log_name="embed-final")
    assert final.finish() == 0, final.tail()
    verify = Proc(home, ["embed", "--verify"], log_name="embed-verify")
    assert verify.finish() == 0, verify.tail()
    vectors = assert_one_vector_per_hash(home, photos)
    killer.problems.extend(tree_problems(home))
    return f"embed: {added} images, {vectors} vectors, one per content hash"


def assert_one_vector_per_hash(home: Path, photos: Path) -> int:
    import hashlib

    settings = settings_of(home)
    shas = {hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.rglob("*")
            if p.is_file()}
    files = sum(1 for p in photos.rglob("*") if p.is_file())
    store = StateStore(settings.state_db, read_only=True)
    try:
        rows = store.conn.execute("SELECT sha256, embedder_id, dim FROM embeddings").fetchall()
        file_rows = store.conn.execute(
            "SELECT count(*), count(DISTINCT path), sum(embed_status = 'ok') FROM images "
            "WHERE embed_status IS NOT NULL"
        ).fetchone()
    finally:
        store.close()
    assert len({r[1] for r in rows}) == 1
    assert sorted(r[0] for r in rows) == sorted(shas)  # each content hash exactly once
    assert file_rows == (files, files, files)
    npys = sorted((settings.cache_dir / "vectors").rglob("*.npy"))
    assert sorted(p.stem for p in npys) == sorted(shas)
    for p in npys:
        vec = np.load(p, allow_pickle=False)
        assert vec.shape == (rows[0][2],) and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-3
    return len(npys)


def train_family(root: Path, killer: Killer) -> str:
    """``trainingd train ranker|crop --force``: the runner and its training child."""
    home = home_for(root, "train", "[training]\nmin_train_groups = 10\nmin_holdout_groups = 3\n"
                    "epochs = 20\ncrop_epochs = 20\n")
    db = ReviewerDB(decisions(home) / "studio.db")
    try:
        db.insert_many(200)
        setup = Proc(home, ["validate"], log_name="validate")
        assert setup.finish() == 0, setup.tail()
        window = measured(Proc(home, ["train", "ranker", "--force"], log_name="train"),
                          "training.started")
        kinds = ["ranker", "crop"]

        def cycle() -> None:
            proc = Proc(home, ["train", killer.rng.choice(kinds), "--force"], log_name="train")
            killer.strike("train", proc, "training.started", window)

        killer.run_family("train", cycle, QUOTA["train"] * 3)
        for kind in kinds:
            final = Proc(home, ["train", kind, "--force"], log_name="train-final")
            assert final.finish() == 0, final.tail()
    finally:
        db.close()
    models = assert_registry_consistent(settings_of(home).models_dir)
    killer.problems.extend(tree_problems(home))
    return f"train: {models} complete models, pointer consistent"


def assert_registry_consistent(models: Path) -> int:
    """Every version has its model and metadata, whole; the pointer names complete versions and
    the reviewer's copy is the champion's weights."""
    import torch

    from daemon.training import registry

    count = 0
    for kind, prefix in registry.PREFIX.items():
        pts = {int(p.stem.split("_v")[1]) for p in models.glob(f"{prefix}_v*.pt")}
        metas = {int(p.name.split("_v")[1].split("_")[0])
                 for p in models.glob(f"{prefix}_v*_metadata.json")}
        assert pts == metas, (kind, sorted(pts ^ metas))
        for v in pts:
            meta = registry.read_metadata(models, kind, v)
            assert meta is not None and meta["file"] == f"{prefix}_v{v}.pt"
            registry.load_state(registry.model_path(models, kind, v))
        count += len(pts)
        champion = registry.champion_version(models, kind)
        if champion is None:
            continue
        assert champion in pts
        copy = models / registry.REVIEWER_DIR / f"{prefix}.pt"
        if copy.exists():
            mine = registry.load_state(registry.model_path(models, kind, champion))
            theirs = registry.load_state(copy)
            assert mine.keys() == theirs.keys()
            assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    return count


# -- the tests -----------------------------------------------------------------------------------


@pytest.fixture
def killer() -> Iterator[Killer]:
    print(f"kill -9 test seed: {SEED} (rerun with KILL9_SEED={SEED})")
    yield Killer(random.Random(SEED))


class TestHundredKills:
    """SIGKILL at 100 random moments, then everything is exactly as one clean run leaves it."""

    @pytest.mark.slow
    def test_hundred_kills_lose_and_double_nothing(self, tmp_path: Path,
                                                   killer: Killer) -> None:
        """100 kills across validate, run, backfill, embed and train: nothing lost, doubled,
        torn or left behind."""
        lines = []
        for family in (validate_family, daemon_family, backfill_family, embed_family,
                       train_family):
            lines.append(family(tmp_path, killer))
        print(f"seed {SEED}: {sum(killer.kills.values())} kills {dict(killer.kills)}, "
              f"{sum(killer.missed.values())} moments after the end {dict(killer.missed)}")
        print("\n".join(lines))
        assert sum(killer.kills.values()) == sum(QUOTA.values()) == 100
        assert killer.problems == [], "\n".join(killer.problems)


class TestChecksCanFail:
    """The after-crash checks report what they are meant to find."""

    def test_planted_temp_file_is_reported(self, tmp_path: Path) -> None:
        """A temp file a killed writer would leave (in any folder) is found."""
        data, scratch = tmp_path / "data", tmp_path / "tmp"
        (data / "ai_data" / "cache" / "ab").mkdir(parents=True)
        scratch.mkdir()
        assert leftover_temps(data, scratch=scratch) == []
        planted = [data / "ai_data" / "cache" / "ab" / ".abc.npy.k3j2.tmp",
                   data / ".mojo1.db.x8f.tmp-journal", scratch / "trainingd-backfill-q1"]
        planted[0].write_bytes(b"half")
        planted[1].write_bytes(b"")
        planted[2].mkdir()
        assert leftover_temps(data, scratch=scratch) == sorted(planted)

    def test_torn_files_under_final_names_are_reported(self, tmp_path: Path) -> None:
        """Half a vector, half a JSON document, a torn index line and a damaged DB are found;
        whole ones and temp files are not reported as partial."""
        np.save(tmp_path / "whole.npy", np.ones(4, dtype=np.float32))
        (tmp_path / "torn.npy").write_bytes((tmp_path / "whole.npy").read_bytes()[:100])
        (tmp_path / "half.json").write_text('{"a": [1, 2')
        (tmp_path / "ok.json").write_text('{"a": 1}')
        (tmp_path / "index.jsonl").write_text('{"a": 1}\n{"b": ')
        db = tmp_path / "x.db"
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE t (a)")
        conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(2000)])
        conn.commit()
        conn.close()
        with db.open("r+b") as fh:
            fh.truncate(db.stat().st_size // 2)
        (tmp_path / ".report.json.abc.tmp").write_text("{")
        found = {Path(line.split(":")[0]).name for line in partial_files(tmp_path)}
        assert found == {"torn.npy", "half.json", "index.jsonl", "x.db"}


class TestKilledRunLeavesNothing:
    """What one SIGKILL leaves behind is gone after the next clean run."""

    def test_backfill_removes_what_a_killed_backfill_left(self, tmp_path: Path) -> None:
        """The temp DB (and its journal) beside the target and the scratch folder in $TMPDIR of
        a killed backfill are removed by the next backfill, which writes every line once."""
        home = home_for(tmp_path, "backfill")
        csv_path = home / "log.csv"
        names = legacy_csv(csv_path, 20_000)
        target = home / "data" / "backfill" / "mojo1.db"
        target.parent.mkdir(parents=True)
        argv = ["backfill", str(csv_path), "--project", "mojo1", "--execute", "--out",
                str(target)]
        killed = Proc(home, argv, log_name="backfill")
        wait_until(lambda: any(target.parent.glob(".mojo1.db.*.tmp"))
                   or killed.proc.poll() is not None, 60, what="the temp DB")
        assert killed.kill(), "the backfill ended before it could be killed"
        left = leftover_temps(home / "data", scratch=home / "tmp")
        assert any(p.name.endswith(".tmp") for p in left)
        assert any(p.name.startswith("trainingd-backfill-") for p in left)
        again = Proc(home, argv, log_name="backfill")
        assert again.finish() == 0, again.tail()
        assert_backfilled_once(target, names)
        assert leftover_temps(home / "data", scratch=home / "tmp") == []

    @pytest.mark.slow
    def test_killed_training_leaves_no_scratch_folder(self, tmp_path: Path) -> None:
        """`trainingd train` killed (with its child) mid-training leaves nothing in $TMPDIR."""
        home = home_for(tmp_path, "train", "[training]\nmin_train_groups = 10\n"
                        "min_holdout_groups = 3\nepochs = 10000\n")
        db = ReviewerDB(decisions(home) / "studio.db")
        try:
            db.insert_many(100)
            assert Proc(home, ["validate"], log_name="validate").finish() == 0
        finally:
            db.close()
        proc = Proc(home, ["train", "ranker", "--force"], log_name="train")
        children = Path(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children")
        wait_until(lambda: "training.started" in proc.events() and children.is_file()
                   and children.read_text().strip() != "", 120, what="the training child")
        assert proc.kill()
        assert leftover_temps(home / "data", scratch=home / "tmp") == []

    def test_abandoned_temp_is_removed_and_a_live_one_kept(self, tmp_path: Path) -> None:
        """A temp file no writer holds is removed; one being written now is left alone and its
        write completes."""
        from daemon.fsutil import atomic_writer, remove_abandoned_temps

        abandoned = tmp_path / ".daily_summary_2025-11-01.png.k3j2x.tmp"
        abandoned.write_bytes(b"half a plot")
        with atomic_writer(tmp_path / "report.json", "w") as fh:
            fh.write('{"a": 1}')
            assert remove_abandoned_temps(tmp_path) == 1
            assert [p.name for p in tmp_path.glob(".report.json.*.tmp")] != []
        assert not abandoned.exists() and leftover_temps(tmp_path) == []
        assert json.loads((tmp_path / "report.json").read_text()) == {"a": 1}
