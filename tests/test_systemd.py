"""The shipped unit files are valid systemd units (checked with systemd-analyze where present)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = ["trainingd.service", "trainingd-validate.service", "trainingd-validate.timer"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    """Verified with the real executable path substituted (the install path does not exist
    on a build machine)."""
    exe = Path(sys.executable).with_name("trainingd")
    for name in UNITS:
        text = (REPO / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/opt/trainingd/bin/trainingd", str(exe)))
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "trainingd.service" not in proc.stderr or "Unknown" not in proc.stderr


def test_service_unit_contract() -> None:
    """The properties the operators rely on."""
    text = (REPO / "systemd" / "trainingd.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure",
                 "RestartPreventExitStatus=78", "User=trainingd", "Environment=HF_HUB_OFFLINE=1",
                 "ProtectSystem=strict", "ReadWritePaths=/var/lib/trainingd",
                 "DeviceAllow=/dev/nvidiactl rw", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in text, line
    assert "\nPrivateDevices=yes" not in text  # would hide the GPU
