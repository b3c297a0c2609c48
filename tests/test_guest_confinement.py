"""A guest's own programs, which a repair runs as root, cannot reach beyond the guest: they keep only the
capabilities that changing the guest's files takes, see only their own processes and no network, cannot leave
their chroot, mount, make device nodes or write the kernel's settings, and nothing of theirs outlives them.

The guest here is a small tree holding the host's own shell and tools (with their libraries), run through
commands.in_guest exactly as the repair runs update-initramfs or grub-mkconfig; the repair of a real Debian
guest through it is test_offline_fix's boot test."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from h2kd.operations.offline_fix import commands
from h2kd.operations.offline_fix.confine import KEPT_CAPABILITIES

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="confining a program takes root")

PROGRAMS = ("sh", "cat", "grep", "ls", "chroot", "mknod", "mount", "mkdir", "sleep", "readlink")


def _copy_with_libraries(program: str, root: Path) -> None:
    real = Path(os.path.realpath(shutil.which(program) or program))
    for path in [real, *(Path(p) for p in _libraries(real))]:
        target = root / path.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copy2(os.path.realpath(path), target)
    (root / "bin").mkdir(exist_ok=True)
    link = root / "bin" / program
    if not link.exists():
        link.symlink_to(real)


def _libraries(binary: Path) -> list[str]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    return [word for line in out.splitlines() for word in line.split() if word.startswith("/")]


@pytest.fixture(scope="module")
def guest_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("guest")
    for program in PROGRAMS:
        _copy_with_libraries(program, root)
    for directory in ("proc", "tmp", "dev"):
        (root / directory).mkdir(exist_ok=True)
    return root


def in_guest(root: Path, script: str, timeout: float = 60) -> commands.Completed:
    return commands.in_guest(str(root), ["sh", "-c", script], timeout=timeout)


def status_field(text: str, name: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(name + ":"))


def test_a_guest_program_keeps_only_the_capabilities_that_changing_files_takes(guest_root: Path) -> None:
    result = in_guest(guest_root, "cat /proc/self/status")
    assert result.ok, result.stderr
    kept = sum(1 << n for n in KEPT_CAPABILITIES.values())
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status_field(result.stdout, field), 16) == kept, field
    assert int(status_field(result.stdout, "CapInh"), 16) == 0
    assert int(status_field(result.stdout, "CapAmb"), 16) == 0
    assert status_field(result.stdout, "NoNewPrivs") == "1"
    # What the capabilities are for still works: root's files of the guest are changed as before.
    assert in_guest(guest_root, "echo changed > /tmp/file && cat /tmp/file").stdout == "changed\n"


def test_a_guest_program_sees_only_its_own_processes_and_no_network(guest_root: Path) -> None:
    result = in_guest(guest_root, "cat /proc/1/cmdline; echo; ls /proc; cat /proc/net/dev")
    assert result.ok, result.stderr
    first, *rest = result.stdout.splitlines()
    assert first.replace("\0", " ").startswith("sh -c cat /proc/1/cmdline")
    pids = [int(word) for word in rest if word.isdigit()]
    assert pids and max(pids) < 10, pids           # the shell and its few children, not the host's processes
    interfaces = [line.split(":")[0].strip() for line in rest if ":" in line and "|" not in line]
    assert interfaces == ["lo"]


@pytest.mark.parametrize("attempt, refusal", [
    ("mkdir -p /tmp/out && chroot /tmp/out /bin/sh", "Operation not permitted"),        # the chroot escape's step
    ("mknod /tmp/disk b 7 0", "Operation not permitted"),
    ("mount -t tmpfs none /tmp", "permission denied"),
    ("echo '|/tmp/x' > /proc/sys/kernel/core_pattern", "Read-only file system"),
])
def test_a_guest_program_cannot_leave_the_guest_or_change_the_kernel(guest_root: Path, attempt: str,
                                                                      refusal: str) -> None:
    core_pattern = Path("/proc/sys/kernel/core_pattern").read_text()
    host_mounts = Path("/proc/self/mountinfo").read_text()
    try:
        result = in_guest(guest_root, attempt)
    finally:
        if os.path.ismount(guest_root / "tmp"):        # the host's mount table is not left with the guest's mount
            subprocess.run(["umount", str(guest_root / "tmp")], check=True)
            pytest.fail("the guest's program mounted a file system over its /tmp, seen from the host")
    assert not result.ok
    assert refusal in result.stderr
    assert Path("/proc/sys/kernel/core_pattern").read_text() == core_pattern
    assert not (guest_root / "tmp" / "disk").exists()
    assert Path("/proc/self/mountinfo").read_text() == host_mounts      # its fresh /proc never shows here


def test_the_kernel_knobs_of_its_proc_are_read_only(guest_root: Path) -> None:
    result = in_guest(guest_root, "cat /proc/self/mountinfo")
    assert result.ok, result.stderr
    options = {fields[4]: fields[5].split(",") for fields in (line.split() for line in result.stdout.splitlines())}
    for knob in [k for k in ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq") if os.path.exists(k)]:
        assert "ro" in options[knob], (knob, options.get(knob))


def test_a_program_the_guest_lacks_is_reported_as_chroot_would(guest_root: Path) -> None:
    result = commands.in_guest(str(guest_root), ["update-initramfs", "-u"])
    assert result.returncode == 127
    assert "cannot run update-initramfs in the guest: No such file or directory" in result.stderr


def test_nothing_a_guest_program_started_outlives_its_time_limit(guest_root: Path) -> None:
    result = in_guest(guest_root, "sleep 300 & sleep 301 & sleep 302", timeout=2)
    assert result.returncode == -9
    left = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "root") == str(guest_root):
                left.append(entry.name)
        except OSError:
            pass
    assert left == []
