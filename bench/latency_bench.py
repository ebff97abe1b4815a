"""Commit -> validated latency of the running daemon, and its idle footprint.

Starts ``trainingd run`` (a real process, debug logs so each checked row is a line) and the
upstream simulator committing N rows one by one; matches every commit (the simulator's commit
log, wall time) with the first ``validation.row_checked`` line for that group; prints p50/p95/max
against the target p95 <= settle delay + 0.5 s.  Then lets the daemon idle and prints its RSS
and CPU share (target < 1%).  One run, ratios and percentiles: the machine is shared.

    python bench/latency_bench.py [--rows 500] [--rate 10] [--idle-seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.daemon_harness import Daemon, wait_until, write_config  # noqa: E402

SETTLE = 0.2


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--rate", type=float, default=10.0, help="commits per second")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        decisions = home / "data" / "training" / "ai_training_decisions"
        decisions.mkdir(parents=True)
        (home / "photos").mkdir()
        config = write_config(home / "config.toml",
                              '[logging]\nlevel = "debug"\n',
                              image_roots={"bench": [home / "photos"]})
        config.write_text(config.read_text().replace("settle_seconds = 0.2",
                                                     f"settle_seconds = {SETTLE}"))
        daemon = Daemon(config)
        daemon.wait_event("service.started", timeout=60)
        commits = home / "commits.jsonl"
        sim = subprocess.run(
            [sys.executable, "-m", "daemon.demo.simulator", "--decisions", str(decisions),
             "--images", str(home / "photos"), "--project", "bench", "--groups",
             str(args.rows), "--rate", str(args.rate), "--crop-delay-seconds", "1",
             "--commit-log", str(commits)], capture_output=True, timeout=3600)
        assert sim.returncode == 0, sim.stderr
        inserts = {}
        for line in commits.read_text().splitlines():
            rec = json.loads(line)
            if rec["event"] == "insert":
                inserts[rec["group_id"]] = float(rec["wall"])

        def checked() -> dict[str, float]:
            out: dict[str, float] = {}
            for r in daemon.records():
                if r.get("event") == "validation.row_checked" and r["group_id"] in inserts:
                    out.setdefault(r["group_id"],
                                   datetime.fromisoformat(r["timestamp"]).timestamp())
            return out

        wait_until(lambda: len(checked()) == len(inserts), timeout=120, what="all validated")
        seen = checked()
        lat = sorted(seen[g] - inserts[g] for g in inserts)
        p50, p95 = statistics.median(lat), lat[int(0.95 * (len(lat) - 1))]
        print(f"commit -> validated over {len(lat)} rows at {args.rate:g}/s: "
              f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms "
              f"(target p95 <= settle {SETTLE} s + 0.5 s = {(SETTLE + 0.5) * 1000:.0f} ms)")
        # idle: the queue drains, then nothing happens for a while
        pid = daemon.proc.pid
        time.sleep(3)
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(args.idle_seconds)
        share = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
        print(f"idle: RSS {rss_mib(pid):.0f} MiB, CPU {share * 100:.2f}% of one core over "
              f"{args.idle_seconds:g} s (target < 1%)")
        assert daemon.stop() == 0


if __name__ == "__main__":
    main()
