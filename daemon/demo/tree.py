"""The demo's tree: its ``config.toml`` (demo-scale settings), the legacy project with its
planted faults, the folders the simulator fills; and the lines that say what it holds.

Split from :mod:`daemon.demo.run` along its seam: what the demo runs on, built once before the
daemon starts, versus the conductor that drives the daemon through its steps.  Nothing is
written outside ``root``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from daemon.demo.live import LIVE_GROUPS
from daemon.demo.sample import write_sample_project
from daemon.settings import Settings, load_settings

LEGACY_ROWS = 60

DEMO_CONFIG = """\
# written by `trainingd demo`; run the same daemon again with:
#   trainingd run --config {config}
[paths]
data_root = "."
create_missing = true   # the demo makes its folders; a real config leaves this false

[watcher]
settle_seconds = 0.2
max_wait_seconds = 1.0

[service]
heartbeat_seconds = 1
shutdown_budget_seconds = 5

[embedding]
pretrained = "none"     # random init: a demo, never for real use
batch_size = 16

[training]
# demo scale: a few dozen groups in three sides; promotion needs 100 test groups (not here:
# the demo makes the retrained ranker trainingd's champion itself, see daemon/demo/live.py)
min_new_labels = 20
holdout_fraction = 0.3
validation_fraction = 0.2
min_train_groups = 3
min_holdout_groups = 1
epochs = 5
crop_epochs = 10

[projects.studio]
image_roots = ["photos"]

[projects.legacy]  # planted faults, no images: validated and reported, never trained on
train = false
"""


def build_tree(root: Path, marker: str, *, groups: int, max_seconds: float, out: TextIO
               ) -> tuple[Settings, Path, Path]:
    """Write the tree under ``root`` and say what it holds; ``(settings, config, log path)``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / marker).write_text("made by trainingd demo; safe to delete\n")
    config = root / "config.toml"
    config.write_text(DEMO_CONFIG.format(config=config))
    (root / "photos").mkdir(exist_ok=True)
    settings = load_settings(config)
    settings.decisions_dir.mkdir(parents=True, exist_ok=True)
    _, planted = write_sample_project(settings.decisions_dir, "legacy", rows=LEGACY_ROWS)
    log_path = root / "daemon.log"
    print(f"demo tree: {root}", file=out)
    print(f"  legacy.db: {LEGACY_ROWS} rows + {len(planted)} planted faults "
          f"({', '.join(sorted(set(planted.values())))})", file=out)
    print(f"  studio: the simulator reviews {groups} groups into photos/ once the daemon is up; "
          f"after the retrain, {LIVE_GROUPS} more, each after trainingd predicted it", file=out)
    print(f"  daemon log: {log_path} (JSON lines)", file=out)
    print(f"running the daemon until its work is done (at most {max_seconds:g} s: "
          "--max-seconds) ...\n", file=out, flush=True)
    return settings, config, log_path
