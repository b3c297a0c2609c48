"""A guest's own programs, which a repair runs as root, cannot reach beyond the guest: they keep only the
capabilities that changing the guest's files takes, see only their own processes and no network, cannot leave
their chroot, mount, make device nodes or write the kernel's settings, and nothing of theirs outlives them.

The guest here is a small tree holding the host's own shell and tools (with their libraries), run through
commands.in_guest exactly as the repair runs update-initramfs or grub-mkconfig; the repair of a real Debian
guest through it is test_offline_fix's boot test."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from h2kd.operations.offline_fix import commands
from h2kd.operations.offline_fix.confine import KEPT_CAPABILITIES

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="confining a program takes root")

PROGRAMS = ("sh", "cat", "grep", "ls", "chroot", "mknod", "mount", "mkdir", "sleep", "readlink", "setsid", "perl")


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
    os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))    # as the repair's private /dev has
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
    assert "confine.py" in first                   # the namespace's init is h2kd's, not the guest's program
    pids = [int(word) for word in rest if word.isdigit()]
    assert pids and max(pids) < 10, pids           # the init, the shell and its few children, not the host's
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
    # Its fresh /proc never shows in the host's mount table.
    assert [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(guest_root) in line] == []


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


def processes_in(root: Path) -> list[str]:
    left = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "root") == str(root):
                left.append(entry.name)
        except OSError:
            pass
    return left


# On x86-64: prctl(PR_SET_PDEATHSIG, 0), then setsid(): a program rid of the signal it would get when its parent
# dies, in a session (and process group) of its own.
ESCAPE = "syscall(157, 1, 0, 0, 0, 0); syscall(112); sleep 300"


@pytest.mark.parametrize("argv", [["sh", "-c", "sleep 300 & sleep 301 & sleep 302"],
                                  ["sh", "-c", "setsid sleep 300 & sleep 301"],
                                  ["sh", "-c", f"perl -e '{ESCAPE}' & sleep 301"],
                                  ["perl", "-e", ESCAPE]])
def test_nothing_a_guest_program_started_outlives_its_time_limit(guest_root: Path, argv: list[str]) -> None:
    """Detached into a session of its own, or rid of its parent-death signal, a guest's process is still ended
    with the namespace, the program run itself included; and the repair is not left waiting for its output."""
    started = time.monotonic()
    result = commands.in_guest(str(guest_root), argv, timeout=2)
    assert result.returncode == -9 and f"{argv[0]} did not finish within 2 s" in result.stderr
    assert time.monotonic() - started < commands.KILLED_OUTPUT_SECONDS
    for _ in range(50):
        if not processes_in(guest_root):
            break
        time.sleep(0.1)
    assert processes_in(guest_root) == []


def perl(root: Path, code: str) -> str:
    result = commands.in_guest(str(root), ["perl", "-e", code])
    assert result.ok, result.stderr
    return result.stdout


def test_the_kernels_keyrings_are_out_of_a_guest_programs_reach(guest_root: Path) -> None:
    """Keyrings belong to a uid, not a namespace: root's user keyring would be the host root's."""
    # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0), add_key("user", "h2k", "x", 1, KEY_SPEC_USER_KEYRING)
    assert perl(guest_root, 'print syscall(250, 0, -4, 0) == -1 ? "refused: $!" : "reached"') == \
        "refused: Operation not permitted"
    add_key = ('my ($t, $d, $p) = ("user", "h2k", "x"); '
               'print syscall(248, $t, $d, $p, 1, -4) == -1 ? "refused: $!" : "added"')
    assert perl(guest_root, add_key) == \
        "refused: Operation not permitted"


def test_only_socket_families_and_protocols_a_guests_tools_use_are_open(guest_root: Path) -> None:
    """Another family (AppleTalk, 5), or another protocol of an open one (SCTP, 132; netlink's crypto_user, 21),
    could make the host's kernel load its module for a guest's program."""
    code = 'socket(S, %d, %d, %d) ? print "open" : print "refused: $!"'
    pair = 'socketpair(A, B, %d, %d, %d) ? print "open" : print "refused: $!"'
    refused = "refused: Operation not permitted"
    assert perl(guest_root, code % (1, 2, 0)) == "open"                     # AF_UNIX
    assert perl(guest_root, pair % (1, 1, 0)) == "open"
    assert perl(guest_root, code % (2, 2, 0)) == "open"                     # AF_INET, UDP
    assert perl(guest_root, code % (16, 3, 0)) == "open"                    # AF_NETLINK, route
    assert perl(guest_root, code % (5, 2, 0)) == refused                    # AF_APPLETALK
    assert perl(guest_root, code % (2**32 + 5, 2, 0)) == refused
    assert perl(guest_root, pair % (5, 2, 0)) == refused
    assert perl(guest_root, code % (2, 1, 132)) == refused                  # AF_INET, SCTP
    assert perl(guest_root, code % (2, 1, 2**32 + 132)) == refused
    assert perl(guest_root, code % (16, 3, 21)) == refused                  # AF_NETLINK, crypto_user


# i386 programs, with no C library: socketcall(SYS_SOCKET, {AF_UNIX, SOCK_STREAM, 0}), and
# keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0); each exits with the errno it got, 0 if none.
I386_PROGRAMS = {
    "socket32": "movl $102, %eax; movl $1, %ebx; leal args, %ecx; int $0x80",
    "keyctl32": "movl $288, %eax; movl $0, %ebx; movl $-4, %ecx; movl $0, %edx; int $0x80",
}
I386_EXIT = ("movl %eax, %ebx; negl %ebx; testl %eax, %eax; jns 1f; jmp 2f; 1: movl $0, %ebx; "
             "2: movl $1, %eax; int $0x80\n.data\nargs: .long 1, 1, 0\n")


def test_32_bit_system_calls_are_filtered_too(guest_root: Path, tmp_path: Path) -> None:
    """Any program can make i386 system calls (int $0x80), where sockets are opened through socketcall(), whose
    arguments no filter can read: left unfiltered, that path opened every family the filter refuses. It opens
    none, and keyrings are refused there too."""
    for name, body in I386_PROGRAMS.items():
        source = tmp_path / f"{name}.S"
        source.write_text(f".text\n.globl _start\n_start:\n{body}\n{I386_EXIT}")
        built = subprocess.run(["gcc", "-m32", "-nostdlib", "-static", "-o", str(guest_root / name), str(source)],
                               capture_output=True, text=True)
        assert built.returncode == 0, built.stderr
    assert commands.in_guest(str(guest_root), ["/socket32"]).returncode == 1       # EPERM
    assert commands.in_guest(str(guest_root), ["/keyctl32"]).returncode == 1


def test_a_guest_program_cannot_rebind_or_resize_a_loop_device(guest_root: Path) -> None:
    """The guest's own disk is a loop device under its mounted file systems: its status may be read, not changed."""
    free = subprocess.run(["losetup", "-f"], capture_output=True, text=True, check=True).stdout.strip()
    node = guest_root / "dev" / Path(free).name
    node.unlink(missing_ok=True)
    os.mknod(node, 0o600 | stat.S_IFBLK, os.stat(free).st_rdev)
    try:
        code = (f'open(F, "+<", "/dev/{node.name}") or die "open: $!"; my $buffer = "\\0" x 256; '
                'ioctl(F, %d, $buffer) ? print "done" : print "$!"')
        assert perl(guest_root, code % 0x4C07) == "Operation not permitted"     # LOOP_SET_CAPACITY
        assert perl(guest_root, code % 0x4C01) == "Operation not permitted"     # LOOP_CLR_FD
        # LOOP_GET_STATUS64: "not bound", or its status should something have bound it meanwhile
        assert perl(guest_root, code % 0x4C05) in ("No such device or address", "done")
    finally:
        node.unlink()


def test_a_guests_proc_that_is_a_link_leads_nowhere_outside_it(guest_root: Path, tmp_path: Path) -> None:
    """The fresh /proc is mounted from inside the chroot: a guest whose /proc leads to a path of the host's finds it
    in its own tree, and sees its own processes there, never the host's."""
    root = tmp_path / "linked"
    shutil.copytree(guest_root, root, symlinks=True)
    (root / "proc").rmdir()
    host_dir = tmp_path / "host-side"
    host_dir.mkdir()
    (root / str(host_dir).lstrip("/")).mkdir(parents=True)
    (root / "proc").symlink_to(host_dir)
    result = in_guest(root, "ls /proc; echo x > /proc/sys/kernel/core_pattern")
    pids = [int(word) for word in result.stdout.split() if word.isdigit()]
    assert pids and max(pids) < 10, pids
    assert "Read-only file system" in result.stderr
    assert list(host_dir.iterdir()) == []
