"""The files we install for systemd and D-Bus: they load without errors, and h2kd.service is more confined than systemd-importd."""

from __future__ import annotations

import configparser
import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from h2kd import BUS_NAME

REPO = Path(__file__).resolve().parents[1]
SERVICE = REPO / "systemd" / "h2kd.service"
SLICE = REPO / "systemd" / "h2k.slice"
POLICY = REPO / "dbus" / f"{BUS_NAME}.conf"
ACTIVATION = REPO / "dbus" / f"{BUS_NAME}.service"
# systemd-importd ships with Debian's systemd-container (installed by `make deps`).
IMPORTD = next((p for p in (Path("/lib/systemd/system/systemd-importd.service"),
                            Path("/usr/lib/systemd/system/systemd-importd.service")) if p.exists()), None)


def exposure(unit: Path) -> float:
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                         capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert match, f"no exposure level for {unit}:\n{out.stdout}\n{out.stderr}"
    return float(match.group(1))


def test_h2kd_is_more_confined_than_importd() -> None:
    assert IMPORTD is not None, "systemd-importd.service is missing: run `make deps` (systemd-container)"
    ours, theirs = exposure(SERVICE), exposure(IMPORTD)
    assert ours < theirs, f"h2kd.service exposure {ours} is not below systemd-importd's {theirs}"


def test_exposure_score_reacts_to_hardening(tmp_path: Path) -> None:
    # The comparison above means something only if removing our hardening shows in the score.
    bare = tmp_path / "h2kd.service"
    kept = [line for line in SERVICE.read_text().splitlines()
            if not line.startswith(("Protect", "Private", "CapabilityBoundingSet", "SystemCall", "Restrict"))]
    bare.write_text("\n".join(kept) + "\n")
    assert exposure(bare) > exposure(SERVICE) + 2


def verify(units: list[Path], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on copies whose ExecStart= points at an existing h2kd (the venv's
    entry point), since /usr/lib/h2kd/bin/h2kd exists only after `make install`."""
    h2kd = Path(sys.executable).parent / "h2kd"
    copies = []
    for unit in units:
        text = unit.read_text()
        if not Path("/usr/lib/h2kd/bin/h2kd").exists():
            text = text.replace("ExecStart=/usr/lib/h2kd/bin/h2kd", f"ExecStart={h2kd}")
        copy = tmp_path / unit.name
        copy.write_text(text)
        copies.append(copy)
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, copies)],
                          capture_output=True, text=True)


def test_units_verify_without_errors(tmp_path: Path) -> None:
    result = verify([SERVICE, SLICE], tmp_path)
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if "h2kd.service" in line or "h2k.slice" in line]
    assert result.returncode == 0 and ours == [], result.stdout + result.stderr


def test_verify_catches_mistakes(tmp_path: Path) -> None:
    broken = tmp_path / "src" / "h2kd.service"
    broken.parent.mkdir()
    broken.write_text(SERVICE.read_text().replace("WatchdogSec=30", "WatchdogSec=thirty\nNoSuchSetting=1"))
    result = verify([broken], tmp_path)
    assert "Failed to parse sec value" in result.stderr and "NoSuchSetting" in result.stderr


def unit_values(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def test_service_is_the_bus_activated_h2kd() -> None:
    service = unit_values(SERVICE)
    assert service["Service"]["Type"] == "dbus"
    assert service["Service"]["BusName"] == BUS_NAME
    assert service["Install"]["Alias"] == f"dbus-org.{BUS_NAME.removeprefix('org.')}.service"
    activation = unit_values(ACTIVATION)["D-BUS Service"]
    assert activation["Name"] == BUS_NAME
    assert activation["User"] == "root"
    assert activation["SystemdService"] == SERVICE.name


def policy_rules() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    root = ET.parse(POLICY).getroot()
    by_context: dict[str, list[dict[str, str]]] = {}
    for policy in root.iter("policy"):
        key = policy.get("user") or policy.get("context") or ""
        by_context.setdefault(key, []).extend(
            {"rule": rule.tag, **rule.attrib} for rule in policy)
    return by_context.get("root", []), by_context.get("default", [])


def test_bus_policy_lists_exactly_the_interface_methods() -> None:
    root_rules, default_rules = policy_rules()
    assert {"rule": "allow", "own": BUS_NAME} in root_rules
    assert not any(r.get("own") == BUS_NAME for r in default_rules if r["rule"] == "allow")
    allowed = {(r.get("send_interface"), r.get("send_member")) for r in default_rules
               if r["rule"] == "allow" and "send_destination" in r}
    assert all(r.get("send_interface") and r.get("send_member") for r in default_rules
               if r["rule"] == "allow" and "send_destination" in r), "a default allow without interface and member"
    methods = set()
    for name in ("Manager", "Job", "Worker"):
        for iface in ET.parse(REPO / "dbus" / f"{BUS_NAME}.{name}.xml").getroot().iter("interface"):
            methods |= {(iface.get("name"), m.get("name")) for m in iface.iter("method")}
    standard = {("org.freedesktop.DBus.Properties", "Get"), ("org.freedesktop.DBus.Properties", "GetAll"),
                ("org.freedesktop.DBus.Introspectable", "Introspect"), ("org.freedesktop.DBus.Peer", "Ping"),
                ("org.freedesktop.DBus.Peer", "GetMachineId"),
                ("org.freedesktop.DBus.ObjectManager", "GetManagedObjects")}
    assert allowed == methods | standard


def test_the_daemons_man_page_renders_cleanly_and_documents_every_setting() -> None:
    from dataclasses import fields

    from h2kd.config import Config

    page = REPO / "h2kd" / "h2kd.8"
    checked = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    rendered = subprocess.run(["man", "-l", "-P", "cat", str(page)], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "MANWIDTH": "200"}).stdout
    missing = [f.name for f in fields(Config) if f.name not in rendered]
    assert missing == [], f"settings h2kd(8) does not document: {missing}"
    # What an administrator filters the journal and builds dashboards on: every MESSAGE_ID and every metric.
    from h2kd.observability.journal import MESSAGE_IDS
    from h2kd.observability.metrics import Metrics
    names = [family.name + ("_total" if family.type == "counter" else "") for family in Metrics().registry.collect()]
    undocumented = [n for n in [*MESSAGE_IDS.values(), *names] if not re.search(rf"\b{n}\b", rendered)]
    assert undocumented == [], f"message ids and metrics h2kd(8) does not list: {undocumented}"
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read_string((REPO / "systemd" / "h2kd.service").read_text())
    assert "man:h2kd(8)" in service["Unit"]["Documentation"]


def test_bad_settings_stop_h2kd_with_a_clear_line_and_no_restart(tmp_path: Path) -> None:
    """Exit status 78, which h2kd.service does not restart on: the same settings would fail again."""
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read_string((REPO / "systemd" / "h2kd.service").read_text())
    # 65 too: a damaged job store (tests/test_restart.py)
    assert service["Service"]["RestartPreventExitStatus"].split() == ["65", "78"]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for settings, says in (
            ("[h2kd]\nmax_parallel_job = 4\n", "unknown setting 'max_parallel_job'"),
            ("[h2kd]\nmax_parallel_jobs = 'many'\n", "setting 'max_parallel_jobs'"),
            ("[h2kd\n", "h2kd.conf: "),
            ("h2kd = 1\n", "h2kd must be a section"),
            (f"[h2kd]\nstate_dir = '{tmp_path / 'state'}'\noutput_roots = ['{blocker / 'out'}']\n",
             f"cannot create {blocker / 'out'}: Not a directory"),
    ):
        conf = tmp_path / "h2kd.conf"
        conf.write_text(settings)
        ran = subprocess.run([sys.executable, "-m", "h2kd.daemon", "--config", str(conf)], capture_output=True,
                             text=True, timeout=60, cwd=REPO,
                             env={"PATH": "/usr/bin:/bin", "H2KD_BUS_ADDRESS": "unix:path=/nonexistent"})
        assert ran.returncode == 78, ran.stderr
        assert "bad settings: " in ran.stderr and says in ran.stderr, ran.stderr
        assert "Traceback" not in ran.stderr
    ran = subprocess.run([sys.executable, "-m", "h2kd.daemon", "--config", str(tmp_path)], capture_output=True,
                         text=True, timeout=60, cwd=REPO, env={"PATH": "/usr/bin:/bin"})
    assert ran.returncode == 78 and f"cannot read {tmp_path}: Is a directory" in ran.stderr, ran.stderr


def test_a_submitter_reaches_their_job_directory_in_the_default_output_root_and_nothing_else(tmp_path: Path) -> None:
    """Under h2kd.service's umask, the state directory and the output root h2kd makes are passable by everyone
    (0711), so a submitter (here nobody) reaches the directory made for their job; the store, runs/ and a
    directory an administrator made keep their own modes."""
    import os
    import shutil
    import tempfile

    from h2kd.config import Config
    from h2kd.daemon import prepare_directories
    from h2kd.store import JobStore

    base = Path(tempfile.mkdtemp(prefix="h2k-dirs-", dir="/tmp"))
    base.chmod(0o755)
    try:
        admins = base / "admins"
        admins.mkdir(mode=0o700)
        config = Config(state_dir=base / "state", output_roots=[base / "state" / "output", admins])
        old_umask = os.umask(0o027)
        try:
            prepare_directories(config)
            JobStore(config.store_path).close()
        finally:
            os.umask(old_umask)
        modes = {p: p.stat().st_mode & 0o777 for p in (config.state_dir, config.runs_dir, config.output_roots[0],
                                                       admins, config.store_path)}
        assert modes == {config.state_dir: 0o711, config.runs_dir: 0o700, config.output_roots[0]: 0o711,
                         admins: 0o700, config.store_path: 0o600}
        job_dir = config.output_roots[0] / "job-1"
        job_dir.mkdir(mode=0o750)
        shutil.chown(job_dir, "nobody")

        def as_nobody(*argv: str) -> int:
            return subprocess.run(["runuser", "-u", "nobody", "--", *argv], capture_output=True,
                                  timeout=30).returncode

        assert as_nobody("ls", str(job_dir)) == 0
        assert as_nobody("ls", str(config.state_dir)) != 0
        assert as_nobody("cat", str(config.store_path)) != 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_an_administrators_mode_on_the_output_root_survives_restarts(tmp_path: Path) -> None:
    """systemd resets the mode of every StateDirectory= at each start; the output root is not one of them, so
    a group an administrator lets write there (chgrp h2k; chmod 3770) keeps that right. h2kd makes the root
    only when it is missing."""
    import os

    from h2kd.config import Config
    from h2kd.daemon import prepare_directories

    service = unit_values(SERVICE)["Service"]
    assert service["StateDirectory"].split() == ["h2kd"]
    assert service["StateDirectoryMode"] == "0711"
    config = Config(state_dir=tmp_path / "state")
    config.output_roots = [config.state_dir / "output"]
    prepare_directories(config)
    root = config.output_roots[0]
    assert root.stat().st_mode & 0o7777 == 0o711
    os.chown(root, 0, 65534)
    root.chmod(0o3770)
    for _restart in range(2):
        prepare_directories(config)
        assert (root.stat().st_mode & 0o7777, root.stat().st_gid) == (0o3770, 65534)


def test_an_output_root_h2kd_cannot_write_stops_it_and_names_the_drop_in(tmp_path: Path) -> None:
    """As ProtectSystem=strict shows h2kd a directory outside /var/lib/h2kd without ReadWritePaths=: read-only
    (here a read-only tmpfs, in a mount namespace of the test's own)."""
    outside = tmp_path / "srv-out"
    outside.mkdir()
    conf = tmp_path / "h2kd.conf"
    conf.write_text(f"[h2kd]\nstate_dir = '{tmp_path / 'state'}'\noutput_roots = ['{outside}']\n")
    ran = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          'mount -t tmpfs -o ro tmpfs "$1" && exec "$2" -m h2kd.daemon --config "$3"', "sh",
                          str(outside), sys.executable, str(conf)],
                         capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "H2KD_BUS_ADDRESS": "unix:path=/nonexistent"})
    assert ran.returncode == 78, ran.stderr
    assert f"bad settings: {outside} is not writable by h2kd (a read-only file system)" in ran.stderr, ran.stderr
    assert f"ReadWritePaths={outside}" in ran.stderr and "Traceback" not in ran.stderr, ran.stderr


def process_start(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, /proc/PID/stat), None if there is no such process."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def test_h2kds_capabilities_let_it_end_a_check_that_hangs_as_its_caller(tmp_path: Path) -> None:
    """A check made as the caller (a child with the caller's uid) that hangs, in a FUSE mount of theirs, is
    ended with SIGKILL. Root may signal another uid's process only with CAP_KILL: h2kd run with no more than
    h2kd.service's capability bounding set must still give up on the check, say why, and leave no child."""
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read_string(SERVICE.read_text())
    capabilities = service["Service"]["CapabilityBoundingSet"].split()
    bounding = ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in capabilities)])
    script = """
import os
from h2kd import access
from tests.unit.test_access import check_that_hangs
access.CALLER_CHECK_SECONDS = 0.5
fork = os.fork
def recorded_fork():
    pid = fork()
    if pid:
        started = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]
        print("forked", pid, started, flush=True)
    return pid
os.fork = recorded_fork
error = check_that_hangs(20)
print("alive" if error is None else f"{type(error).__name__}: {error}", flush=True)
print("unreaped", sorted(access._UNREAPED), flush=True)
"""
    # A file, not a pipe: a child left hanging would hold a pipe open, and the run with it.
    out = tmp_path / "out"
    with out.open("w") as stdout:
        ran = subprocess.run(["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--", sys.executable,
                              "-c", script], stdout=stdout, stderr=subprocess.STDOUT, text=True, timeout=60, cwd=REPO)
    said = out.read_text()
    left = []
    for pid, started in ((int(line.split()[1]), int(line.split()[2])) for line in said.splitlines()
                         if line.startswith("forked ")):
        if process_start(pid) == started:    # still the check's child, not a process given its number since
            os.kill(pid, signal.SIGKILL)
            left.append(pid)
    assert ran.returncode == 0, said
    assert "H2kError: checking /mnt/theirs/disk.vmdk as uid 65534 took longer than 0.5 s" in said, said
    assert left == [] and "unreaped []" in said, said


def test_job_units_keep_exactly_h2kds_capabilities_by_their_kernel_numbers() -> None:
    """A job unit that does not repair a guest gets h2kd.service's bounding set, given to systemd as a number:
    the same names as the service file, each at the bit the kernel gives it (setpriv lists them in that order)."""
    from h2kd.runner.unit import WORKER_CAPABILITIES, WORKER_CAPABILITY_MASK
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read_string(SERVICE.read_text())
    assert set(WORKER_CAPABILITIES) == set(service["Service"]["CapabilityBoundingSet"].split())
    kernel_order = subprocess.run(["setpriv", "--list-caps"], capture_output=True, text=True,
                                  check=True).stdout.split()
    kernel_numbers = {"CAP_" + name.upper(): number for number, name in enumerate(kernel_order)}
    assert {name: kernel_numbers[name] for name in WORKER_CAPABILITIES} == WORKER_CAPABILITIES
    assert WORKER_CAPABILITY_MASK == sum(1 << kernel_numbers[name] for name in WORKER_CAPABILITIES)
