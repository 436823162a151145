"""The systemd units in systemd/ load cleanly and keep the mount visible to the host.

`systemd-analyze verify` works without systemd as PID 1. It needs the ExecStart binary
(/usr/local/bin/unionfuse, written by scripts/install.sh) and only checks a template as an
instance, so each `x@.service` is copied to `x@test.service` in a temp dir first.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT_DIR = REPO / "systemd"
UNIT_SUFFIXES = (".service", ".socket", ".timer", ".path", ".mount", ".target")
UNITS = sorted(p for p in UNIT_DIR.iterdir() if p.suffix in UNIT_SUFFIXES)
CONF_EXAMPLE = UNIT_DIR / "unionfuse.conf.example"
CONF_KEYS = {"lowerdir", "upperdir", "workdir", "mountpoint", "whiteout", "options", "timeout"}

# Settings that give the service a private mount namespace, from which a FUSE mount would
# not propagate to the host (systemd.exec(5), MountFlags=; exec_needs_mount_namespace()),
# plus PrivateUsers= (FUSE mounts and trusted.* xattrs need the initial user namespace).
FORBIDDEN_SETTINGS = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadWritePaths",
    "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths", "BindPaths",
    "BindReadOnlyPaths", "TemporaryFileSystem", "RootDirectory", "RootImage",
    "MountImages", "ExtensionImages", "ExtensionDirectories", "PrivateIPC",
    "PrivateNetwork", "PrivatePIDs", "LogNamespace", "MountFlags", "PrivateUsers",
    "ReadWriteDirectories", "ReadOnlyDirectories", "InaccessibleDirectories",
}


def unit_settings(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for each setting line of a unit file."""
    section = ""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        out.append((section, key.strip(), value.strip()))
    return out


def exec_binaries(path: Path) -> list[str]:
    """Absolute program paths of the Exec*= lines (prefixes like - @ : + ! stripped)."""
    progs = []
    for _section, key, value in unit_settings(path):
        if key.startswith("Exec") and value:
            progs.append(value.split()[0].lstrip("-@:+!"))
    return progs


def analyze_supports(option: str) -> bool:
    out = subprocess.run(["systemd-analyze", "--help"], capture_output=True, text=True)
    return option in out.stdout


def test_units_exist():
    names = [p.name for p in UNITS]
    assert "unionfuse@.service" in names


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_keeps_host_mount_namespace(unit: Path):
    used = {key for _s, key, _v in unit_settings(unit)} & FORBIDDEN_SETTINGS
    assert not used, f"{unit.name}: {sorted(used)} would hide the FUSE mount from the host"


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (run: sudo bash scripts/install.sh)")
    for prog in exec_binaries(unit):
        if not Path(prog).is_file():
            pytest.skip(f"{prog} missing: run `sudo bash scripts/install.sh` first "
                        "(systemd-analyze verify needs ExecStart binaries to exist)")

    name = unit.name.replace("@.", "@test.") if "@." in unit.name else unit.name
    copy = tmp_path / name
    shutil.copyfile(unit, copy)

    cmd = ["systemd-analyze", "verify"]
    if analyze_supports("--man"):
        cmd.append("--man=no")
    if analyze_supports("--generators"):
        cmd.append("--generators=no")
    if analyze_supports("--recursive-errors"):
        # Judge only our unit, not the host's units it pulls in. With this option given,
        # systemd 252 also exits non-zero on load warnings such as an unknown key.
        cmd.append("--recursive-errors=no")
    cmd.append(str(copy))
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    output = res.stdout + res.stderr

    # Unrelated units of this host may be reported too: only lines about ours count.
    ours = re.compile(re.escape(name) + "|" + re.escape(str(copy)))
    about_us = [line for line in output.splitlines() if ours.search(line)]
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}:\n{output}"
    assert not about_us, f"{' '.join(cmd)} complained about {name}:\n" + "\n".join(about_us)


def test_conf_example_format():
    seen = set()
    for n, raw in enumerate(CONF_EXAMPLE.read_text().splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            # Commented-out settings must still be valid ones.
            m = re.fullmatch(r"#([a-z]+)=(.*)", line)
            if m:
                assert m.group(1) in CONF_KEYS, f"line {n}: unknown key {m.group(1)!r}"
            continue
        key, sep, value = line.partition("=")
        assert sep and key in CONF_KEYS, f"line {n}: not a known KEY=VALUE: {raw!r}"
        seen.add(key)
    assert {"lowerdir", "mountpoint"} <= seen
    template = (UNIT_DIR / "unionfuse@.service").read_text()
    assert "--config /etc/unionfuse/%i.conf" in template


def test_conf_example_is_read_by_the_daemon():
    from unionfuse.mount import read_config

    cfg = read_config(str(CONF_EXAMPLE))
    assert cfg["lowerdir"].count(":") == 2
    assert {"upperdir", "workdir", "mountpoint"} <= cfg.keys()
