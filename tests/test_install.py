"""`make install` puts every file where a real host's programs look for it, and the installed commands run."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

EXPECTED = [
    "usr/share/dbus-1/system.d/org.hyper2kvm.h2kd1.conf",
    "usr/share/dbus-1/system-services/org.hyper2kvm.h2kd1.service",
    "usr/share/dbus-1/interfaces/org.hyper2kvm.h2kd1.Manager.xml",
    "usr/share/dbus-1/interfaces/org.hyper2kvm.h2kd1.Job.xml",
    "usr/share/dbus-1/interfaces/org.hyper2kvm.h2kd1.Worker.xml",
    "usr/lib/systemd/system/h2kd.service",
    "usr/lib/systemd/system/h2k.slice",
    "usr/lib/systemd/catalog/h2kd.catalog",
    "usr/lib/sysusers.d/h2kd.conf",
    "usr/share/polkit-1/actions/org.hyper2kvm.h2kd1.policy",
    "usr/share/doc/h2kd/examples/50-h2kd.rules.example",
    "usr/share/cockpit/h2kd/manifest.json",
    "usr/share/cockpit/h2kd/index.html",
    "usr/share/man/man1/h2kctl.1",
    "usr/share/man/man8/h2kd.8",
    "usr/share/bash-completion/completions/h2kctl",
    "usr/share/zsh/vendor-completions/_h2kctl",
]


def test_make_install_into_a_staging_root(tmp_path):
    """Under a hardened umask (027) too: users run h2kctl, and cockpit-bridge, running as the user, reads
    the page."""
    stage = tmp_path / "stage"
    result = subprocess.run(["make", "-C", str(REPO), "install", f"DESTDIR={stage}"], capture_output=True,
                            text=True, timeout=600, preexec_fn=lambda: os.umask(0o027))
    assert result.returncode == 0, result.stdout + result.stderr
    missing = [p for p in EXPECTED if not (stage / p).is_file()]
    assert missing == []
    unit = (stage / "usr/lib/systemd/system/h2kd.service").read_text()
    assert "ExecStart=/usr/lib/h2kd/bin/h2kd\n" in unit
    link = stage / "usr/bin/h2kctl"
    assert link.is_symlink() and str(link.readlink()) == "/usr/lib/h2kd/bin/h2kctl"
    # The daemon and its worker are no commands for users: out of PATH, as udisksd and systemd-importd are.
    assert sorted(p.name for p in (stage / "usr/bin").iterdir()) == ["h2kctl"]
    # The system's Python, whatever python3 a PATH would find first.
    home = (stage / "usr/lib/h2kd/pyvenv.cfg").read_text()
    assert re.search(r"^home = /usr/bin$", home, re.M), home
    for command in ("h2kd", "h2kctl", "h2k-worker", "h2k-sandbox"):
        script = stage / "usr/lib/h2kd/bin" / command
        assert script.read_text().splitlines()[0].startswith("#!/usr/lib/h2kd/bin/python"), "scripts name the final path"
    # The harness that boots private copies of dbus-daemon, polkitd and systemd is no command for the host.
    assert not (stage / "usr/bin/h2k-sandbox").exists()
    unreadable = [str(path.relative_to(stage)) for path in (stage / "usr").rglob("*")
                  if not path.is_symlink() and path.stat().st_mode & (0o005 if path.is_dir() else 0o004) == 0]
    assert unreadable == []
    # Nothing names the staging root: the installed tree works where it lands.
    named = subprocess.run(["grep", "-rlF", str(stage), str(stage / "usr/lib/h2kd/bin"),
                            str(stage / "usr/lib/h2kd/pyvenv.cfg")], capture_output=True, text=True)
    assert named.stdout == ""
    version = subprocess.run([str(stage / "usr/lib/h2kd/bin/python"), "-m", "h2kctl.cli", "--version"],
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "0.1.0" in version.stdout + version.stderr


def test_bus_policy_and_polkit_actions_go_where_their_daemons_read_whatever_the_prefix(tmp_path):
    """dbus-daemon and polkitd read only /usr/share (and /etc), never /usr/local/share."""
    stage = tmp_path / "stage"
    result = subprocess.run(["make", "-C", str(REPO), "install-data", f"DESTDIR={stage}", "PREFIX=/usr/local"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for path in ("usr/share/dbus-1/system.d/org.hyper2kvm.h2kd1.conf",
                 "usr/share/dbus-1/system-services/org.hyper2kvm.h2kd1.service",
                 "usr/share/polkit-1/actions/org.hyper2kvm.h2kd1.policy",
                 "usr/local/lib/systemd/system/h2kd.service",
                 "usr/local/share/man/man8/h2kd.8"):
        assert (stage / path).is_file(), path
    assert not (stage / "usr/local/share/dbus-1/system.d").exists()
    assert not (stage / "usr/local/share/polkit-1").exists()
    unit = (stage / "usr/local/lib/systemd/system/h2kd.service").read_text()
    assert "ExecStart=/usr/local/lib/h2kd/bin/h2kd\n" in unit
    # zsh looks in site-functions, not Debian's vendor-completions, outside /usr.
    assert (stage / "usr/local/share/zsh/site-functions/_h2kctl").is_file()


def test_make_uninstall_removes_what_install_put_there(tmp_path):
    stage = tmp_path / "stage"
    for target in ("install-data", "uninstall"):
        result = subprocess.run(["make", "-C", str(REPO), target, f"DESTDIR={stage}", "PREFIX=/usr/local"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
    left = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if not p.is_dir())
    assert left == []


def test_the_installed_sysusers_file_creates_the_system_group_of_the_example_rules(tmp_path):
    """The group the example polkit rules name exists once systemd-sysusers has read what install put down,
    as a system group (below 1000), without touching the host's own group file."""
    stage = tmp_path / "stage"
    result = subprocess.run(["make", "-C", str(REPO), "install-data", f"DESTDIR={stage}"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    (stage / "etc").mkdir(exist_ok=True)
    created = subprocess.run(["systemd-sysusers", f"--root={stage}"], capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    groups = {line.split(":")[0]: int(line.split(":")[2]) for line in (stage / "etc/group").read_text().splitlines()}
    assert "h2k" in groups and 0 < groups["h2k"] < 1000, groups
    rules = (REPO / "polkit/50-h2kd.rules.example").read_text()
    assert 'subject.isInGroup("h2k")' in rules
