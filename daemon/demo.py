"""``trainingd demo``: the real daemon on a self-contained tree, for a first look.

Builds ``data/demo/`` with its own ``config.toml``: a legacy project whose DB was written by an
older script (no CHECKs) with one row per known fault, and a live project fed by the upstream
simulator (a separate process behaving like the reviewer and the crop tool).  Runs
``trainingd run`` in-process for a bounded time while dropping a few trigger files, then prints
where every output went.  Embeddings use a random-init model (``pretrained = "none"``), which is
recorded as such: the demo shows the machinery, not a useful model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from daemon.sample import write_sample_project
from daemon.service import Service
from daemon.settings import load_settings

DEMO_CONFIG = """\
# written by `trainingd demo`; run the same daemon again with:
#   trainingd run --config {config}
[paths]
data_root = "."

[watcher]
settle_seconds = 0.2
max_wait_seconds = 1.0

[service]
heartbeat_seconds = 1

[embedding]
pretrained = "none"     # random init: a demo, never for real use
batch_size = 16

[training]
min_new_labels = 20
min_train_groups = 10
min_holdout_groups = 3
epochs = 5
crop_epochs = 10

[projects.studio]
image_roots = ["photos"]
"""


def run_demo(root: Path, *, seconds: float, groups: int, marker: str) -> int:
    root.mkdir(parents=True, exist_ok=True)
    (root / marker).write_text("made by trainingd demo; safe to delete\n")
    config = root / "config.toml"
    config.write_text(DEMO_CONFIG.format(config=config))
    (root / "photos").mkdir(exist_ok=True)
    settings = load_settings(config)
    _, planted = write_sample_project(settings.decisions_dir, "legacy", rows=60)
    print(f"demo tree: {root}")
    print(f"  legacy.db: 60 rows + {len(planted)} planted faults "
          f"({', '.join(sorted(set(planted.values())))})")
    print(f"  studio: the simulator reviews {groups} groups into photos/ while the daemon runs")
    print(f"running the daemon for {seconds:g} s (logs on stderr) ...\n", flush=True)

    sim = subprocess.Popen(
        [sys.executable, "-m", "daemon.simulator", "--decisions", str(settings.decisions_dir),
         "--images", str(root / "photos"), "--project", "studio", "--groups", str(groups),
         "--rate", "4", "--crop-delay-seconds", "2", "--seed", "7",
         # losers are deleted a few seconds after review (in real use: minutes); faster than
         # the embedding stage reaches them, they would show up as image_vanished: data lost
         "--delete-delay-seconds", "5"],
        stdout=subprocess.DEVNULL)
    triggers = settings.triggers_dir

    def drop_triggers() -> None:
        time.sleep(max(1.0, seconds * 0.25))
        (triggers / "explode").write_text("rm -rf /")  # refused: unknown action
        time.sleep(max(1.0, seconds * 0.35))
        (triggers / "retrain.json").write_text(json.dumps({"model": "ranker", "force": True}))
        time.sleep(max(1.0, seconds * 0.2))
        (triggers / "inspect").write_text("")
        (triggers / "summary").write_text("")

    threading.Thread(target=drop_triggers, daemon=True).start()
    code = Service(settings, config_path=config, run_seconds=seconds).run()
    if sim.poll() is None:
        sim.terminate()
    sim.wait(30)

    print("\nwhat the daemon left behind:")
    for label, folder, pattern in (
            ("inspection report", settings.summaries_dir, "ai_training_inspection_*.json"),
            ("daily summary", settings.summaries_dir, "daily_summary_*.md"),
            ("summary plots", settings.summaries_dir, "*.png"),
            ("models", settings.models_dir, "*_metadata.json"),
            ("embeddings (.npy)", settings.cache_dir, "**/*.npy"),
            ("triggers done", triggers / "done", "*.result.json"),
            ("triggers failed", triggers / "failed", "*.result.json")):
        found = sorted(folder.glob(pattern)) if folder.is_dir() else []
        shown = ", ".join(p.name for p in found[:3]) + (" ..." if len(found) > 3 else "")
        print(f"  {label:19} {len(found):4}  {folder}  {shown}")
    print()
    from daemon.cli import print_status

    print_status(settings)
    print(f"\nagain, by hand: trainingd status --config {config}")
    return code
