"""The shipped units keep their contract, their sandbox and their exposure score.

Checked three ways: the unit files' keys (parsed, duplicates kept), systemd's own tools where
present (``systemd-analyze security --offline=yes`` for the exposure score, ``verify`` for
syntax), and trainingd's real code run under the units' seccomp rules (``seccomp_jail.py``:
libseccomp, as systemd uses it, because no systemd runs on a build machine).  The DeviceAllow
names are resolved the way systemd resolves them, against ``/proc/devices`` as both NVIDIA driver
generations write it.
"""

from __future__ import annotations

import ctypes.util
import fnmatch
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from daemon.settings import ServiceSettings, Settings

REPO = Path(__file__).resolve().parents[1]
UNITS = ["trainingd.service", "trainingd-validate.service", "trainingd-validate.timer"]
SERVICES = ["trainingd.service", "trainingd-validate.service"]
JAIL = Path(__file__).with_name("seccomp_jail.py")
DATA_ROOT = Path("/var/lib/trainingd")
MAX_EXPOSURE = 2.5

Unit = dict[str, dict[str, list[str]]]


def parse_unit(name: str) -> Unit:
    """Sections -> key -> every value in order (systemd allows a key many times)."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    for raw in (REPO / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{name}: continuation lines are not used: {raw!r}"
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{name}: not a key=value line: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def last(unit: Unit, key: str) -> str:
    return unit["Service"][key][-1]


def words(unit: Unit, key: str) -> list[str]:
    return [w for v in unit["Service"].get(key, []) for w in v.split()]


# --- systemd-analyze -----------------------------------------------------------------------------

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


@cache
def offline_security_works() -> bool:
    """``--offline`` arrived in systemd 250; older ones cannot score a unit file."""
    if ANALYZE is None:
        return False
    proc = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager",
                           str(REPO / "systemd" / "trainingd.service")],
                          capture_output=True, text=True, timeout=60)
    return "Overall exposure level" in proc.stdout


def exposure(name: str) -> tuple[float, str]:
    proc = subprocess.run([ANALYZE or "systemd-analyze", "security", "--offline=yes",
                           "--no-pager", str(REPO / "systemd" / name)],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr
    return float(m.group(1)), proc.stdout


@cache
def syscall_groups() -> dict[str, list[str]]:
    """``@group`` -> its members (calls and nested groups), as this systemd defines them."""
    out = subprocess.run([ANALYZE or "systemd-analyze", "syscall-filter", "--no-pager"],
                         capture_output=True, text=True, timeout=60).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith(" ") and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(item: str) -> set[str]:
    if not item.startswith("@"):
        return {item}
    return set().union(*(expand(m) for m in syscall_groups()[item]))


def allowed_syscalls(unit: Unit) -> set[str]:
    """What the unit's SystemCallFilter= lines leave allowed (allow-list first, then ~ lines)."""
    allowed: set[str] = set()
    for value in unit["Service"]["SystemCallFilter"]:
        deny = value.startswith("~")
        names = set().union(*(expand(w) for w in value.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


def jailed(unit_name: str, cmd: list[str]) -> list[str]:
    """``cmd`` under the unit's system call filter, address families and W^X rule."""
    unit = parse_unit(unit_name)
    assert last(unit, "SystemCallErrorNumber") == "EPERM"
    opts = [a for name in sorted(allowed_syscalls(unit)) for a in ("--allow", name)]
    if words(unit, "RestrictAddressFamilies") == ["AF_UNIX"]:
        opts.append("--unix-only")
    if unit["Service"].get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
        opts.append("--mdwe")
    return [sys.executable, str(JAIL), *opts, "--", *cmd]


needs_jail = pytest.mark.skipif(
    ANALYZE is None or ctypes.util.find_library("seccomp") is None or sys.platform != "linux",
    reason="needs systemd-analyze (to expand the groups) and libseccomp")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAININGD_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


# --- the contract ------------------------------------------------------------------------------


class TestServiceContract:
    """What operators and the daemon rely on in trainingd.service."""

    def test_lifecycle_keys(self) -> None:
        """notify + watchdog, no restart loop on a bad config, mixed kill, reload by SIGHUP."""
        unit = parse_unit("trainingd.service")
        assert last(unit, "Type") == "notify" and last(unit, "NotifyAccess") == "main"
        assert int(last(unit, "WatchdogSec")) > 0
        assert last(unit, "Restart") == "on-failure"
        assert last(unit, "RestartPreventExitStatus") == "78"
        assert last(unit, "KillMode") == "mixed"
        assert last(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
        assert last(unit, "User") == "trainingd"
        assert "HF_HUB_OFFLINE=1" in unit["Service"]["Environment"]

    def test_stop_timeout_exceeds_the_shutdown_budget(self) -> None:
        """systemd waits longer than the daemon's own shutdown budget before SIGKILL."""
        unit = parse_unit("trainingd.service")
        budget = ServiceSettings().shutdown_budget_seconds
        assert int(last(unit, "TimeoutStopSec")) >= budget + 10

    def test_writes_only_the_data_root_and_never_the_decisions_folder(self) -> None:
        """ReadWritePaths is the data root alone; the default decisions folder is read-only."""
        for name in SERVICES:
            unit = parse_unit(name)
            assert last(unit, "ProtectSystem") == "strict", name
            assert words(unit, "ReadWritePaths") == [str(DATA_ROOT)], name
            decisions = Settings.model_validate({}).with_data_root(DATA_ROOT).decisions_dir
            assert decisions.is_relative_to(DATA_ROOT)
            assert f"-{decisions}" in words(unit, "ReadOnlyPaths"), name
            assert last(unit, "ProtectHome") == "read-only", name
            assert last(unit, "UMask") == "0027", name

    def test_systemd_never_reowns_the_data_root(self) -> None:
        """No StateDirectory=: systemd would chown the whole shared tree to User:Group."""
        for name in SERVICES:
            assert "StateDirectory" not in parse_unit(name)["Service"], name

    def test_only_unix_sockets_and_no_network(self) -> None:
        """AF_UNIX for sd_notify and the journal; no network namespace access at all."""
        for name in SERVICES:
            unit = parse_unit(name)
            assert words(unit, "RestrictAddressFamilies") == ["AF_UNIX"], name
            assert last(unit, "PrivateNetwork") == "yes", name
            assert last(unit, "IPAddressDeny") == "any", name

    def test_syscall_filter_keeps_what_cuda_and_torch_call(self) -> None:
        """ioctl, memory and NUMA calls that the CUDA driver and torch use stay allowed."""
        if ANALYZE is None:
            pytest.skip("systemd-analyze is not installed: cannot expand syscall groups")
        unit = parse_unit("trainingd.service")
        assert unit["Service"]["SystemCallFilter"][0] == "@system-service"
        allowed = allowed_syscalls(unit)
        cuda = {"ioctl", "mmap", "munmap", "mprotect", "mremap", "madvise", "mbind",
                "get_mempolicy", "set_mempolicy", "sched_setaffinity", "sched_getaffinity",
                "memfd_create", "clone3", "futex", "prctl", "openat", "readlink", "eventfd2",
                "epoll_wait", "inotify_add_watch", "fsync", "rename", "getdents64", "socket"}
        assert cuda <= allowed, sorted(cuda - allowed)
        refused = {"setuid", "setgroups", "chown", "fchown", "mount", "ptrace", "reboot",
                   "init_module", "swapon", "settimeofday", "perf_event_open", "kexec_load"}
        assert not refused & allowed, sorted(refused & allowed)

    def test_memory_deny_write_execute_off_for_torch_on_for_validate(self) -> None:
        """W^X would break torch's JIT kernels; the torch-free validate unit has it."""
        main = parse_unit("trainingd.service")["Service"]
        assert main.get("MemoryDenyWriteExecute", ["no"])[-1] != "yes"
        assert parse_unit("trainingd-validate.service")["Service"][
            "MemoryDenyWriteExecute"][-1] == "yes"


class TestValidateUnit:
    """The timer's oneshot: exit codes and its tighter sandbox."""

    def test_only_clean_and_errors_found_are_success(self) -> None:
        """SuccessExitStatus=1 alone: 70 (crash), 75 (busy) and 78 (config) fail the unit."""
        unit = parse_unit("trainingd-validate.service")
        assert last(unit, "Type") == "oneshot"
        assert words(unit, "SuccessExitStatus") == ["1"]
        assert "validate" in last(unit, "ExecStart").split()

    def test_no_devices(self) -> None:
        """Validation needs no GPU: PrivateDevices hides all hardware."""
        unit = parse_unit("trainingd-validate.service")
        assert last(unit, "PrivateDevices") == "yes"
        assert "DeviceAllow" not in unit["Service"]

    def test_timer_starts_the_validate_unit(self) -> None:
        """The timer is installed and fires every few minutes."""
        timer = parse_unit("trainingd-validate.timer")
        assert timer["Timer"]["OnUnitActiveSec"] and timer["Install"]["WantedBy"] == [
            "timers.target"]


# --- NVIDIA device names -------------------------------------------------------------------------

# /proc/devices as the two driver generations write it (character devices).  Names from the
# driver sources (NVIDIA/open-gpu-kernel-modules: nv-frontend.c register_chrdev
# "nvidia-frontend"; later nv.c "nvidia" + "nvidiactl", nvidia-modeset-linux.c "nvidia-modeset",
# uvm.c "nvidia-uvm", nv-caps.c "nvidia-caps", nv-caps-imex.c "nvidia-caps-imex-channels") and
# the 550.40.07 release note: 'Changed the name visible in /proc/devices of NVIDIA devices and the
# NVIDIA control device from "nvidia-frontend" to "nvidia" and "nvidiactl"'.
PROC_DEVICES = {
    "535 (nvidia-frontend)": "1 mem\n4 tty\n136 pts\n195 nvidia-frontend\n"
                             "235 nvidia-caps\n509 nvidia-uvm\n",
    "550+ (nvidia, nvidiactl)": "1 mem\n4 tty\n136 pts\n195 nvidia\n195 nvidiactl\n"
                                "195 nvidia-modeset\n234 nvidia-caps-imex-channels\n"
                                "235 nvidia-caps\n509 nvidia-uvm\n",
}
# the nodes a CUDA program opens: /dev/nvidia0, nvidia1, nvidiactl, nvidia-modeset,
# nvidia-uvm, nvidia-uvm-tools, nvidia-caps/nvidia-cap1 (MIG)
NODES = {"nvidia0": (195, 0), "nvidia1": (195, 1), "nvidiactl": (195, 255),
         "nvidia-modeset": (195, 254), "nvidia-uvm": (509, 0), "nvidia-uvm-tools": (509, 1),
         "nvidia-caps/nvidia-cap1": (235, 1)}


def allowed_majors(device_allow: list[str], proc_devices: str) -> set[int]:
    """The majors systemd's bpf_devices_allow_list_major() allows for char-NAME entries."""
    majors: set[int] = set()
    for entry in device_allow:
        spec = entry.split()[0]
        if not spec.startswith("char-"):
            continue
        for line in proc_devices.splitlines():
            major, _, name = line.strip().partition(" ")
            if fnmatch.fnmatchcase(name.strip(), spec.removeprefix("char-")):
                majors.add(int(major))
    return majors


class TestDeviceAllow:
    """The GPU nodes are reachable with old and current NVIDIA drivers."""

    @pytest.mark.parametrize("driver", sorted(PROC_DEVICES))
    def test_every_cuda_node_is_allowed(self, driver: str) -> None:
        """Each node's major matches a char- entry under this driver's /proc/devices names."""
        entries = parse_unit("trainingd.service")["Service"]["DeviceAllow"]
        majors = allowed_majors(entries, PROC_DEVICES[driver])
        missing = [node for node, (major, _) in NODES.items() if major not in majors]
        assert not missing, f"{driver}: {missing} denied by DeviceAllow={entries}"

    def test_fabric_and_imex_nodes_stay_closed(self) -> None:
        """Only what a single-node CUDA program opens: no IMEX channels, no NVSwitch."""
        entries = parse_unit("trainingd.service")["Service"]["DeviceAllow"]
        majors = allowed_majors(entries, PROC_DEVICES["550+ (nvidia, nvidiactl)"])
        assert 234 not in majors
        assert last(parse_unit("trainingd.service"), "DevicePolicy") == "closed"

    def test_control_nodes_also_by_path(self) -> None:
        """Paths are resolved by stat() at start, whatever /proc/devices calls them."""
        entries = parse_unit("trainingd.service")["Service"]["DeviceAllow"]
        for path in ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"):
            assert f"{path} rw" in entries, path


# --- systemd's own checks --------------------------------------------------------------------


@needs_analyze
class TestSystemdAnalyze:
    """systemd-analyze accepts the units and scores them SAFE/OK."""

    @pytest.mark.parametrize("name", SERVICES)
    def test_exposure_at_most_2_5(self, name: str) -> None:
        """`systemd-analyze security` rates each service at or below 2.5."""
        if not offline_security_works():
            pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
        score, report = exposure(name)
        assert score <= MAX_EXPOSURE, report

    @pytest.mark.parametrize("name", SERVICES)
    def test_documented_score_is_the_real_one(self, name: str) -> None:
        """The score quoted in the unit's header and in SYSTEMD.md is what the tool prints."""
        if not offline_security_works():
            pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
        score, _ = exposure(name)
        header = (REPO / "systemd" / name).read_text().split("[Unit]")[0]
        assert f"prints {score:.1f}" in header, header
        doc = (REPO / "Documents" / "SYSTEMD.md").read_text()
        assert f"| `{name}` | {score:.1f} |" in doc

    @pytest.mark.parametrize("unit", UNITS)
    def test_verify_without_warnings(self, unit: str, tmp_path: Path) -> None:
        """`systemd-analyze verify` passes with no key ignored, the install path swapped for
        the real executable (the install path does not exist on a build machine)."""
        exe = Path(sys.executable).with_name("trainingd")
        for name in UNITS:
            text = (REPO / "systemd" / name).read_text()
            (tmp_path / name).write_text(text.replace("/opt/trainingd/bin/trainingd", str(exe)))
        proc = subprocess.run([ANALYZE or "systemd-analyze", "verify", str(tmp_path / unit)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        noise = [line for line in proc.stderr.splitlines()
                 if "ignoring" in line.lower() or "unknown" in line.lower()]
        assert not noise, noise


# --- real code under the units' seccomp rules --------------------------------------------------


@needs_jail
class TestUnderTheFilter:
    """trainingd's own code runs under each unit's system call rules; what they refuse fails."""

    def test_the_jail_refuses_what_the_main_unit_refuses(self, tmp_path: Path) -> None:
        """An internet socket and setgroups() fail with EPERM under trainingd.service's rules."""
        code = ("import os, socket\n"
                "for f in (lambda: socket.socket(socket.AF_INET),"
                " lambda: socket.socket(socket.AF_INET6), lambda: os.setgroups([])):\n"
                "    try:\n        f()\n    except PermissionError as e:\n"
                "        print('refused', e.errno)\n"
                "socket.socket(socket.AF_UNIX).close()\nprint('unix ok')\n")
        proc = subprocess.run(jailed("trainingd.service", [sys.executable, "-c", code]),
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split("\n") == ["refused 1"] * 3 + ["unix ok", ""]

    def test_validate_unit_refuses_writable_executable_memory(self, tmp_path: Path) -> None:
        """MemoryDenyWriteExecute: a W+X mapping fails, a plain RW one works."""
        code = ("import mmap\nmmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE)\n"
                "try:\n    mmap.mmap(-1, 4096, prot=7)\nexcept PermissionError:\n"
                "    print('wx refused')\n")
        proc = subprocess.run(jailed("trainingd-validate.service", [sys.executable, "-c", code]),
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert (proc.returncode, proc.stdout) == (0, "wx refused\n"), proc.stderr

    def test_validate_runs_under_the_validate_unit(self, make_db: Any,
                                                   settings: Settings) -> None:
        """`trainingd validate` reads a live WAL DB and writes its state DB: exit 0."""
        make_db().insert_many(20)
        env = clean_env(TRAININGD_PATHS__DATA_ROOT=str(settings.data_root))
        proc = subprocess.run(
            jailed("trainingd-validate.service",
                   [sys.executable, "-m", "daemon", "validate", "--log-format", "json"]),
            capture_output=True, text=True, timeout=120, env=env, cwd=settings.base_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "20 rows, 20 checked, 0 error(s)" in proc.stdout
        assert settings.state_db.exists()

    @pytest.mark.slow
    def test_service_starts_notifies_validates_and_stops(self, make_db: Any,
                                                         settings: Settings) -> None:
        """`trainingd run` under trainingd.service's rules: READY and WATCHDOG over AF_UNIX,
        a project validated, SIGTERM exits 0."""
        make_db().insert_many(20)
        home = settings.base_dir
        sock_path = home / "notify.sock"
        log_path = home / "daemon.log"
        (home / "config.toml").write_text(
            f'[paths]\ndata_root = "{settings.data_root}"\n'
            "[service]\nheartbeat_seconds = 0.5\nshutdown_budget_seconds = 10\n")
        env = clean_env(NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="1000000")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, \
                log_path.open("wb") as log:
            sock.bind(str(sock_path))
            sock.settimeout(60)
            proc = subprocess.Popen(
                jailed("trainingd.service",
                       [sys.executable, "-m", "daemon", "run", "--config",
                        str(home / "config.toml"), "--log-format", "json"]),
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home)
            try:
                messages: list[str] = []
                while not any("WATCHDOG=1" in m for m in messages):
                    messages.append(sock.recv(4096).decode())
                assert any("READY=1" in m for m in messages)
                checked = _wait_for_event(log_path, "validation.project_checked", proc)
                assert checked["project"] == "mojo3"
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(60) == 0, log_path.read_text()[-3000:]
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        refused = [line for line in log_path.read_text().splitlines()
                   if "Operation not permitted" in line]
        assert not refused, refused

    @pytest.mark.slow
    def test_torch_training_step_runs_under_the_main_unit(self, tmp_path: Path) -> None:
        """Conv + linear forward/backward, AdamW, a DataLoader worker, save and load: the
        CPU path of training works with the allow list (CUDA is checked on a GPU host)."""
        proc = subprocess.run(jailed("trainingd.service", [sys.executable, "-c", TORCH_STEP]),
                              capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env=clean_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.startswith("torch ok 4")

    @pytest.mark.slow
    @pytest.mark.skipif(platform.machine() != "x86_64",
                        reason="oneDNN's JIT convolution is what W^X breaks; checked on x86-64")
    def test_torch_fails_under_memory_deny_write_execute(self, tmp_path: Path) -> None:
        """Why the main unit leaves MemoryDenyWriteExecute off: oneDNN's JIT conv fails."""
        unit = parse_unit("trainingd.service")
        opts = [a for name in sorted(allowed_syscalls(unit)) for a in ("--allow", name)]
        cmd = [sys.executable, str(JAIL), "--mdwe", *opts, "--", sys.executable, "-c",
               TORCH_STEP]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env=clean_env())
        assert proc.returncode != 0 and "torch ok" not in proc.stdout


TORCH_STEP = """
import os, torch
from torch import nn
torch.set_num_threads(2)
m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 2))
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
for _ in range(2):
    loss = nn.functional.cross_entropy(m(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
ds = torch.utils.data.TensorDataset(x, y)
n = sum(len(b[0]) for b in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1))
torch.save(m.state_dict(), "m.pt"); torch.load("m.pt")
print("torch ok", n, torch.cuda.is_available())
if torch.cuda.is_available():
    a = torch.randn(512, 512, device="cuda"); print("cuda ok", float((a @ a).sum().cpu()) != 0)
"""


def _wait_for_event(log_path: Path, event: str, proc: subprocess.Popen[bytes],
                    timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == event:
                return dict(rec)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no {event}; exit={proc.poll()}\n{log_path.read_text()[-3000:]}")
