"""Hostile backfill inputs (issue 9): outputs confined to the data root and kept out of the
decisions folder and every image root, an oversize image, FIFOs and folders given as CSVs, and
lines built to make a parser raise.  Each ends as an issue line or a refusal with its reason;
the other lines are converted as usual."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import struct
import threading
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from daemon.backfill import (
    BackfillError,
    BackfillOptions,
    OutputPathError,
    run_backfill,
    write_report,
)
from daemon.backfill_cli import add_backfill_parser, cmd_backfill, default_out_dir
from daemon.pipeline import Pipeline
from daemon.settings import Settings, load_settings
from daemon.store import StateStore
from daemon.triggers import TriggerBox

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
CROP_HEADER = ("session_id,set_id,directory,image_count,chosen_index,chosen_path,crop_x1,crop_y1,"
               "crop_x2,crop_y2,timestamp,image_0_path,image_0_stage,width_0,height_0,"
               "image_1_path,image_1_stage,width_1,height_1")
ANOMALY_HEADER = "session_id,chosen_path,rejected_paths,timestamp,width,height"
SELECTION_HEADER = "session_id,chosen_path,neg_paths,timestamp,width,height"
GOOD = "mojo1/20250705_230713_stage3_enhanced.png"


def crop_line(name: str = GOOD, box: str = "0.0,66.0,1787.0,1853.0",
              ts: str = "2025-10-08T18:47:32.429632Z", width: str = "3072",
              height: str = "3072") -> str:
    return (f"2025-10-08 14:46:56,s1,mojo1,1,0,{name},{box},{ts},{name},stage3_enhanced,"
            f"{width},{height},,,,")


def write_csv(path: Path, lines: list[str], header: str = CROP_HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def make_settings(home: Path, image_roots: dict[str, list[Path]] | None = None) -> Settings:
    """Real settings from a real config.toml under ``home`` (data root ``home/data``)."""
    lines = ['[paths]', 'data_root = "data"', ""]
    for project, roots in (image_roots or {}).items():
        lines += [f"[projects.{project}]",
                  "image_roots = [" + ", ".join(json.dumps(str(r)) for r in roots) + "]"]
    config = home / "config.toml"
    home.mkdir(parents=True, exist_ok=True)
    config.write_text("\n".join(lines) + "\n")
    return load_settings(config)


def run_cli(settings: Settings, *argv: str) -> int:
    common = argparse.ArgumentParser(add_help=False)
    parser = argparse.ArgumentParser(prog="trainingd")
    add_backfill_parser(parser.add_subparsers(dest="command"), common)
    return cmd_backfill(parser.parse_args(["backfill", *argv]), settings)


def backfill(settings: Settings, csvs: list[Path], **kw: Any) -> dict[str, Any]:
    """A backfill with the API, confined as the CLI confines it; returns the parsed report."""
    opts = BackfillOptions(csv_paths=tuple(csvs), out_dir=default_out_dir(settings),
                           data_root=settings.data_root,
                           forbidden_dirs=(settings.decisions_dir,), **kw)
    with run_backfill(opts) as outcome:
        json_path, _ = write_report(opts, outcome, settings.summaries_dir, NOW)
    report: dict[str, Any] = json.loads(json_path.read_text(encoding="utf-8"))
    return report


def in_thread(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"blocked for {timeout} s (a FIFO opened?)"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def rejected(report: dict[str, Any]) -> list[tuple[int, str]]:
    return [(r["line"], r["code"]) for r in report["rejected_lines"]]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() \
        else []


def bomb_png(path: Path, side: int = 20_000) -> None:
    """A real PNG whose header says ``side`` x ``side`` pixels (over Pillow's bomb limit)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


class TestOutputPaths:
    """Every output resolves inside the data root, outside the decisions folder and image
    roots, checked with symlinks resolved, in the CLI and in the trigger."""

    def test_default_target_is_outside_the_decisions_folder(self, tmp_path: Path) -> None:
        """Without --out the DB goes to <data_root>/backfill/, never the reviewer's folder."""
        s = make_settings(tmp_path)
        csv_path = write_csv(s.data_root / "legacy" / "log.csv", [crop_line()])
        assert run_cli(s, str(csv_path), "--project", "mojo1", "--execute") == 0
        assert (s.data_root / "backfill" / "mojo1.db").is_file()
        assert files_under(s.decisions_dir) == []

    def test_out_inside_the_decisions_folder_is_refused(self, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
        """--out in the decisions folder exits 2 naming the folder; nothing is written."""
        s = make_settings(tmp_path)
        s.decisions_dir.mkdir(parents=True)
        csv_path = write_csv(s.data_root / "legacy" / "log.csv", [crop_line()])
        code = run_cli(s, str(csv_path), "--project", "mojo1", "--execute",
                       "--out", str(s.decisions_dir / "mojo1.db"))
        assert code == 2 and "decisions folder" in capsys.readouterr().err
        assert files_under(s.decisions_dir) == []

    def test_out_inside_an_image_root_is_refused(self, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
        """--out in a configured image root, or in an --image-root, exits 2; nothing written."""
        images = tmp_path / "data" / "photos"
        extra = tmp_path / "data" / "more_photos"
        for folder in (images, extra):
            folder.mkdir(parents=True)
        s = make_settings(tmp_path, {"mojo1": [images]})
        csv_path = write_csv(s.data_root / "legacy" / "log.csv", [crop_line()])
        for out, more in ((images / "sub" / "x.db", []), (extra / "x.db", ["--image-root",
                                                                          str(extra)])):
            code = run_cli(s, str(csv_path), "--project", "mojo1", "--execute", "--out",
                           str(out), *more)
            assert code == 2 and "image root" in capsys.readouterr().err
        assert files_under(images) == [] and files_under(extra) == []

    def test_out_outside_the_data_root_is_refused(self, tmp_path: Path) -> None:
        """--out elsewhere (here beside the data root) exits 2 and writes nothing."""
        s = make_settings(tmp_path)
        csv_path = write_csv(s.data_root / "legacy" / "log.csv", [crop_line()])
        assert run_cli(s, str(csv_path), "--project", "mojo1", "--execute",
                       "--out", str(tmp_path / "elsewhere.db")) == 2
        assert not (tmp_path / "elsewhere.db").exists()

    def test_symlinks_are_resolved_before_the_check(self, tmp_path: Path) -> None:
        """A folder inside the data root that links to the decisions folder, or a default
        backfill folder that is such a link, is refused like the folder itself."""
        s = make_settings(tmp_path)
        s.decisions_dir.mkdir(parents=True)
        (s.data_root / "innocent").symlink_to(s.decisions_dir)
        csv_path = write_csv(s.data_root / "legacy" / "log.csv", [crop_line()])
        assert run_cli(s, str(csv_path), "--project", "mojo1", "--execute",
                       "--out", str(s.data_root / "innocent" / "mojo1.db")) == 2
        default_out_dir(s).symlink_to(s.decisions_dir)
        with pytest.raises(OutputPathError, match="decisions folder"):
            backfill(s, [csv_path], execute=True)
        with pytest.raises(OutputPathError):  # project found per line: checked when first seen
            backfill(s, [csv_path], execute=True, project_from="folder")
        assert files_under(s.decisions_dir) == []

    def test_backfill_trigger_into_an_image_root_fails_with_the_reason(
            self, tmp_path: Path) -> None:
        """The trigger path (claim, the pipeline's backfill, finish as the service does) fails
        with the reason in its result file, and the image root stays empty."""
        images = tmp_path / "data" / "photos"
        images.mkdir(parents=True)
        s = make_settings(tmp_path, {"mojo1": [images]})
        s.decisions_dir.mkdir(parents=True)
        csv_path = write_csv(s.data_root / "legacy" / "log.csv", [crop_line()])
        store = StateStore(":memory:")
        try:
            pipeline = Pipeline(s, store, lambda task: None)
            box = TriggerBox(s.triggers_dir, roots=lambda: [s.data_root, images],
                             projects=pipeline.projects)
            for name, out in (("backfill.json", images / "mojo1.db"),
                              ("backfill", s.decisions_dir / "mojo1.db")):
                (box.folder / name).write_text(json.dumps(
                    {"csv": [str(csv_path)], "project": "mojo1", "execute": True,
                     "out": str(out)}))
                (task,) = box.claim()
                with pytest.raises(BackfillError) as exc:
                    pipeline.handle(task, lambda: False)
                box.finish(Path(task.trigger or ""), ok=False, result={"error": str(exc.value)})
            first = json.loads((box.failed / "backfill.json.result.json").read_text())
            second = json.loads((box.failed / "backfill.result.json").read_text())
        finally:
            store.close()
        assert "image root" in first["error"] and "decisions folder" in second["error"]
        assert files_under(images) == [] and files_under(s.decisions_dir) == []

    def test_dry_run_names_a_confined_target(self, tmp_path: Path) -> None:
        """A dry run is checked too: the report never promises a forbidden file."""
        s = make_settings(tmp_path)
        csv_path = write_csv(s.data_root / "legacy" / "log.csv", [crop_line()])
        report = backfill(s, [csv_path])
        assert report["would_create"] == [str(default_out_dir(s) / "mojo1.db")]
        with pytest.raises(OutputPathError):
            backfill(s, [csv_path], out=s.decisions_dir / "x.db")


class TestImages:
    """An image met while reading sizes never stops the backfill."""

    def test_decompression_bomb_is_an_issue_line(self, tmp_path: Path) -> None:
        """An oversize image becomes backfill_image_unreadable naming the file and the limit;
        the next line is converted."""
        s = make_settings(tmp_path)
        images = s.data_root / "photos"
        bomb_png(images / "big_stage3_enhanced.png")
        Image.new("RGB", (64, 48)).save(images / "ok_stage3_enhanced.png")
        csv_path = write_csv(s.data_root / "log.csv", [
            crop_line(name="mojo1/big_stage3_enhanced.png", width="0", height="0",
                      box="0.1,0.1,0.5,0.5"),
            crop_line(name="mojo1/ok_stage3_enhanced.png", width="0", height="0",
                      box="0.1,0.1,0.5,0.5", ts="2025-10-08T18:50:00Z"),
        ])
        report = backfill(s, [csv_path], image_roots=(images,), execute=True)
        assert rejected(report) == [(2, "backfill_image_unreadable")]
        message = report["rejected_lines"][0]["message"]
        assert "big_stage3_enhanced.png" in message and "decompression-bomb" in message
        assert report["totals"]["converted"] == 1

    def test_fifo_named_like_the_image_is_an_issue_line(self, tmp_path: Path) -> None:
        """A FIFO in an image root is never opened: an issue line, no hang."""
        s = make_settings(tmp_path)
        images = s.data_root / "photos"
        images.mkdir(parents=True)
        os.mkfifo(images / "pipe_stage3_enhanced.png")
        csv_path = write_csv(s.data_root / "log.csv", [
            crop_line(name="mojo1/pipe_stage3_enhanced.png", width="0", height="0"), crop_line()])
        report = in_thread(lambda: backfill(s, [csv_path], image_roots=(images,)))
        assert rejected(report) == [(2, "backfill_image_unreadable")]
        assert report["totals"]["converted"] == 1


class TestCsvPaths:
    """A CSV path that is not a regular file is an issue line; the other CSVs go on."""

    @pytest.mark.parametrize("kind", ["fifo", "folder"])
    def test_fifo_or_folder_as_csv(self, tmp_path: Path, kind: str) -> None:
        """The odd path is reported as backfill_csv_unreadable (never opened), the good CSV
        beside it is converted."""
        s = make_settings(tmp_path)
        odd = s.data_root / "legacy" / "odd.csv"
        odd.parent.mkdir(parents=True)
        if kind == "fifo":
            os.mkfifo(odd)
        else:
            odd.mkdir()
        good = write_csv(s.data_root / "legacy" / "good.csv", [crop_line()])
        report = in_thread(lambda: backfill(s, [odd, good], execute=True))
        assert rejected(report) == [(0, "backfill_csv_unreadable")]
        assert report["rejected_lines"][0]["file"] == str(odd)
        assert ("FIFO" if kind == "fifo" else "folder") in report["rejected_lines"][0]["message"]
        assert report["totals"]["converted"] == 1

    def test_fifo_as_csv_through_the_cli(self, tmp_path: Path) -> None:
        """The CLI reports it and exits 0 (reported, not a failure), without blocking."""
        s = make_settings(tmp_path)
        fifo = s.data_root / "legacy" / "log.csv"
        fifo.parent.mkdir(parents=True)
        os.mkfifo(fifo)
        assert in_thread(lambda: run_cli(s, str(fifo), "--project", "mojo1")) == 0

    def test_missing_csv_still_stops_the_run(self, tmp_path: Path) -> None:
        """A name that is not there at all is a typo: exit 2 before anything is read."""
        s = make_settings(tmp_path)
        assert run_cli(s, str(s.data_root / "nope.csv"), "--project", "mojo1") == 2

    def test_csv_with_a_non_utf8_file_name(self, tmp_path: Path) -> None:
        """A CSV whose file name is not UTF-8 is read, and its issues are stored and reported."""
        s = make_settings(tmp_path)
        folder = s.data_root / "legacy"
        folder.mkdir(parents=True)
        name = os.fsdecode(b"log-\xff.csv")
        path = write_csv(folder / name, [crop_line(), crop_line(box="1,1,0,0")])
        report = backfill(s, [path])
        assert rejected(report) == [(3, "backfill_box_inverted")]
        assert report["rejected_lines"][0]["file"].endswith("log-\\udcff.csv")


class TestHostileLines:
    """Lines built to make a parser raise are issue lines; the good line beside them is kept."""

    @pytest.mark.parametrize(("header", "bad", "code"), [
        (SELECTION_HEADER, 's,mojo1/a.png,"' + "[" * 50_000 + '",2025-10-08T18:47:32Z,10,10',
         "backfill_list_unparseable"),
        (SELECTION_HEADER, 's,mojo1/a.png,"[' + "1" * 5000 + ']",2025-10-08T18:47:32Z,10,10',
         "backfill_list_unparseable"),
        (ANOMALY_HEADER, 's,mojo1/a.png,"' + "[" * 50_000 + '",2025-10-08T18:47:32Z,10,10',
         "backfill_list_unparseable"),
        (ANOMALY_HEADER, 's,mojo1/a.png,"[' + "9" * 5000 + ']",2025-10-08T18:47:32Z,10,10',
         "backfill_list_unparseable"),
        (CROP_HEADER, crop_line(name="mojo1/b.png", box="0," + "1" * 5000 + ",1,1"),
         "backfill_box_unparseable"),
        (CROP_HEADER, crop_line(name="mojo1/b.png", width="9" * 5000, height="9" * 5000),
         "backfill_image_size_missing"),
        (CROP_HEADER, crop_line(name="mojo1/b.png", width="99999999999999999999",
                                height="99999999999999999999"), "backfill_image_size_missing"),
        (CROP_HEADER, crop_line(name="mojo1/b.png", ts="0001-01-01T00:00:00+01:00"),
         "backfill_timestamp_unparseable"),
        (CROP_HEADER, crop_line(name="mojo1/b.png", ts="9999-12-31T23:59:59-01:00"),
         "backfill_timestamp_unparseable"),
        (CROP_HEADER, crop_line(name="mojo1/b\x00c.png"), "backfill_group_invalid"),
        (CROP_HEADER, crop_line(name="mojo1/" + "x" * 200_000 + ".png"),
         "backfill_csv_malformed"),
    ])
    def test_line_becomes_an_issue(self, tmp_path: Path, header: str, bad: str, code: str
                                   ) -> None:
        """The hostile line is rejected with its code (--execute, so rows are really written);
        the good line after it is converted and stored."""
        s = make_settings(tmp_path)
        good = crop_line() if header == CROP_HEADER else (
            "s,mojo1/g.png,\"['h.png']\",2025-10-08T18:47:32Z,10,10" if header == ANOMALY_HEADER
            else 's,mojo1/g.png,"[""h.png""]",2025-10-08T18:47:32Z,10,10')
        csv_path = write_csv(s.data_root / "log.csv", [bad, good], header=header)
        report = backfill(s, [csv_path], project="mojo1", project_from="fixed", execute=True)
        assert [c for _, c in rejected(report)] == [code]
        assert report["totals"]["converted"] == 1
        conn = sqlite3.connect(default_out_dir(s) / "mojo1.db")
        try:
            assert conn.execute("SELECT count(*) FROM ai_decisions").fetchone() == (1,)
        finally:
            conn.close()

    def test_bytes_that_are_not_utf8_reject_the_line(self, tmp_path: Path) -> None:
        """A line with Latin-1 bytes is rejected (not stored with changed names); the value
        shows the bytes; the next line is converted."""
        s = make_settings(tmp_path)
        path = s.data_root / "log.csv"
        path.parent.mkdir(parents=True)
        path.write_bytes("\n".join([CROP_HEADER, crop_line(name="mojo1/caf\xe9.png"),
                                    crop_line()]).encode("latin-1") + b"\n")
        report = backfill(s, [path], project="mojo1", project_from="fixed")
        assert rejected(report) == [(2, "backfill_csv_malformed")]
        assert "\\udce9" in report["rejected_lines"][0]["value_repr"]
        assert report["totals"]["converted"] == 1
