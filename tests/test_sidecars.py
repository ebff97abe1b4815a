"""`.decision` sidecars: every live shape parses, every fault has its exact code, links are
checked, and parsing never raises and never changes a byte."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.codes import CODES
from daemon.records import Issue, Sidecar
from daemon.sidecars import (
    MAX_SIDECAR_BYTES,
    check_sidecar_link,
    crop_state,
    folder_role,
    image_beside,
    parse_sidecar,
)
from tests.conftest import fixture_path

EXAMPLES = fixture_path("sidecars", "project_root")
ROOT = Path("/data/images/demo")
GID = "demo_group_20251023T231412406576_batch001_img001"


def parse_bytes(tmp_path: Path, raw: bytes, rel: str = "__crop/x_stage2_upscaled.decision"
                ) -> Sidecar | Issue:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return parse_sidecar(path, project="demo", image_root=tmp_path)


def parse_obj(tmp_path: Path, obj: Any, rel: str = "__crop/x_stage2_upscaled.decision"
              ) -> Sidecar | Issue:
    return parse_bytes(tmp_path, json.dumps(obj, indent=2).encode(), rel)


def kind_a(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"group_id": GID, "project_id": "demo", "needs_crop": True}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not _DROP}


def kind_b(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "group_id": "20250705_214520",
        "images": ["20250705_214520_stage1_generated.png", "20250705_214634_stage2_upscaled.png"],
        "ai_recommendation": {"selected_image": "20250705_214634_stage2_upscaled.png",
                              "selected_index": 1, "reason": "rule", "confidence": 0.4,
                              "crop_needed": False, "crop_coords": None},
        "user_decision": None,
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not _DROP}


_DROP = object()


def sidecar(kind: str = "A", role: str = "crop", project_id: str | None = "demo") -> Sidecar:
    folder = {"crop": "__crop", "cropped": "__cropped", "selected": "__selected",
              "source": "faces", "crop_auto": "__crop_auto",
              "delete_staging": "__delete_staging"}[role]
    stem = "20250709_101500_stage2_upscaled" if kind == "A" else "20250705_214520"
    return Sidecar(ROOT / folder / f"{stem}.decision", "A" if kind == "A" else "B", GID,
                   project_id if kind == "A" else None, role, stem, {})


def codes(issues: list[Issue]) -> list[str]:
    return [i.code for i in issues]


#: Every example file -> (kind, folder role, crop state).
EXPECTED: dict[str, tuple[str, str, str]] = {
    "__crop_auto/20250709_162446_stage2_upscaled.decision": ("A", "crop_auto", "needs_crop"),
    "__crop_auto/20250711_120000_stage2_upscaled.decision": ("A", "crop_auto", "needs_crop"),
    "__cropped/20250705_230846_stage3_enhanced.decision": ("A", "cropped", "cropped"),
    "faces/20250705_214520.decision": ("B", "source", "group"),
    "faces/20250706_080000.decision": ("B", "source", "group"),
    "__crop/20250710_083012_stage1.5_face_swapped.decision": ("A", "crop", "needs_crop"),
    "__crop/20250709_101500_stage2_upscaled.decision": ("A", "crop", "needs_crop"),
}


class TestExamples:
    """Every live shape (tests/fixtures/sidecars, copied from the shared examples) parses into the
    right kind and role."""

    def test_the_example_set_is_the_one_this_test_knows(self) -> None:
        """A new example shape must be added to this table (so it is asserted, not skipped)."""
        found = {p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.decision")}
        assert found == set(EXPECTED)

    @pytest.mark.parametrize("rel", sorted(EXPECTED))
    def test_every_example_parses(self, rel: str) -> None:
        """Each example gives a Sidecar of the expected kind, role, crop state and stem."""
        path = EXAMPLES / rel
        before = path.read_bytes()
        result = parse_sidecar(path, project="demo", image_root=EXAMPLES)
        assert isinstance(result, Sidecar), result
        kind, role, state = EXPECTED[rel]
        assert (result.kind, result.folder_role, crop_state(result)) == (kind, role, state)
        assert result.image_stem == path.name.removesuffix(".decision")
        assert result.fields == json.loads(before)
        assert result.group_id == json.loads(before)["group_id"]
        if kind == "A":
            assert result.project_id == "demo"
        else:
            assert result.project_id is None and result.image_stem == result.group_id
        assert path.read_bytes() == before

    def test_examples_survive_a_copy_with_spaces_in_folder_names(self, tmp_path: Path) -> None:
        """Roles come from the nearest role folder, even under a root with spaces."""
        root = tmp_path / "training data" / "demo project"
        shutil.copytree(EXAMPLES, root)
        for rel, (kind, role, _) in EXPECTED.items():
            result = parse_sidecar(root / rel, project="demo", image_root=root)
            assert isinstance(result, Sidecar) and (result.kind, result.folder_role) == (kind,
                                                                                           role)


class TestFaults:
    """Each malformed sidecar gives exactly one issue with its specific code."""

    @pytest.mark.parametrize(("raw", "code"), [
        (b'{"group_id": "g", "project_id": "demo", "needs_crop": tr', "sidecar_json_malformed"),
        (b"", "sidecar_json_malformed"),
        (b"\xff\xfe\x00garbage", "sidecar_json_malformed"),
        (b"\xef\xbb\xbf{}", "sidecar_shape_unknown"),  # a UTF-8 BOM is tolerated
        (b"[" * 100_000 + b"]" * 100_000, "sidecar_json_malformed"),
        (b"[1, 2]", "sidecar_not_object"),
        (b"null", "sidecar_not_object"),
        (b'"group_id"', "sidecar_not_object"),
        (b"{}", "sidecar_shape_unknown"),
        (b'{"group_id": "g"}', "sidecar_shape_unknown"),
        (b'{"hello": 1}', "sidecar_shape_unknown"),
    ])
    def test_undecodable_content(self, tmp_path: Path, raw: bytes, code: str) -> None:
        """Bytes that are not a sidecar object give their own code, with the path as db_file."""
        result = parse_bytes(tmp_path, raw)
        assert isinstance(result, Issue)
        assert result.code == code
        assert result.db_file == str(tmp_path / "__crop/x_stage2_upscaled.decision")
        assert result.project == "demo" and result.rowid is None
        assert result.severity == CODES[code].severity == "error"

    @pytest.mark.parametrize(("obj", "code", "field", "gid"), [
        (kind_a(group_id=_DROP), "sidecar_group_id_missing", "group_id", None),
        (kind_a(group_id=None), "sidecar_group_id_missing", "group_id", None),
        (kind_a(group_id="  "), "sidecar_group_id_missing", "group_id", None),
        (kind_a(project_id=_DROP), "sidecar_project_id_missing", "project_id", GID),
        (kind_a(project_id=""), "sidecar_project_id_missing", "project_id", GID),
        (kind_a(group_id=42), "sidecar_field_invalid", "group_id", None),
        (kind_a(project_id=["demo"]), "sidecar_field_invalid", "project_id", GID),
        (kind_a(needs_crop="yes"), "sidecar_field_invalid", "needs_crop", GID),
        (kind_a(ai_crop_coords=[0.1, 0.2, 0.3]), "sidecar_field_invalid", "ai_crop_coords",
         GID),
        (kind_a(ai_crop_coords=[0.1, "0.2", 0.3, 0.4]), "sidecar_field_invalid",
         "ai_crop_coords", GID),
        (kind_a(ai_crop_coords=[0.1, True, 0.3, 0.4]), "sidecar_field_invalid",
         "ai_crop_coords", GID),
        (kind_a(ai_route=3), "sidecar_field_invalid", "ai_route", GID),
        (kind_a(ai_crop_accepted="true"), "sidecar_field_invalid", "ai_crop_accepted", GID),
        (kind_b(group_id=_DROP), "sidecar_group_id_missing", "group_id", None),
        (kind_b(images="a.png"), "sidecar_field_invalid", "images", "20250705_214520"),
        (kind_b(images=["a.png", 3]), "sidecar_field_invalid", "images", "20250705_214520"),
        (kind_b(ai_recommendation=[]), "sidecar_field_invalid", "ai_recommendation",
         "20250705_214520"),
        (kind_b(ai_recommendation={"selected_index": "1"}), "sidecar_field_invalid",
         "ai_recommendation.selected_index", "20250705_214520"),
        (kind_b(user_decision={"action": None}), "sidecar_field_invalid",
         "user_decision.action", "20250705_214520"),
        (kind_b(user_decision="approve"), "sidecar_field_invalid", "user_decision",
         "20250705_214520"),
    ])
    def test_field_faults(self, tmp_path: Path, obj: dict[str, Any], code: str, field: str,
                          gid: str | None) -> None:
        """A missing or mistyped field names the field, the value's repr and the group."""
        result = parse_obj(tmp_path, obj)
        assert isinstance(result, Issue), result
        assert (result.code, result.field, result.group_id) == (code, field, gid)
        assert result.message

    def test_value_repr_shows_the_value_as_read(self, tmp_path: Path) -> None:
        """value_repr distinguishes the string 'true' from the boolean."""
        result = parse_obj(tmp_path, kind_a(needs_crop="true"))
        assert isinstance(result, Issue) and result.value_repr == "'true'"

    def test_missing_file_is_unreadable(self, tmp_path: Path) -> None:
        """A sidecar that vanished before it was read is reported, not raised."""
        result = parse_sidecar(tmp_path / "gone.decision", project="demo", image_root=tmp_path)
        assert isinstance(result, Issue) and result.code == "sidecar_unreadable"

    def test_a_folder_named_decision_is_unreadable(self, tmp_path: Path) -> None:
        """A directory with a .decision name is not read as a file."""
        (tmp_path / "odd.decision").mkdir()
        result = parse_sidecar(tmp_path / "odd.decision", project="demo", image_root=tmp_path)
        assert isinstance(result, Issue) and result.code == "sidecar_unreadable"

    def test_a_fifo_does_not_hang(self, tmp_path: Path) -> None:
        """A named pipe with a .decision name is refused at once."""
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(tmp_path / "pipe.decision")
        result = parse_sidecar(tmp_path / "pipe.decision", project="demo", image_root=tmp_path)
        assert isinstance(result, Issue) and result.code == "sidecar_unreadable"

    def test_a_huge_file_is_not_read_whole(self, tmp_path: Path) -> None:
        """Files above the size cap are reported as unreadable with their size."""
        path = tmp_path / "big.decision"
        with open(path, "wb") as fh:
            fh.truncate(MAX_SIDECAR_BYTES + 1)
        result = parse_sidecar(path, project="demo", image_root=tmp_path)
        assert isinstance(result, Issue) and result.code == "sidecar_unreadable"
        assert result.value_repr == repr(MAX_SIDECAR_BYTES + 1)

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
    def test_no_permission_is_unreadable(self, tmp_path: Path) -> None:
        """A sidecar trainingd may not read is reported with its code."""
        path = tmp_path / "locked.decision"
        path.write_text(json.dumps(kind_a()))
        path.chmod(0)
        try:
            result = parse_sidecar(path, project="demo", image_root=tmp_path)
        finally:
            path.chmod(0o644)
        assert isinstance(result, Issue) and result.code == "sidecar_unreadable"

    def test_extra_fields_are_kept(self, tmp_path: Path) -> None:
        """Fields grew over time: unknown keys are accepted and carried in ``fields``."""
        result = parse_obj(tmp_path, kind_a(future_field={"x": 1}))
        assert isinstance(result, Sidecar) and result.fields["future_field"] == {"x": 1}


class TestFolderRoles:
    """Folder roles follow the nearest role folder, current and older names alike."""

    @pytest.mark.parametrize(("rel", "role"), [
        ("__crop/a.decision", "crop"),
        ("crop/a.decision", "crop"),
        ("__crop_auto/a.decision", "crop_auto"),
        ("crop_auto/a.decision", "crop_auto"),
        ("__cropped/a.decision", "cropped"),
        ("crop_cropped/a.decision", "cropped"),
        ("__selected/a.decision", "selected"),
        ("selected/a.decision", "selected"),
        ("__delete_staging/a.png", "delete_staging"),
        ("faces/a.decision", "source"),
        ("a.decision", "source"),
        ("__crop/sub folder/a.decision", "crop"),
        ("__crop/__cropped/a.decision", "cropped"),
        ("__cropped/__crop/a.decision", "crop"),
        ("__crop.decision", "source"),
        ("Crop/a.decision", "source"),
    ])
    def test_roles(self, rel: str, role: str) -> None:
        """Each folder name maps to its role, the nearest one winning."""
        assert folder_role(ROOT / rel, ROOT) == role
        assert folder_role(Path(rel), ROOT) == role

    def test_folders_above_the_root_do_not_count(self) -> None:
        """A root that itself sits under a folder named crop/ is still a source root."""
        root = Path("/data/crop/demo")
        assert folder_role(root / "faces" / "a.decision", root) == "source"

    def test_paths_outside_the_root_use_their_own_folder(self) -> None:
        """Outside the root only the file's own folder is looked at."""
        assert folder_role(Path("/elsewhere/crop/a.decision"), ROOT) == "crop"
        assert folder_role(Path("/crop/elsewhere/a.decision"), ROOT) == "source"

    @given(st.lists(st.text(min_size=1, max_size=12).filter(lambda s: "\x00" not in s),
                    max_size=6), st.booleans())
    def test_never_raises(self, parts: list[str], absolute: bool) -> None:
        """Any path, inside the root or not, gets one of the known roles."""
        path = Path("/", *parts) if absolute else Path(*parts) if parts else Path(".")
        assert folder_role(path, ROOT) in {"crop", "crop_auto", "cropped", "selected",
                                           "delete_staging", "source"}


class TestCropState:
    """crop_state tells the pipeline which row an event concerns and how."""

    @pytest.mark.parametrize(("kind", "role", "state"), [
        ("A", "crop", "needs_crop"),
        ("A", "crop_auto", "needs_crop"),
        ("A", "cropped", "cropped"),
        ("A", "selected", "elsewhere"),
        ("A", "delete_staging", "elsewhere"),
        ("A", "source", "elsewhere"),
        ("B", "source", "group"),
        ("B", "crop", "group"),
    ])
    def test_states(self, kind: str, role: str, state: str) -> None:
        """Kind A in the crop folders needs a crop, in the cropped folder is done; B is a group."""
        assert crop_state(sidecar(kind, role)) == state

    def test_image_is_found_beside_the_sidecar(self, tmp_path: Path) -> None:
        """The image of a kind A sidecar is looked for in its own folder, any image suffix."""
        folder = tmp_path / "__crop"
        folder.mkdir()
        s = Sidecar(path=folder / "x.decision", kind="A", group_id="g", project_id="p",
                    folder_role="crop", image_stem="20250709_101500_stage2_upscaled", fields={})
        assert image_beside(s) is None
        (tmp_path / "20250709_101500_stage2_upscaled.png").touch()  # not its folder
        assert image_beside(s) is None
        (folder / "20250709_101500_stage2_upscaled.JPEG").touch()
        assert image_beside(s) == folder / "20250709_101500_stage2_upscaled.JPEG"


class TestLinks:
    """check_sidecar_link reports orphans, missing images and project mismatches."""

    def test_a_linked_sidecar_is_clean(self) -> None:
        """Row present, image present, projects agree (ignoring case): no issue."""
        assert check_sidecar_link(sidecar(project_id="Demo"), row_exists=True, row_project="demo",
                                  image_present=True, expected_project="DEMO") == []

    def test_orphan(self) -> None:
        """No row for the group_id: sidecar_orphan, a warning naming the group."""
        issues = check_sidecar_link(sidecar(), row_exists=False, row_project=None,
                                    image_present=True, expected_project="demo")
        assert codes(issues) == ["sidecar_orphan"]
        assert issues[0].severity == "warning" and issues[0].group_id == GID
        assert issues[0].db_file == str(ROOT / "__crop/20250709_101500_stage2_upscaled.decision")

    def test_image_missing(self) -> None:
        """No image with the sidecar's stem beside it: sidecar_image_missing."""
        issues = check_sidecar_link(sidecar(), row_exists=True, row_project="demo",
                                    image_present=False, expected_project="demo")
        assert codes(issues) == ["sidecar_image_missing"]

    @pytest.mark.parametrize(("side", "folder", "row"), [
        ("mojo3", "demo", "demo"), ("demo", "mojo3", "demo"), ("demo", "demo", "mojo3"),
    ])
    def test_project_mismatch(self, side: str, folder: str, row: str) -> None:
        """Any disagreement between sidecar, folder and row projects is one mismatch issue."""
        issues = check_sidecar_link(sidecar(project_id=side), row_exists=True, row_project=row,
                                    image_present=True, expected_project=folder)
        assert codes(issues) == ["sidecar_project_mismatch"]
        assert issues[0].project == folder and issues[0].value_repr == repr(side)

    def test_orphan_in_the_wrong_project_reports_both(self) -> None:
        """Independent faults are all reported, in a stable order."""
        issues = check_sidecar_link(sidecar(project_id="mojo3"), row_exists=False,
                                    row_project=None, image_present=False,
                                    expected_project="demo")
        assert codes(issues) == ["sidecar_orphan", "sidecar_image_missing",
                                 "sidecar_project_mismatch"]

    @pytest.mark.parametrize("role", ["selected", "delete_staging", "source"])
    def test_misplaced(self, role: str) -> None:
        """A crop-routing sidecar outside the crop folders is reported as misplaced."""
        issues = check_sidecar_link(sidecar("A", role), row_exists=True, row_project="demo",
                                    image_present=True, expected_project="demo")
        assert codes(issues) == ["sidecar_misplaced"]

    def test_kind_b_unjoined_is_a_warning(self) -> None:
        """A kind B sidecar without a row is informational: the old tools never joined them."""
        issues = check_sidecar_link(sidecar("B", "source"), row_exists=False, row_project=None,
                                    image_present=False, expected_project="demo")
        assert codes(issues) == ["sidecar_group_unjoined"]
        assert issues[0].severity == "warning"

    def test_kind_b_with_a_row_is_clean(self) -> None:
        """A kind B sidecar whose group has a row needs nothing, and no image check applies."""
        assert check_sidecar_link(sidecar("B", "source"), row_exists=True, row_project="demo",
                                  image_present=False, expected_project="demo") == []

    def test_every_sidecar_code_is_registered_in_the_sidecar_room(self) -> None:
        """All codes this module emits exist in daemon/codes.py with room 'sidecar'."""
        emitted = {
            "sidecar_unreadable", "sidecar_json_malformed", "sidecar_not_object",
            "sidecar_shape_unknown", "sidecar_group_id_missing", "sidecar_project_id_missing",
            "sidecar_field_invalid", "sidecar_check_failed", "sidecar_orphan",
            "sidecar_image_missing",
            "sidecar_project_mismatch", "sidecar_misplaced", "sidecar_group_unjoined",
        }
        assert {c for c, v in CODES.items() if v.room == "sidecar"} == emitted


class TestNeverRaises:
    """Parsing is total and read-only."""

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.binary(max_size=400))
    def test_arbitrary_bytes(self, tmp_path: Path, raw: bytes) -> None:
        """Any bytes give a Sidecar or an Issue, and the file keeps every byte."""
        path = tmp_path / "__crop" / "any.decision"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
        digest = hashlib.sha256(raw).hexdigest()
        mtime = path.stat().st_mtime_ns
        result = parse_sidecar(path, project="demo", image_root=tmp_path)
        assert isinstance(result, Sidecar | Issue)
        if isinstance(result, Issue):
            assert result.code in CODES and CODES[result.code].room == "sidecar"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
        assert path.stat().st_mtime_ns == mtime

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
            st.sampled_from(["group_id", "project_id", "needs_crop", "ai_crop_coords",
                             "ai_route", "ai_crop_accepted", "images", "ai_recommendation",
                             "user_decision", "action", "selected_index", "x"]),
            inner, max_size=6),
        max_leaves=12)

    @settings(max_examples=200, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(json_values)
    def test_arbitrary_json(self, tmp_path: Path, value: object) -> None:
        """Any JSON value, including sidecar-like objects with wrong types, never raises."""
        path = tmp_path / "__cropped" / "any.decision"
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = json.dumps(value, indent=2).encode()
        path.write_bytes(raw)
        result = parse_sidecar(path, project="demo", image_root=tmp_path)
        assert isinstance(result, Sidecar | Issue)
        if isinstance(result, Sidecar):
            assert isinstance(value, dict) and result.group_id == value["group_id"]
            assert result.folder_role == "cropped"
            link = check_sidecar_link(result, row_exists=False, row_project=None,
                                      image_present=False, expected_project="demo")
            assert link and all(i.severity == "warning" for i in link)
        assert path.read_bytes() == raw
