"""Settings: TOML + environment, unknown keys refused, one clear message, exit 78."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("TRAININGD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "config.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


class TestLoading:
    """Where values come from and how paths resolve."""

    def test_embedded_defaults_without_a_file(self, tmp_path: Path) -> None:
        """No config file: defaults, paths under ./data of the working directory."""
        s = load_settings()
        assert s.config_file is None
        assert s.decisions_dir == tmp_path / "data" / "training" / "ai_training_decisions"
        assert s.state_db == tmp_path / "data" / "daemon" / "state.db"
        assert s.summaries_dir == tmp_path / "data" / "daily_summaries"

    def test_relative_paths_resolve_against_the_config_folder(self, tmp_path: Path) -> None:
        """``--config conf/config.toml`` given relatively is made absolute; its paths too."""
        write(tmp_path, '[paths]\ndata_root = "runtime"\n')
        s = load_settings("conf/config.toml")
        assert s.config_file == tmp_path / "conf" / "config.toml"
        assert s.data_root == tmp_path / "conf" / "runtime"

    def test_environment_overrides_file_nested(self, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
        """TRAININGD_SECTION__KEY beats the file."""
        path = write(tmp_path, "[validation]\nchunk_rows = 1000\n")
        monkeypatch.setenv("TRAININGD_VALIDATION__CHUNK_ROWS", "2500")
        assert load_settings(path).validation.chunk_rows == 2500

    def test_projects_section(self, tmp_path: Path) -> None:
        """Per-project tables set the DB path and image roots."""
        path = write(tmp_path, '[projects.mojo3]\ndb = "dbs/m3.db"\n'
                                'image_roots = ["/srv/a", "/srv/b c"]\n')
        s = load_settings(path)
        assert s.project_db("mojo3") == tmp_path / "conf" / "dbs" / "m3.db"
        assert s.projects["mojo3"].image_roots == [Path("/srv/a"), Path("/srv/b c")]

    def test_repository_config_is_valid(self) -> None:
        """The shipped config.toml loads (and documents the defaults)."""
        repo = Path(__file__).resolve().parents[1]
        assert load_settings(repo / "config.toml").validation.chunk_rows == 5000


class TestRefusals:
    """A bad config names the key, where it came from and the value."""

    def test_unknown_key_in_a_section(self, tmp_path: Path) -> None:
        path = write(tmp_path, "[validation]\nchunk_rowz = 10\n")
        with pytest.raises(ConfigError) as err:
            load_settings(path)
        msg = str(err.value)
        assert "validation.chunk_rowz" in msg and str(path) in msg and "10" in msg

    def test_unknown_key_in_a_project_table(self, tmp_path: Path) -> None:
        path = write(tmp_path, '[projects.mojo3]\nimage_root = "/x"\n')
        with pytest.raises(ConfigError, match=r"projects\.mojo3\.image_root"):
            load_settings(path)

    def test_bad_value(self, tmp_path: Path) -> None:
        path = write(tmp_path, "[validation]\naspect_tolerance = -1\n")
        with pytest.raises(ConfigError) as err:
            load_settings(path)
        assert "validation.aspect_tolerance = -1" in str(err.value)

    def test_bad_value_from_environment_names_the_variable(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("TRAININGD_LOGGING__LEVEL", "loud")
        with pytest.raises(ConfigError) as err:
            load_settings()
        assert "TRAININGD_LOGGING__LEVEL" in str(err.value) and "'loud'" in str(err.value)

    def test_unknown_environment_section(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("TRAININGD_VALIDATON__CHUNK_ROWS", "5")
        with pytest.raises(ConfigError, match="TRAININGD_VALIDATON__CHUNK_ROWS"):
            load_settings()

    def test_invalid_toml(self, tmp_path: Path) -> None:
        path = write(tmp_path, "[validation\n")
        with pytest.raises(ConfigError, match="invalid TOML"):
            load_settings(path)

    def test_missing_explicit_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="no such config file"):
            load_settings(tmp_path / "nope.toml")

    def test_cli_exits_78_with_one_message(self, tmp_path: Path) -> None:
        """The real CLI process: exit status 78, the key, file and value on stderr."""
        path = write(tmp_path, "[sources]\nbusy_timeout_ms = 'soon'\n")
        proc = subprocess.run([sys.executable, "-m", "daemon", "validate", "--config", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 78
        assert "sources.busy_timeout_ms = 'soon'" in proc.stderr and str(path) in proc.stderr
        assert proc.stdout == ""
