"""The checkout is all a test needs: no source names a path beside it, the fixtures are the ones
their manifest describes, and the guard that fails a test reading ``../shared`` really fires.

On our machines the checkout sits beside a ``shared/`` reference tree; a fresh clone has nothing
beside it. Tests that read ``../shared`` passed here and failed for everyone else (issue 10).
A line that must spell such a path as data (a hostile input the code refuses) carries
``# outside-ok: why``; the tests/fixtures README says how fixtures are made.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import outside_guard
from tests.conftest import FIXTURES, GUARD

ROOT = Path(__file__).resolve().parents[1]
#: Files of tests/fixtures/ that are not fixtures: the record of origin and the procedure.
NOT_FIXTURES = {"README.md", "MANIFEST.json", "derive.py"}
OPT_OUT = "# outside-ok"


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose may name ../shared)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


#: Calls whose string arguments are paths. A ".." step counts only there (and as an operand of
#: ``/``): elsewhere it is data, such as a hostile trigger a test feeds the daemon.
PATH_CALLS = {"Path", "PurePath", "join", "joinpath", "open", "copy", "copyfile", "copytree",
              "connect", "scandir", "listdir", "chdir", "walk"}


def _path_parts(tree: ast.AST) -> set[int]:
    """ids of the string constants used as paths: ``x / ".."``, ``Path("shared")``."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            ids.update((id(node.left), id(node.right)))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in PATH_CALLS:
                ids.update(id(a) for a in node.args)
    return ids


def _bad_string(text: str, path_part: bool) -> str | None:
    if path_part and (text == ".." or any(s in text for s in ("../", "..\\", "/.."))):
        return "a parent-folder step"
    if "shared/" in text or "/shared" in text or (path_part and text == "shared"):
        return "the shared/ tree beside the checkout"
    if text.startswith("/work/"):
        return "an absolute path on our machines"
    return None


def _levels(node: ast.expr, names: dict[str, int]) -> int | None:
    """How far above the source file an expression built on ``__file__`` points (the file is 0,
    its folder 1), or None when it is not built on ``__file__``."""
    if isinstance(node, ast.Name):
        return 0 if node.id == "__file__" else names.get(node.id)
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id in {"Path", "PurePath"} and node.args:
            return _levels(node.args[0], names)
        if isinstance(func, ast.Attribute):
            if func.attr in {"resolve", "absolute", "expanduser"}:
                return _levels(func.value, names)
            if func.attr in {"dirname", "abspath", "realpath"} and node.args:
                inner = _levels(node.args[0], names)
                return None if inner is None else inner + (func.attr == "dirname")
        return None
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        inner = _levels(node.value, names)
        return None if inner is None else inner + 1
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "parents" and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, int)):
        inner = _levels(node.value.value, names)
        return None if inner is None else inner + node.slice.value + 1
    return None


def references_outside(path: Path, root: Path) -> list[str]:
    """Every place in one Python file that names a path outside ``root``, as 'file:line: why'."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    depth = len(path.relative_to(root).parts)  # levels from the file up to the checkout root
    docs = _docstrings(tree)
    parts = _path_parts(tree)
    names: dict[str, int] = {}
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            level = _levels(node.value, names)
            if level is not None:
                names[node.targets[0].id] = level
    for node in ast.walk(tree):
        why = None
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            why = _bad_string(node.value, id(node) in parts)
        elif isinstance(node, ast.Attribute) and node.attr == "pardir":
            why = "os.pardir"
        elif isinstance(node, ast.expr):
            level = _levels(node, names)
            if level is not None and level > depth:
                why = f"{level - depth} folder(s) above the checkout via __file__"
        if why is not None:
            lineno = getattr(node, "lineno", 1)
            if OPT_OUT not in lines[lineno - 1]:
                found.append((lineno, why))
    rel = path.relative_to(root).as_posix()
    return [f"{rel}:{n}: {why}" for n, why in sorted(set(found))]


def fixture_files() -> dict[str, Path]:
    return {p.relative_to(FIXTURES).as_posix(): p for p in sorted(FIXTURES.rglob("*"))
            if p.is_file() and p.name not in NOT_FIXTURES and "__pycache__" not in p.parts}


class TestNoReferencesOutside:
    """The sources a test run imports, and the commands that start it, name nothing beside."""

    def test_tests_and_package_name_no_path_beside_the_checkout(self) -> None:
        """No ../, shared/, /work/ or __file__ climbed above the root in tests/ or daemon/."""
        files = sorted([*ROOT.joinpath("tests").rglob("*.py"),
                        *ROOT.joinpath("daemon").rglob("*.py")])
        files.remove(Path(__file__).resolve())  # the scanner spells every pattern it looks for
        assert len(files) > 20
        found = [hit for f in files for hit in references_outside(f, ROOT)]
        assert found == [], "\n".join(found)

    def test_the_scanner_sees_each_way_out(self, tmp_path: Path) -> None:
        """Each way of naming ../shared that the suite used is caught; the legitimate ones not."""
        src = tmp_path / "tests" / "test_x.py"
        src.parent.mkdir()
        src.write_text(textwrap.dedent('''\
            """Docstrings may say ../shared."""
            import os
            from pathlib import Path
            A = Path(__file__).resolve().parents[2] / "legacy"
            B = Path(__file__).parent.parent.parent
            ROOT = Path(__file__).resolve().parents[1]
            C = ROOT.parent
            D = os.path.join(os.pardir, "x")
            E = open("data/../x")
            F = "/work/main"
            G = HERE / "shared" / "legacy"
            OK1 = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
            OK2 = b"/srv/../../etc/passwd"
            OK3 = {"csv": ["../../etc/passwd"]}, Path("../x")  # outside-ok: a refused input
            OK4 = "a=2025-10-01..2025-10-02".partition("..")
            OK5 = parser.add_argument("shared", help="the shared tree")
            H = Path("..") / "x"
            '''), encoding="utf-8")
        found = references_outside(src, tmp_path)
        assert [int(f.split(":")[1]) for f in found] == [4, 5, 7, 8, 9, 10, 11, 17]

    def test_build_and_ci_entry_points_name_nothing_beside(self) -> None:
        """The Makefile, pyproject.toml and the CI script do not reach beside the checkout."""
        for name in ("Makefile", "pyproject.toml", ".ci/run"):
            path = ROOT / name
            if path.is_file():
                text = path.read_text(encoding="utf-8")
                assert "../" not in text and "shared/" not in text, name


class TestFixtures:
    """tests/fixtures/ holds exactly what its manifest says, small, and travels with a clone."""

    def test_every_fixture_matches_its_manifest(self) -> None:
        """Each file's sha256 is the derived one: fixtures change only through derive.py."""
        manifest = json.loads((FIXTURES / "MANIFEST.json").read_text(encoding="utf-8"))
        files = fixture_files()
        assert set(files) == set(manifest)
        for rel, path in files.items():
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == manifest[rel]["sha256"], (
                f"{rel} differs from tests/fixtures/MANIFEST.json: regenerate it with "
                "tests/fixtures/derive.py, never by hand")
            assert len(data) == manifest[rel]["bytes"]

    def test_readme_names_every_source(self) -> None:
        """The README says where each fixture came from."""
        manifest = json.loads((FIXTURES / "MANIFEST.json").read_text(encoding="utf-8"))
        readme = (FIXTURES / "README.md").read_text(encoding="utf-8")
        for rel, entry in manifest.items():
            folder_or_file = rel if rel.startswith("legacy/") else rel.split("/", 1)[0] + "/"
            assert folder_or_file in readme, rel
            source = entry["source"] if rel.startswith("legacy/") else "examples/sidecars/"
            assert source in readme, source

    def test_fixtures_are_small(self) -> None:
        """Well under 1 MB in all: subsets, not copies of the big logs."""
        assert sum(p.stat().st_size for p in fixture_files().values()) < 512 * 1024

    @pytest.mark.skipif(shutil.which("git") is None, reason="git missing")
    def test_no_fixture_is_git_ignored(self) -> None:
        """A git-ignored fixture would pass here and be missing from every clone."""
        if not (ROOT / ".git").exists():
            pytest.skip("not a git checkout")
        paths = [str(p.relative_to(ROOT)) for p in FIXTURES.rglob("*") if p.is_file()
                 and "__pycache__" not in p.parts]
        out = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and out.stdout == "", out.stdout  # 1: none ignored


class TestGuard:
    """The audit-hook guard records reads beside the checkout, and the conftest fails on them."""

    def test_guard_records_an_open_beside_the_checkout(self) -> None:
        """Opening ../shared/<missing> in this process is recorded, with the event and path."""
        if not GUARD.enabled:
            pytest.skip("the checkout's neighbours are everyone's here (/ or the temp dir)")
        target = outside_guard.CHECKOUT.parent / "shared" / "no-such-file-for-the-guard"
        with pytest.raises(OSError):
            target.open("rb")
        seen = GUARD.take()  # taken, so this test's own teardown check does not fail on it
        assert seen[-1] == ("open", str(target))
        assert [s for s in seen if s[1] != str(target)] == []

    def test_what_counts_as_beside(self, tmp_path: Path) -> None:
        """Siblings and SQLite URIs count; the checkout, hidden folders, the venv, fds do not."""
        box = tmp_path / "box"
        guard = outside_guard.OutsideGuard(box / "repo", allowed=[box / "venv", str(box)])
        for path in (box / "shared" / "legacy" / "a.csv", box / "x"):
            assert guard.beside(str(path)), path
        for path in (box / "repo" / "tests" / "a.csv", box / "repo", box / ".cache" / "hf",
                     box / "venv" / "lib" / "x.py", tmp_path / "elsewhere", Path("/etc/hosts")):
            assert not guard.beside(str(path)), path
        guard.hook("sqlite3.connect", (f"file:{box}/shared/a.db?mode=ro",))
        guard.hook("open", (3, "r", 0))
        guard.hook("sqlite3.connect", (":memory:",))
        guard.hook("shutil.copytree", (str(box / "repo" / "t"), str(box / "out")))
        guard.hook("exec", (str(box / "shared"),))
        assert guard.take() == [("sqlite3.connect", f"{box}/shared/a.db"),
                                ("shutil.copytree", str(box / "out"))]
        assert guard.take() == []
        assert not outside_guard.OutsideGuard(Path("/repo")).enabled

    def test_a_test_that_reads_beside_the_checkout_fails(self, tmp_path: Path) -> None:
        """A real pytest run of a test that copies ../shared/x fails with the path named."""
        if not GUARD.enabled:
            pytest.skip("the checkout's neighbours are everyone's here (/ or the temp dir)")
        target = outside_guard.CHECKOUT.parent / "shared" / "no-such-file-for-the-guard"
        (tmp_path / "test_reads_beside.py").write_text(textwrap.dedent(f'''\
            import shutil

            def test_reads_beside(tmp_path):
                try:
                    shutil.copy({str(target)!r}, tmp_path)
                except OSError:
                    pass

            def test_reads_inside(tmp_path):
                (tmp_path / "a").write_text("x")
                assert (tmp_path / "a").read_text() == "x"
            '''), encoding="utf-8")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
             "tests.conftest", "--rootdir", str(tmp_path), "-c", os.devnull,
             str(tmp_path / "test_reads_beside.py")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "2 passed, 1 error" in out.stdout, out.stdout
        assert "beside the checkout" in out.stdout and str(target) in out.stdout
