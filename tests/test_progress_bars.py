"""Progress that reads well: one bar per bulk command with the right total and rate, log lines
that never tear it, JSON progress records off a terminal, model loading as a phase (issue 10,
item 5).

The bar is checked the way a person sees it: ``trainingd embed`` / ``trainingd backfill`` run as
real subprocesses on a real pseudo-terminal (``pty.openpty``), their output captured and cut at
every carriage return and newline.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from structlog.testing import capture_logs

from daemon.progress import ProgressReporter
from tests.conftest import fixture_path

REPO = Path(__file__).resolve().parents[1]
IMAGES = 20
LIMIT = 10
#: `trainingd` with the tiny open_clip config registered first (random weights, CPU)
LAUNCHER = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
            "from tests.embedding_helpers import register_tiny; register_tiny(); "
            "from daemon import cli; sys.exit(cli.main(sys.argv[1:]))")
#: a tqdm bar as drawn: "embedding:  40%|####      | 4/10 [00:01<00:01,  3.2img/s]"
BAR = re.compile(r"(\d+)/(\d+) \[[^\]]*\]")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TestProgressRecords:
    """Off a terminal: a JSON progress record every interval and one at the end."""

    def test_records_come_every_interval_and_at_the_end(self) -> None:
        """Updates within the interval log nothing; crossing it logs done, total, rate, eta."""
        clock = FakeClock()
        reporter = ProgressReporter("embedding.progress", unit="img", desc="embedding",
                                    tty=False, interval_seconds=10.0, clock=clock)
        with capture_logs() as logs:
            reporter(0, 100)
            clock.now += 4.0
            reporter(20, 100)
            assert logs == []
            clock.now += 6.0
            reporter(50, 100)
            clock.now += 5.0
            reporter(100, 100)
            reporter.close()
        assert [r["event"] for r in logs] == ["embedding.progress", "embedding.progress"]
        first, last = logs
        assert (first["done"], first["total"], first["unit"]) == (50, 100, "img")
        assert first["rate"] == 5.0 and first["eta_seconds"] == 10.0
        assert (last["done"], last["total"], last["eta_seconds"]) == (100, 100, 0.0)

    def test_no_record_without_work(self) -> None:
        """A command that never started its loop logs no progress record."""
        reporter = ProgressReporter("backfill.progress", unit="line", desc="backfill",
                                    tty=False, clock=FakeClock())
        with capture_logs() as logs:
            reporter.close()
        assert logs == []


# -- real commands ------------------------------------------------------------------------------


def make_tree(tmp_path: Path) -> Path:
    """A config with the tiny model and one project of IMAGES distinct PNGs."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(IMAGES):
        Image.new("RGB", (48, 40), (i * 12 % 256, 255 - i * 9 % 256, i * 5 % 256)).save(
            root / f"img_{i:03d}_stage1.png")
    config = tmp_path / "config.toml"
    config.write_text(textwrap.dedent(f"""
        [paths]
        data_root = "data"
        [embedding]
        model = "trainingd-tiny"
        pretrained = "none"
        device = "cpu"
        batch_size = 3
        decode_workers = 2
        [projects.demo]
        image_roots = [{json.dumps(str(root))}]
    """))
    return config


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items()
           if not k.upper().startswith("TRAININGD_") and k != "JOURNAL_STREAM"}
    out.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "120"})
    return out


def run_on_pty(args: list[str], cwd: Path, timeout: float = 120.0) -> tuple[int, str]:
    """Run ``trainingd ARGS`` with a terminal as stdin, stdout and stderr; return its exit code
    and everything it drew."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(REPO), *args], stdin=slave,
                            stdout=slave, stderr=slave, cwd=cwd, env=env(), close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal has closed it
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", errors="replace")


def run_piped(args: list[str], cwd: Path) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(REPO), *args], cwd=cwd,
                          env=env(), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


def screen_pieces(drawn: str) -> list[str]:
    """What a terminal shows as separate writes: the output cut at every CR and LF, without
    colour codes."""
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    return [p for p in re.split(r"[\r\n]", plain) if p.strip()]


def records(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What `trainingd embed --limit N` drew on a pseudo-terminal."""
    tmp = tmp_path_factory.mktemp("embed-tty")
    config = make_tree(tmp)
    code, text = run_on_pty(["embed", "--config", str(config), "--limit", str(LIMIT),
                             "--log-level", "info"], tmp)
    assert code == 0, text[-3000:]
    return text


@pytest.fixture(scope="module")
def stderr(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What `trainingd embed --limit N` logged to a pipe."""
    tmp = tmp_path_factory.mktemp("embed-pipe")
    config = make_tree(tmp)
    code, _, err = run_piped(["embed", "--config", str(config), "--limit", str(LIMIT)], tmp)
    assert code == 0, err[-3000:]
    return err


@pytest.mark.slow
class TestEmbedOnATerminal:
    """`trainingd embed --limit N` on a pseudo-terminal."""

    def test_bar_total_is_the_limit(self, drawn: str) -> None:
        """Every drawing of the bar counts to --limit, not to the files under the roots."""
        totals = {int(m.group(2)) for p in screen_pieces(drawn) for m in BAR.finditer(p)}
        assert totals == {LIMIT}, totals
        done = [int(m.group(1)) for p in screen_pieces(drawn) for m in BAR.finditer(p)]
        assert max(done) == LIMIT

    def test_bar_shows_images_per_second(self, drawn: str) -> None:
        """The rate is in images per second."""
        assert any("img/s" in p for p in screen_pieces(drawn) if BAR.search(p))

    def test_log_lines_never_share_a_line_with_the_bar(self, drawn: str) -> None:
        """Each batch's log line is printed above the bar, never glued into a drawing of it."""
        pieces = screen_pieces(drawn)
        logged = [p for p in pieces if "embedding.batch_embedded" in p]
        assert len(logged) >= LIMIT // 3, drawn[-3000:]
        torn = [p for p in logged if BAR.search(p) or "%|" in p]
        assert torn == [], torn

    def test_model_loading_is_a_phase(self, drawn: str) -> None:
        """While the model loads, a phase line names it; the load's log lines say how long."""
        pieces = screen_pieces(drawn)
        assert any("loading trainingd-tiny" in p for p in pieces)
        assert any("embedding.model_loading" in p for p in pieces)
        assert any("embedding.model_loaded" in p and "seconds" in p for p in pieces)


@pytest.mark.slow
class TestEmbedOffATerminal:
    """`trainingd embed --limit N` with stderr a pipe (journald, CI)."""

    def test_no_carriage_return_bar(self, stderr: str) -> None:
        """Nothing is drawn: every line of stderr is one JSON record."""
        assert "\r" not in stderr
        assert records(stderr)

    def test_progress_record_has_the_limit_as_total(self, stderr: str) -> None:
        """The final embedding.progress record: done == total == --limit, with a rate."""
        progress = [r for r in records(stderr) if r["event"] == "embedding.progress"]
        assert progress, stderr[-2000:]
        last = progress[-1]
        assert last["done"] == last["total"] == LIMIT and last["unit"] == "img"
        assert last["rate"] >= 0 and last["eta_seconds"] == 0.0

    def test_model_loading_then_loaded_with_seconds(self, stderr: str) -> None:
        """The load is a phase: model_loading first, then model_loaded with its seconds."""
        events = [r["event"] for r in records(stderr)]
        assert events.index("embedding.model_loading") < events.index("embedding.model_loaded")
        (loaded,) = [r for r in records(stderr) if r["event"] == "embedding.model_loaded"]
        assert isinstance(loaded["seconds"], float | int) and loaded["seconds"] >= 0


def physical_lines(path: Path) -> int:
    data = path.read_bytes()
    return data.count(b"\n") + (not data.endswith(b"\n") and bool(data))


@pytest.mark.slow
class TestBackfillProgress:
    """`trainingd backfill` counts lines of all its inputs."""

    def test_progress_record_counts_every_line(self, tmp_path: Path) -> None:
        """Off a terminal: the final backfill.progress record has done == total == the lines
        of the CSVs, in lines per second."""
        csvs = [fixture_path("legacy", "select_crop_log_subset.csv"),
                fixture_path("legacy", "anomaly_cases.csv")]
        config = tmp_path / "config.toml"
        config.write_text('[paths]\ndata_root = "data"\n')
        code, _, err = run_piped(["backfill", "--config", str(config),
                                  *map(str, csvs)], tmp_path)
        assert code == 0, err[-2000:]
        (last,) = [r for r in records(err) if r["event"] == "backfill.progress"][-1:]
        expected = sum(physical_lines(p) for p in csvs)
        assert last["done"] == last["total"] == expected and last["unit"] == "line"

    def test_bar_on_a_terminal(self, tmp_path: Path) -> None:
        """On a terminal: one bar whose total is the lines of the CSV, rate in lines/s, and
        no log line glued into it."""
        csv = fixture_path("legacy", "select_crop_log_subset.csv")
        config = tmp_path / "config.toml"
        config.write_text('[paths]\ndata_root = "data"\n')
        code, drawn = run_on_pty(["backfill", "--config", str(config), str(csv)], tmp_path)
        assert code == 0, drawn[-2000:]
        pieces = screen_pieces(drawn)
        totals = {int(m.group(2)) for p in pieces for m in BAR.finditer(p)}
        assert totals == {physical_lines(csv)}
        assert any("line/s" in p for p in pieces if BAR.search(p))
        assert not [p for p in pieces if "backfill.file_read" in p and BAR.search(p)]
