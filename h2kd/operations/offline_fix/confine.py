"""Confinement of a guest's own programs: what a repair runs from the guest cannot reach beyond the guest.

    python3 -I -S confine.py ROOT -- PROGRAM ARGS...

A repair runs programs it found in the guest (update-initramfs, grub-mkconfig, dpkg and whatever scripts they
call) as root. A guest is data from whoever made the VM: run as plain root in a chroot, any of them could leave
the chroot (chroot again, CAP_SYS_CHROOT), remount the host read-write or mount its disks (CAP_SYS_ADMIN, a node
made with CAP_MKNOD), load a module, signal or take over the host's root processes, or write a sysctl such as
kernel.core_pattern, whose program the kernel runs as root outside every sandbox. So the program runs:
  - in namespaces of its own: mount (its mounts are invisible to the host and private to it), PID (it sees and
    signals only its own processes; a fresh /proc shows only them), network (no interface but a down loopback),
    IPC and UTS;
  - with /proc/sys, /proc/sysrq-trigger and the other writable kernel knobs of that /proc read-only;
  - chrooted into ROOT, with only the capabilities that changing the guest's own files takes (KEPT_CAPABILITIES),
    dropped from its bounding, inheritable and ambient sets, so that no program it starts gets any other back;
  - with no_new_privs: no set-id program or file capability of the guest's gains anything.

This file is run as a program of its own (only the standard library, with -I -S: no environment variable or
site directory of the worker's reaches it), so that its namespaces and its dropped capabilities are its alone:
the worker that starts it keeps its own. The program gets the plain environment GUEST_ENVIRONMENT. Exit status:
the program's, 128+N if signal N ended it, 126 or 127 as chroot(8) when it cannot be run (with a message), and
CONFINE_FAILED when the confinement itself could not be set up (with a message naming the step).
"""

from __future__ import annotations

import ctypes
import os
import sys

GUEST_ENVIRONMENT = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "HOME": "/root",
    "TERM": "dumb",
}
CONFINE_FAILED = 125

# linux/capability.h. Root's ownership of a guest's files, and the rights to give files away and to change
# identity (package scripts drop to their users), are what guest tools use; nothing else.
KEPT_CAPABILITIES = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4, "CAP_KILL": 5,
                     "CAP_SETGID": 6, "CAP_SETUID": 7}
# The writable parts of a fresh /proc that reach the kernel itself (as container runtimes make them read-only).
READ_ONLY_PROC = ("sys", "sysrq-trigger", "bus", "fs", "irq")

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC, _CLONE_NEWPID, _CLONE_NEWNET = (
    0x00020000, 0x04000000, 0x08000000, 0x20000000, 0x40000000)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 1, 24, 38, 47, 4
_CAPABILITY_VERSION_3 = 0x20080522


class ConfineError(Exception):
    """A step of the confinement failed: the program must not run."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _call(what: str, result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise ConfineError(f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, what: str) -> None:
    _call(what, _libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                            ctypes.c_ulong(flags), None))


def _fresh_proc(root: str) -> None:
    """A /proc of the new PID namespace over the guest's, its kernel knobs read-only."""
    proc = os.path.join(root, "proc")
    _mount("proc", proc, "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, f"mounting a fresh proc on {proc}")
    for name in READ_ONLY_PROC:
        path = os.path.join(proc, name)
        if not os.path.exists(path):
            continue
        _mount(path, path, None, _MS_BIND | _MS_REC, f"binding {path}")
        _mount(None, path, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
               f"making {path} read-only")


def _drop_capabilities() -> None:
    """Every capability but KEPT_CAPABILITIES out of the bounding, ambient, inheritable, permitted and effective
    sets; no_new_privs on."""
    kept = sum(1 << number for number in KEPT_CAPABILITIES.values())
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for number in range(last + 1):
        if not kept & (1 << number):
            _call(f"dropping capability {number} from the bounding set",
                  _libc.prctl(_PR_CAPBSET_DROP, ctypes.c_ulong(number), 0, 0, 0))
    _call("clearing the ambient capabilities", _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _call("reading the capabilities", _libc.capget(ctypes.byref(header), data))
    for index, part in enumerate(data):
        mask = (kept >> (32 * index)) & 0xFFFFFFFF
        part.effective &= mask
        part.permitted &= mask
        part.inheritable = 0
    _call("dropping capabilities", _libc.capset(ctypes.byref(header), data))
    _call("setting no_new_privs", _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))


def _run_confined(root: str, argv: list[str]) -> None:
    """In the new PID namespace (its first process): /proc, chroot, capabilities, then exec (never returns)."""
    _libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)       # the namespace ends with the process that made it
    _fresh_proc(root)
    os.chroot(root)
    os.chdir("/")
    _drop_capabilities()
    # Looked up by hand: os.execvpe imports a module, and the host's modules are out of reach once chrooted.
    candidates = [argv[0]] if "/" in argv[0] else [os.path.join(d, argv[0])
                                                   for d in GUEST_ENVIRONMENT["PATH"].split(":")]
    error: OSError = FileNotFoundError(2, os.strerror(2))
    for path in candidates:
        try:
            os.execve(path, argv, GUEST_ENVIRONMENT)
        except FileNotFoundError:
            continue
        except OSError as e:
            error = e
    print(f"cannot run {argv[0]} in the guest: {error.strerror}", file=sys.stderr)
    os._exit(127 if isinstance(error, FileNotFoundError) else 126)


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--":
        print("usage: confine.py ROOT -- PROGRAM ARGS...", file=sys.stderr)
        return 2
    root, argv = os.path.realpath(args[0]), args[2:]
    try:
        _call("making namespaces of its own", _libc.unshare(
            _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS))
        # Mounts are shared with the host's by default (systemd makes / shared): private, or /proc would show there.
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE, "making the mounts private")
    except ConfineError as e:
        print(f"the guest's program could not be confined ({e})", file=sys.stderr)
        return CONFINE_FAILED
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            _run_confined(root, argv)
        except (ConfineError, OSError) as e:
            print(f"the guest's program could not be confined ({e})", file=sys.stderr)
        os._exit(CONFINE_FAILED)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
