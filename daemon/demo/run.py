"""``trainingd demo``: the real daemon on a self-contained tree, run until its work is done.

Builds ``<out>/`` (default ``data/demo/``, :mod:`daemon.demo.tree`): a legacy project with one
row per known fault, and a live project fed by the upstream simulator (a separate process
behaving like the reviewer and the crop tool).  The daemon (:class:`~daemon.service.Service`,
the object ``trainingd run`` runs) works on the main thread; a conductor thread drives the
story in steps, each ending on a *condition*, never after a fixed time (a fixed 30 s once ended
before torch had even loaded on a busy box):

1. the daemon's first pass is done (DBs validated, the embedding model loaded);
2. the simulator has reviewed its groups; it starts only now, as against a daemon that has run
   for weeks (its losers are deleted seconds after review);
3. the daemon is idle: everything validated and embedded;
4. the triggers ``explode`` (refused), ``retrain.json`` and ``inspect`` have results;
5. the live-accuracy act (:mod:`daemon.demo.live`): a ranker champion, new groups predicted
   before a second simulator run reviews them, the live pass over those reviews; then
   ``summary`` has a result, so the summary shows the model, the report and live accuracy.

Then the daemon is stopped and a tour printed (:mod:`daemon.demo.tour`).  ``--max-seconds``
caps it all: hitting it prints what was still pending and exits 75.  While waiting, one live
line says what for.  The daemon's logs go to ``<out>/daemon.log`` (JSON lines), so the terminal
tells the story instead of the log stream.

Embeddings use a random-init model (``pretrained = "none"``), recorded as such: the demo shows
the machinery, not a useful model.  Nothing is written outside ``<out>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn, TextIO

from daemon.demo import live
from daemon.demo.narrate import LiveLine, model_state, queue_text, working
from daemon.demo.tour import print_tour, trigger_result
from daemon.demo.tree import build_tree
from daemon.fsutil import atomic_write_text
from daemon.logs import configure_logging
from daemon.service import Service
from daemon.settings import Settings

#: sysexits EX_TEMPFAIL: the work was not done within --max-seconds; run again with more
EXIT_CAP = 75
EXIT_INTERRUPTED = 130
#: a daemon with nothing queued and no task for this long has caught up (events settle first)
IDLE_SECONDS = 1.5
POLL_SECONDS = 0.25

#: dropped once the daemon has caught up; the summary only after these have results
FIRST_TRIGGERS: tuple[tuple[str, str], ...] = (
    ("explode", "rm -rf /"),  # refused: unknown action, never executed
    ("retrain.json", json.dumps({"model": "ranker", "force": True})),
    ("inspect", ""),
)
LAST_TRIGGERS: tuple[tuple[str, str], ...] = (("summary", ""),)
#: the one trigger meant to fail; any other failed trigger fails the demo
REFUSED = "explode"

def run_demo(root: Path, *, max_seconds: float, groups: int, marker: str,
             out: TextIO | None = None) -> int:
    """Build the tree under ``root``, run the daemon until the demo's work is done (or the cap),
    print the tour; returns the exit code (0 done, 1 something failed, 75 the cap was hit)."""
    out = out if out is not None else sys.stdout
    started = time.monotonic()
    settings, config, log_path = build_tree(root, marker, groups=groups,
                                            max_seconds=max_seconds, out=out)

    with open(log_path, "a", encoding="utf-8") as log_stream:
        configure_logging(settings.logging.level, "json", stream=log_stream)
        try:
            service = Service(settings, config_path=config)
            conductor = Conductor(service, settings, root=root, groups=groups,
                                  started=started, deadline=started + max_seconds, out=out,
                                  log_path=log_path, config=config)
            service.hard_exit = conductor.hard_exit
            conductor.start()
            try:
                code = service.run()
            finally:
                conductor.finish()
        finally:
            configure_logging(settings.logging.level, settings.logging.format,
                              stream=sys.stderr)
    return conductor.report(code)


class Conductor:
    """Drives the demo from a side thread while the daemon runs on the main thread: waits for
    each step's condition, drops the triggers, and stops the daemon when done or at the cap."""

    def __init__(self, service: Service, settings: Settings, *, root: Path, groups: int,
                 started: float, deadline: float, out: TextIO, log_path: Path,
                 config: Path) -> None:
        self.service = service
        self.settings = settings
        self.root = root
        self.groups = groups
        self.started = started
        self.deadline = deadline
        self.out = out
        self.log_path = log_path
        self.config = config
        self.line = LiveLine(out)
        self.step = "the daemon's first pass"
        self.outcome = "running"  # done, cap, stopped, crashed
        self.error: str | None = None
        self.pending: list[str] = []
        self.dropped: list[str] = []
        self.sim: subprocess.Popen[bytes] | None = None
        self.commit_log = root / "simulator_commits.jsonl"
        self.live_sim: subprocess.Popen[bytes] | None = None
        self.live_log = root / "simulator_live_commits.jsonl"
        self.gate = root / live.GATE_NAME
        self.champion: int | None = None
        self.champion_note = ""
        self.service_done = threading.Event()
        self._idle_since: float | None = None
        self.thread = threading.Thread(target=self._run, name="demo-conductor", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        """The daemon has stopped (for whatever reason): let the conductor end, stop the
        simulator."""
        self.service_done.set()
        self.thread.join(10.0)
        self._stop_simulator()

    def hard_exit(self, code: int) -> NoReturn:
        """The daemon could not join its worker within the budget (e.g. stopped at the cap
        while torch was still importing): end like the service would, after the tour."""
        self._stop_simulator()
        try:
            code = self.report(code or 1)
        except Exception:  # the process ends now whatever the tour does
            code = EXIT_CAP if self.outcome == "cap" else (code or 1)
        with contextlib.suppress(Exception):
            self.out.flush()
            sys.stderr.flush()
        os._exit(code)

    def _run(self) -> None:
        try:
            done = (self._wait("the daemon's first pass", self._first_pass_done)
                    and self._start_simulator()
                    and self._wait("the simulator", self._simulator_done)
                    and self._wait("the daemon to catch up", self._idle)
                    and self._drop(FIRST_TRIGGERS)
                    and self._wait("trigger results", self._results_in)
                    and self._live_act()
                    and self._drop(LAST_TRIGGERS)
                    and self._wait("the daily summary", self._results_in))
            if done:
                self.outcome = "done"
        except Exception as exc:  # a bug in the demo: say so, and still stop the daemon
            self.outcome, self.error = "crashed", f"{type(exc).__name__}: {exc}"
        finally:
            self.line.clear()
            self._stop_simulator()
            self.service.stop_requested = True  # what SIGTERM does: stop within the budget
            self.service.wake.set()

    def _wait(self, step: str, condition: Any) -> bool:
        """Poll ``condition`` until it holds; False when the cap is hit or the daemon stopped."""
        self.step = step
        while True:
            if condition():
                return True
            if self.service_done.is_set() or self.service.stop_requested:
                self.outcome = "stopped"
                self.pending = self.describe_pending()
                return False
            if time.monotonic() >= self.deadline:
                self.outcome = "cap"
                self.pending = self.describe_pending()
                self.line.clear()
                print(f"\ndemo: --max-seconds reached after {self._elapsed():.0f} s with work "
                      "still pending:", file=self.out)
                for item in self.pending:
                    print(f"  - {item}", file=self.out)
                print("  a busy or slow machine needs longer: run again with a larger "
                      "--max-seconds (the daemon's log says what it did meanwhile)",
                      file=self.out, flush=True)
                return False
            self.line.show(self.step, self._live_text())
            self.service_done.wait(POLL_SECONDS)

    # -- the steps ------------------------------------------------------------------------------

    def _first_pass_done(self) -> bool:
        # the initial reconcile is the worker's first task: validation plus the model load
        return self.service.tasks_done + self.service.tasks_failed >= 1

    def _start_simulator(self) -> bool:
        self.sim = subprocess.Popen(
            [sys.executable, "-m", "daemon.demo.simulator",
             "--decisions", str(self.settings.decisions_dir), "--images",
             str(self.root / "photos"), "--project", "studio", "--groups", str(self.groups),
             "--rate", "4", "--crop-delay-seconds", "2", "--seed", "7",
             # losers are deleted a few seconds after review (in real use: minutes)
             "--delete-delay-seconds", "5", "--commit-log", str(self.commit_log)],
            stdout=subprocess.DEVNULL)
        return True

    def _simulator_done(self) -> bool:
        return self.sim is not None and self.sim.poll() is not None

    def _idle(self) -> bool:
        queue = getattr(self.service, "queue", None)
        # a pending "triggers" task only claims files (and retries result writes): not work
        busy = (queue is None or any(k != "triggers" for k in queue.pending_kinds())
                or self.service.current is not None or bool(self.service.deferred))
        now = time.monotonic()
        if busy:
            self._idle_since = None
            return False
        if self._idle_since is None:
            self._idle_since = now
        return now - self._idle_since >= IDLE_SECONDS

    def _drop(self, triggers: tuple[tuple[str, str], ...]) -> bool:
        for name, body in triggers:
            # atomic: the daemon never claims half a JSON body (temp names start with ".")
            atomic_write_text(self.settings.triggers_dir / name, body)
            self.dropped.append(name)
        return True

    def _results_in(self) -> bool:
        return not self._waiting_triggers()

    def _live_act(self) -> bool:
        """Predictions before reviews, then the live pass (:mod:`daemon.demo.live`)."""
        found = trigger_result(self.settings.triggers_dir, "retrain.json")
        self.champion, self.champion_note = live.make_champion(self.settings, found)
        if self.champion is None:  # nothing to predict with: the summary says so
            return True
        self.live_sim = subprocess.Popen(
            live.simulator_command(self.settings, self.root, gate=self.gate,
                                   commit_log=self.live_log), stdout=subprocess.DEVNULL)
        return (self._wait("predictions for the new groups", self._all_predicted)
                and self._open_gate()
                and self._wait("the reviews of predicted groups", self._live_sim_done)
                and self._drop(live.LIVE_TRIGGERS)
                and self._wait("live accuracy", self._live_recorded))

    def _all_predicted(self) -> bool:
        assert self.champion is not None
        shown = live.shown_groups(self.live_log)
        return (len(shown) >= live.LIVE_GROUPS
                and live.predicted_groups(self.settings, self.champion, shown) == len(shown))

    def _open_gate(self) -> bool:
        atomic_write_text(self.gate, "the demo: every new group is predicted\n")
        return True

    def _live_sim_done(self) -> bool:
        return self.live_sim is not None and self.live_sim.poll() is not None

    def _live_recorded(self) -> bool:
        return "predict" not in self._waiting_triggers() and live.live_reviews(self.settings) > 0

    def _waiting_triggers(self) -> list[str]:
        folder = self.settings.triggers_dir
        return [n for n in self.dropped if trigger_result(folder, n) is None]

    # -- what is pending ------------------------------------------------------------------------

    def describe_pending(self) -> list[str]:
        """One line per thing the demo was still waiting for, for the cap message."""
        items: list[str] = []
        if not self._first_pass_done():
            items.append(f"the daemon's first pass: {model_state(self.service)} "
                         f"(working: {working(self.service)})")
        if self.sim is None:
            items.append(f"the simulator: not started ({self.groups} groups to review)")
        elif self.sim.poll() is None:
            items.append(f"the simulator: {self._reviewed()} of {self.groups} groups reviewed")
        items += self._live_pending()
        queue = getattr(self.service, "queue", None)
        if queue is not None and (queue.depth() or self.service.current is not None):
            items.append(f"the daemon's queue: {queue_text(self.service)}, working: "
                         f"{working(self.service)}")
        waiting = self._waiting_triggers()
        if waiting:
            items.append(f"triggers without a result yet: {', '.join(waiting)} (in "
                         f"{self.settings.triggers_dir})")
        not_dropped = [n for n, _ in (*FIRST_TRIGGERS, *LAST_TRIGGERS) if n not in self.dropped]
        if not_dropped:
            items.append(f"triggers not dropped yet: {', '.join(not_dropped)}")
        if "summary" in not_dropped or "summary" in waiting:
            items.append(f"the daily summary: not written yet (in {self.settings.summaries_dir})")
        return items or ["nothing: the cap was hit as the last step finished"]

    def _live_pending(self) -> list[str]:
        if self.live_sim is None and not self.champion_note:
            return [f"the live act: not started (a champion, {live.LIVE_GROUPS} new groups "
                    "predicted, then reviewed, then the live pass)"]
        if self.live_sim is None or self.champion is None:
            return []
        out = []
        predicted = live.predicted_groups(self.settings, self.champion,
                                          live.shown_groups(self.live_log))
        if not self.gate.exists():
            out.append(f"the live act: {predicted} of {live.LIVE_GROUPS} new groups predicted "
                       f"by ranker v{self.champion} (reviews wait for all)")
        elif self.live_sim.poll() is None:
            out.append(f"the live act: {self._reviewed(self.live_log)} of {live.LIVE_GROUPS} "
                       "predicted groups reviewed")
        else:
            out.append(f"the live act: {live.live_reviews(self.settings)} live review(s) "
                       "recorded")
        return out

    def _reviewed(self, log: Path | None = None) -> int:
        try:
            with open(log or self.commit_log, encoding="utf-8") as fh:
                return sum(1 for line in fh if '"event": "insert"' in line)
        except OSError:
            return 0

    # -- the live line --------------------------------------------------------------------------

    def _live_text(self) -> str:
        parts = [f"[{self._elapsed():4.0f} s] waiting for {self.step}"]
        if self.step == "the daemon's first pass":
            parts.append(model_state(self.service))
        if self.step == "the simulator":
            parts.append(f"{self._reviewed()}/{self.groups} groups reviewed")
        if self.live_sim is not None:
            parts += [p.removeprefix("the live act: ") for p in self._live_pending()]
        parts.append(f"{queue_text(self.service)}, working: {working(self.service)}")
        waiting = self._waiting_triggers()
        if waiting:
            parts.append(f"triggers pending: {', '.join(waiting)}")
        return " | ".join(parts)

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    # -- the end --------------------------------------------------------------------------------

    def _stop_simulator(self) -> None:
        for sim in (self.sim, self.live_sim):
            if sim is None or sim.poll() is not None:
                continue
            sim.terminate()  # it finishes its step, closes the DB, exits 0
            try:
                sim.wait(30)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait()

    def report(self, code: int) -> int:
        """Print the tour (or what is missing) and return the demo's exit code."""
        failed = self._unexpected_failures()
        print_tour(self.settings, out=self.out, elapsed=self._elapsed(), dropped=self.dropped,
                   log_path=self.log_path, config=self.config,
                   complete=self.outcome == "done", champion_note=self.champion_note)
        if self.outcome == "cap":
            return EXIT_CAP
        if self.outcome == "stopped":
            print(f"\ndemo: the daemon stopped (exit {code}) before the demo's work was done; "
                  "still pending:", file=self.out)
            for item in self.pending:
                print(f"  - {item}", file=self.out)
            return code or EXIT_INTERRUPTED
        if self.outcome == "crashed":
            print(f"\ndemo: the demo itself failed: {self.error}", file=self.out)
            return 1
        if failed:
            print(f"\ndemo: trigger(s) failed that should have worked: {', '.join(failed)} "
                  f"(reasons above; details in {self.log_path})", file=self.out)
            return 1
        return code

    def _unexpected_failures(self) -> list[str]:
        out = []
        for name in self.dropped:
            found = trigger_result(self.settings.triggers_dir, name)
            if name != REFUSED and found is not None and found[0] == "failed":
                out.append(name)
        return out
