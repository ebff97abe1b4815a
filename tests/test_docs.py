"""The operator docs stay true: generated parts equal the code, every key is documented, and the
README's test command is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from daemon.codes import CODES, render_issue_codes_doc
from daemon.decisions.schema import canonical_ddl
from daemon.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "Documents"


class TestDocuments:
    """Documents/ describes the code as it is."""

    def test_issue_codes_page_is_generated_from_the_code(self) -> None:
        """If this fails: python -m daemon codes --write-doc"""
        assert (DOCS / "ISSUE_CODES.md").read_text() == render_issue_codes_doc()
        assert len(CODES) >= 40

    def test_schema_reference_shows_the_canonical_ddl(self) -> None:
        assert canonical_ddl() in (DOCS / "SCHEMA_REFERENCE.md").read_text()

    def test_every_config_key_is_documented(self) -> None:
        text = (DOCS / "CONFIGURATION.md").read_text()
        for section, field in Settings.model_fields.items():
            assert f"[{section}" in text, section
            model = field.annotation
            if section == "projects":
                from daemon.settings import ProjectSettings as model  # type: ignore[assignment]
            assert isinstance(model, type) and issubclass(model, BaseModel)
            for key in model.model_fields:
                assert f"`{key}`" in text, f"{section}.{key} is not in CONFIGURATION.md"

    def test_playbook_links_exist(self) -> None:
        for name in ("SCHEMA_REFERENCE.md", "TECHNICAL_KNOWLEDGE_BASE.md",
                     "AI_TRAINING_DATA_STRUCTURE.md"):
            assert (DOCS / name).stat().st_size > 1000

    def test_ci_runs_the_readme_test_command(self) -> None:
        readme = (REPO / "README.md").read_text()
        commands = re.findall(r"^(make \w+)$", readme, flags=re.M)
        assert commands[:2] == ["make demo", "make test"]
        ci = (REPO / ".ci" / "run").read_text()
        assert "\nmake test\n" in ci
