"""Issue 10, item 6: metrics and health.  A real ``trainingd run`` with ``metrics.listen`` on a
loopback port (``:0``, the bound port read from its ``metrics.listening`` line) is scraped
with urllib and parsed with ``prometheus_client.parser``; the decision DB is a real WAL DB
whose writer stays open; ``/healthz`` turns 503 when the worker stops moving (the Embedder seam
of the health tests) and 200 again when it moves; the node_exporter textfile is checked for
content and mode; a non-loopback address is refused with 78.  The example Grafana dashboard
and alert rules are checked against a real scrape."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import LiveFacts, Metrics, judge_health, lane_of
from daemon.metrics.figures import StateFigures, read_state_figures
from daemon.settings import Settings, load_settings
from daemon.store import StateStore
from daemon.training import policy
from tests.conftest import ReviewerDB
from tests.daemon_harness import Daemon, wait_until, write_config
from tests.embedding_helpers import make_images
from tests.health_helpers import ROOT, Launched, release, tiny_embedding_toml
from tests.test_systemd import clean_env, jailed, needs_jail

DOCS = ROOT / "Documents"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Scrape:
    """One real scrape of a running daemon, and what it wrote beside it."""

    text: str
    families: dict[str, Any]
    samples: Samples
    healthz_code: int
    healthz: dict[str, Any]
    textfile: str
    textfile_mode: int
    started: float
    exit_code: int
    log: list[dict[str, Any]]

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def series_names(self) -> set[str]:
        """Every series name this scrape can hold, empty families included."""
        suffixes = {"counter": ("_total", "_created"), "histogram": (
            "_bucket", "_count", "_sum", "_created"), "summary": ("_count", "_sum", "_created")}
        names = {s[0] for s in self.samples}
        for name, fam in self.families.items():
            names.add(name)
            names.update(name + suffix for suffix in suffixes.get(fam.type, ()))
        return names


def parse(text: str) -> tuple[dict[str, Any], Samples]:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    return families, samples


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def listening_port(daemon: Daemon) -> int:
    return int(daemon.wait_event("metrics.listening", timeout=120)["port"])


def _decisions(home: Path) -> Path:
    return home / "data" / "training" / "ai_training_decisions"


def _seed_models_and_runs(home: Path) -> None:
    """A promoted ranker v2 in the registry and two finished runs in the state DB, written
    the way the trainer writes them."""
    models = home / "data" / "ai_data" / "models"
    models.mkdir(parents=True)
    (models / "champions.json").write_text(json.dumps(
        {"ranker": {"version": 2, "file": "ranker_v2.pt", "promoted_at": "2026-11-30T06:00:00Z"}}))
    (models / "ranker_v2_metadata.json").write_text(json.dumps({
        "version": 2, "holdout_size": 40, "metrics": {
            "model": {"top1": 0.8}, "baseline_highest_stage": {"top1": 0.6}}}))
    store = StateStore(home / "data" / "daemon" / "state.db")
    now = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
    for status, version in (("promoted", 2), ("failed", None)):
        run = policy.record_run_start(store, "ranker", now, new_labels=250)
        policy.record_run_end(store, run, status=status, now=now, version=version,
                              promoted=status == "promoted", reason="test", metrics={},
                              kind="ranker")
    store.close()
    summaries = home / "data" / "daily_summaries"
    summaries.mkdir(parents=True)
    (summaries / "daily_summary_2026-11-30.json").write_text("{}\n")


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrape]:
    """Run the daemon (tiny model) on a WAL DB with its writer open and three images, add rows
    while it runs, scrape /metrics and /healthz, read the textfile, stop it."""
    home = tmp_path_factory.mktemp("metrics")
    _decisions(home).mkdir(parents=True)
    db = ReviewerDB(_decisions(home) / "demo.db", checks=False)
    db.insert_many(20)
    db.insert(ai_confidence=1.7)
    db.insert(user_action="Approve")
    make_images(home / "images", 3)
    _seed_models_and_runs(home)
    (home / "textfile").mkdir()
    config = write_config(home / "config.toml", tiny_embedding_toml() + (
        '[metrics]\nlisten = "127.0.0.1:0"\ntextfile = "textfile/trainingd.prom"\n'
        "cache_seconds = 0\n"), image_roots={"demo": [home / "images"]})
    started = datetime.now(UTC).timestamp()
    old = os.umask(0o027)
    try:
        daemon = Launched(config, "run")
    finally:
        os.umask(old)
    try:
        port = listening_port(daemon)

        def scraped() -> Samples:
            return parse(get(port, "/metrics")[1].decode())[1]

        def has(name: str, want: float, **labels: str) -> bool:
            return scraped().get((name, tuple(sorted(labels.items())))) == want

        wait_until(lambda: has("trainingd_rows_known", 22, project="demo")
                   and has("trainingd_images_embedded_total", 3), 120, "first pass and embed")
        db.insert_many(3)  # the reviewer keeps writing; its connection stays open
        wait_until(lambda: has("trainingd_rows_known", 25, project="demo"), 60, "3 new rows")
        text = get(port, "/metrics")[1].decode()
        code, body = get(port, "/healthz")
        textfile = home / "textfile" / "trainingd.prom"
        wait_until(textfile.exists, 30, "the textfile")
        content, mode = textfile.read_text(), textfile.stat().st_mode & 0o777
    finally:
        exit_code = daemon.stop()
        db.close()
    families, samples = parse(text)
    yield Scrape(text, families, samples, code, json.loads(body), content, mode, started,
                 exit_code, daemon.records())


@pytest.mark.slow
class TestScrape:
    """What a real scrape of a running daemon shows."""

    def test_rows_validated_and_known_follow_a_live_wal_db(self, scrape: Scrape) -> None:
        """Rows written while the writer stays open are counted as validated and known."""
        assert scrape.value("trainingd_rows_known", project="demo") == 25
        validated = scrape.value("trainingd_rows_validated_total", project="demo")
        assert validated is not None and validated >= 25
        assert scrape.families["trainingd_rows_validated"].type == "counter"

    def test_issues_by_code_and_severity(self, scrape: Scrape) -> None:
        """The two planted rows show as issue gauges labelled by project, code and severity."""
        for code in ("ai_confidence_invalid", "user_action_invalid"):
            assert scrape.value("trainingd_issues", project="demo", code=code,
                                severity="error") == 1
        assert all(dict(labels).keys() == {"project", "code", "severity"}
                   for name, labels in scrape.samples if name == "trainingd_issues")

    def test_embedding_counter_backlog_and_rate(self, scrape: Scrape) -> None:
        """Three images embedded, none left waiting, a positive rate, a last-embed time."""
        assert scrape.value("trainingd_images_embedded_total") == 3
        assert scrape.value("trainingd_images_present", project="demo") == 3
        assert scrape.value("trainingd_embedding_backlog_images", project="demo") == 0
        rate = scrape.value("trainingd_embed_images_per_second")
        assert rate is not None and rate > 0
        assert scrape.value("trainingd_seconds_since_last_success", stage="embed") is not None

    def test_training_runs_and_champion_figures(self, scrape: Scrape) -> None:
        """Finished runs by model and outcome; the champion's version, score, baseline and n."""
        assert scrape.value("trainingd_training_runs_total", model="ranker",
                            outcome="promoted") == 1
        assert scrape.value("trainingd_training_runs_total", model="ranker",
                            outcome="failed") == 1
        assert scrape.value("trainingd_champion_version", model="ranker") == 2
        assert scrape.value("trainingd_champion_score", model="ranker") == pytest.approx(0.8)
        assert scrape.value("trainingd_champion_baseline_score",
                            model="ranker") == pytest.approx(0.6)
        assert scrape.value("trainingd_champion_holdout_size", model="ranker") == 40

    def test_tasks_per_lane_and_queue_depth(self, scrape: Scrape) -> None:
        """Task counts and durations carry lane and kind; the queue gauge exists per lane."""
        assert scrape.value("trainingd_tasks_total", lane="fast", kind="reconcile",
                            outcome="ok") == 1
        count = scrape.value("trainingd_task_duration_seconds_count", lane="heavy",
                             kind="embed")
        assert count is not None and count >= 1
        assert scrape.families["trainingd_queue_depth"].type == "gauge"
        assert all(dict(labels).get("lane") in ("fast", "heavy")
                   for name, labels in scrape.samples
                   if name.startswith(("trainingd_queue_depth", "trainingd_task")))

    def test_last_successes_start_time_and_build_info(self, scrape: Scrape) -> None:
        """Seconds since validation and summary are computed; start time and version shown."""
        since = scrape.value("trainingd_seconds_since_last_success", stage="validation")
        assert since is not None and 0 <= since < 600
        summary = scrape.value("trainingd_seconds_since_last_success", stage="summary")
        assert summary is not None and summary >= 0
        start = scrape.value("trainingd_process_start_time_seconds")
        assert start is not None and scrape.started - 5 <= start <= scrape.started + 300
        from daemon import __version__

        assert [dict(lb)["version"] for name, lb in scrape.samples
                if name == "trainingd_build_info"] == [__version__]

    def test_no_label_names_a_path_or_group(self, scrape: Scrape) -> None:
        """Label cardinality stays bounded: no label value is a path or a group_id."""
        labels = {k for _, lb in scrape.samples for k, _ in lb}
        assert not labels & {"path", "group_id", "file", "db_file"}
        values = {v for name, lb in scrape.samples if name.startswith("trainingd_")
                  for _, v in lb}
        assert not [v for v in values if "/" in v]

    def test_healthz_is_200_with_json_while_healthy(self, scrape: Scrape) -> None:
        """/healthz answers 200 and names each check it made."""
        assert scrape.healthz_code == 200
        assert scrape.healthz["status"] == "ok"
        assert set(scrape.healthz["checks"]) == {"observer", "worker", "progress", "state_db"}
        assert scrape.value("trainingd_healthy") == 1

    def test_textfile_is_written_parses_and_has_the_umask_mode(self, scrape: Scrape) -> None:
        """The node_exporter textfile parses, holds the figures and is 0640 under umask 027."""
        families, samples = parse(scrape.textfile)
        assert samples[("trainingd_rows_known", (("project", "demo"),))] >= 22
        assert "trainingd_rows_validated" in families and "trainingd_issues" in families
        assert not [name for name in families if name.startswith("process_")]
        assert scrape.textfile_mode == 0o640

    def test_the_daemon_stops_cleanly_and_logs_json_only(self, scrape: Scrape) -> None:
        """The listener never writes plain-text access lines into the JSON log stream."""
        assert scrape.exit_code == 0
        assert not [r for r in scrape.log if r.get("event") == "non_json_line"]


class TestRefused:
    """A listener address that would expose the data beyond this machine is a config error."""

    @pytest.mark.parametrize("listen", ["0.0.0.0:9477", "192.168.1.10:9477", "[::]:9477",
                                        "metrics.example.com:9477"])
    def test_non_loopback_listen_exits_78(self, tmp_path: Path, listen: str) -> None:
        """`trainingd run` refuses a non-loopback metrics.listen with 78 and names the key."""
        config = write_config(tmp_path / "config.toml", f'[metrics]\nlisten = "{listen}"\n')
        out = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", str(config)],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 78, out.stderr
        assert "metrics.listen" in out.stderr and "allow_remote" in out.stderr
        assert not (tmp_path / "data" / "daemon" / "heartbeat.json").exists()

    @pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000"])
    def test_malformed_listen_is_a_config_error(self, tmp_path: Path, listen: str) -> None:
        """A listen value that is not HOST:PORT is refused when the settings load."""
        config = write_config(tmp_path / "config.toml", f'[metrics]\nlisten = "{listen}"\n')
        from daemon.errors import ConfigError

        with pytest.raises(ConfigError, match="metrics"):
            load_settings(config)

    def test_allow_remote_and_loopback_forms_are_accepted(self, tmp_path: Path) -> None:
        """allow_remote lets any address through; localhost and ::1 are loopback."""
        for text in ('listen = "0.0.0.0:9477"\nallow_remote = true',
                     'listen = "localhost:9477"', 'listen = "[::1]:9477"'):
            config = write_config(tmp_path / "config.toml", f"[metrics]\n{text}\n")
            assert load_settings(config).metrics.listen


@pytest.mark.slow
class TestHealthz:
    """/healthz follows whether work moves, through the health tests' Embedder seam."""

    def test_503_while_the_worker_stalls_and_200_once_it_moves(self, tmp_path: Path) -> None:
        """A decode thread blocked in open() on a FIFO: 503 naming the task; released: 200."""
        images = tmp_path / "images"
        make_images(images, 1)
        _decisions(tmp_path).mkdir(parents=True)
        ReviewerDB(_decisions(tmp_path) / "demo.db").close()
        blocker = tmp_path / "block.fifo"
        os.mkfifo(blocker)
        # stall_seconds high: the daemon must not restart itself during the test
        config = write_config(tmp_path / "config.toml", tiny_embedding_toml() + (
            '[metrics]\nlisten = "127.0.0.1:0"\nhealthz_quiet_seconds = 1\n'),
            image_roots={"demo": [images]})
        daemon = Launched(config, "blocking", str(blocker),
                          env={"TRAININGD_SERVICE__STALL_SECONDS": "600"})
        try:
            port = listening_port(daemon)
            wait_until(lambda: Path(str(blocker) + ".blocked").exists(), 120,
                       "a decode thread blocked in open()")
            wait_until(lambda: get(port, "/healthz")[0] == 503, 60, "healthz 503")
            code, body = get(port, "/healthz")
            doc = json.loads(body)
            assert code == 503 and doc["status"] == "unhealthy"
            assert any(r.startswith("progress:") and "embed" in r for r in doc["reasons"])
            assert doc["checks"]["observer"] == "alive" and doc["checks"]["worker"] == "alive"
            _, samples = parse(get(port, "/metrics")[1].decode())
            assert samples[("trainingd_healthy", ())] == 0
            release(blocker)
            wait_until(lambda: get(port, "/healthz")[0] == 200, 60, "healthz 200 again")
        finally:
            release(blocker)
            code = daemon.stop()
        assert code == 0


class _Jailed(Daemon):
    """:class:`Daemon`, but run under trainingd.service's system call and socket rules."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log_path = config.parent / "daemon-jailed.log"
        self.log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            jailed("trainingd.service", [sys.executable, "-m", "daemon", "run", "--config",
                                         str(config), "--log-format", "json"]),
            stdout=self.log_file, stderr=subprocess.STDOUT, cwd=config.parent, env=clean_env())


@pytest.mark.slow
@needs_jail
class TestHardenedUnit:
    """Under trainingd.service's own rules (no AF_INET sockets) the textfile is the way."""

    def test_refused_listener_is_logged_and_the_textfile_still_works(self, make_db: Any,
                                                                      settings: Settings
                                                                      ) -> None:
        """socket(AF_INET) is refused by the unit's filter: metrics.listen_failed names the
        drop-in, validation goes on, the textfile is written, SIGTERM exits 0."""
        make_db().insert_many(5)
        home = settings.base_dir
        (home / "textfile").mkdir()
        config = write_config(home / "config.toml", (
            '[metrics]\nlisten = "127.0.0.1:9477"\ntextfile = "textfile/trainingd.prom"\n'))
        daemon = _Jailed(config)
        try:
            failed = daemon.wait_event("metrics.listen_failed", timeout=120)
            assert "METRICS.md" in failed["hint"] and failed["listen"] == "127.0.0.1:9477"
            daemon.wait_event("validation.project_checked", timeout=60, project="mojo3")
            textfile = home / "textfile" / "trainingd.prom"
            wait_until(textfile.exists, 60, "the textfile")
            _, samples = parse(textfile.read_text())
            assert samples[("trainingd_healthy", ())] == 1
        finally:
            code = daemon.stop()
        assert code == 0


class TestAccounting:
    """The pure parts: task accounting, the health verdict, the lane label."""

    def _metrics(self, settings: Settings, facts: LiveFacts) -> Metrics:
        return Metrics(lambda: settings, lambda limit: facts, started_at=datetime.now(UTC))

    def test_odd_results_are_never_raised_into_the_worker(self, settings: Settings) -> None:
        """A result of an unexpected shape is logged and skipped, never raised."""
        m = self._metrics(settings, _facts())
        m.task_finished("validate", "p", True, {"projects": [{"rows_checked": "many"}]}, 0.1)
        m.task_finished("embed", None, True, {"embedded": 4, "duration_s": 2.0}, 2.0)
        m.task_finished("embed", None, True, {"error": "model gone"}, 1.0)
        m.task_finished("validate", "p", True, {"projects": [
            {"project": "p", "mode": "skipped", "rows_checked": 9}]}, 0.1)
        _, samples = parse(m.exposition().decode())
        assert samples[("trainingd_images_embedded_total", ())] == 4
        assert samples[("trainingd_embed_images_per_second", ())] == 2.0
        assert ("trainingd_rows_validated_total", (("project", "p"),)) not in samples

    @pytest.mark.parametrize(("changes", "failing"), [
        ({}, ()),
        ({"observer_alive": False}, ("observer",)),
        ({"worker_alive": False}, ("worker",)),
        ({"no_progress": True, "current_kind": "embed"}, ("progress",)),
        ({"stalled": True}, ("progress",)),
        ({"state_db_problem": "deleted"}, ("state_db",)),
    ])
    def test_health_verdict(self, changes: dict[str, Any], failing: tuple[str, ...]) -> None:
        """Each failed check makes the verdict unhealthy and names itself in the reasons."""
        health = judge_health(_facts(**changes), StateFigures(read_ok=True), 10.0)
        assert health.ok == (not failing)
        assert health.failing == failing
        assert [r.split(":")[0] for r in health.reasons] == list(failing)

    def test_unreadable_state_db_is_unhealthy(self, settings: Settings) -> None:
        """A state DB path that holds no readable DB fails the state_db check."""
        settings.state_db.parent.mkdir(parents=True)
        settings.state_db.write_bytes(b"not a database at all" * 10)
        figures = read_state_figures(settings)
        assert not figures.read_ok
        assert judge_health(_facts(), figures, 10.0).failing == ("state_db",)

    def test_two_lanes(self) -> None:
        """Validation runs in the fast lane; embedding, training and the summary in the heavy."""
        assert {lane_of(k) for k in ("validate", "sidecar", "image")} == {"fast"}
        assert {lane_of(k) for k in ("embed", "retrain", "summary")} == {"heavy"}


def _facts(**changes: Any) -> LiveFacts:
    base: dict[str, Any] = {
        "queue_by_kind": {}, "current_kind": None, "current_seconds": None,
        "quiet_seconds": 0.0, "no_progress": False, "observer_alive": True,
        "worker_alive": True, "stalled": False, "state_db_problem": None, "paused": False,
        "embedding_disabled": False}
    return LiveFacts(**{**base, **changes})


@pytest.mark.slow
class TestExamples:
    """The Grafana dashboard and the alert rules in Documents/ match what a scrape holds."""

    def test_dashboard_imports_and_covers_every_family(self, scrape: Scrape) -> None:
        """Valid dashboard JSON with a datasource variable; every trainingd_ name it queries
        exists in a real scrape, and every family of the scrape has a panel."""
        doc = json.loads((DOCS / "grafana-dashboard.json").read_text())
        assert doc["schemaVersion"] >= 30 and doc["title"] and doc["uid"]
        variables = doc["templating"]["list"]
        assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in variables)
        exprs = [t["expr"] for p in _panels(doc["panels"]) for t in p.get("targets", [])]
        for panel in _panels(doc["panels"]):
            if panel.get("type") != "row":
                assert "${datasource}" in json.dumps(panel.get("datasource")), panel["title"]
        used = _names(" ".join(exprs))
        assert used - scrape.series_names() == set()
        families = {n for n in scrape.families if n.startswith("trainingd_")
                    and not n.endswith("_created")}
        assert {f for f in families if not any(u.startswith(f) for u in used)} == set()

    def test_alert_rules_parse_and_query_real_metrics(self, scrape: Scrape) -> None:
        """The rules parse (promtool when installed, and YAML when PyYAML is), cover the cases
        the issue names, and every trainingd_ name they use exists in a real scrape."""
        path = DOCS / "prometheus-alerts.yml"
        text = path.read_text()
        names = set(re.findall(r"^\s*- alert: (\w+)$", text, re.MULTILINE))
        assert {"TrainingdDown", "TrainingdUnhealthy", "TrainingdNoValidation",
                "TrainingdErrorsRising", "TrainingdEmbeddingBacklogGrowing",
                "TrainingdTrainingFailing", "TrainingdSummaryMissed"} <= names
        assert _names(text) - scrape.series_names() == set()
        try:
            import yaml
        except ImportError:  # not a dependency of trainingd; promtool or the regexes above
            yaml = None
        if yaml is not None:
            doc = yaml.safe_load(text)
            rules = [r for g in doc["groups"] for r in g["rules"]]
            assert {r["alert"] for r in rules} == names
            assert all(r["expr"] and r["labels"]["severity"] for r in rules)
        promtool = shutil.which("promtool")
        if promtool:
            out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                                 text=True, timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def _names(text: str) -> set[str]:
    return set(re.findall(r"\btrainingd_[a-z0-9_]+", text))
