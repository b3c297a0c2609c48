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
  - chrooted into ROOT, the fresh /proc mounted from inside the chroot (so a guest's /proc that is a symbolic
    link leads nowhere outside it), its kernel knobs (READ_ONLY_PROC) read-only;
  - with only the capabilities that changing the guest's own files takes (KEPT_CAPABILITIES), dropped from its
    bounding, inheritable and ambient sets, so that no program it starts gets any other back; no_new_privs;
  - under a seccomp filter (libseccomp) that refuses the kernel's keyrings (shared by uid, not by namespace;
    request_key runs a host program as root), sockets of families and protocols that could load a host module
    (anything but unix, inet, inet6 and netlink, and their common protocols; i386 programs get no socket, see
    _load_filter), and the loop-device ioctls that would rebind or resize the guest's own disk under its mounted
    file systems.
The namespace's first process (its init) is this program's own code: it reaps every process of the namespace,
ends with the guest program, and dies with whoever started it (a parent-death signal it sets itself, checked
against a pipe, which the guest cannot clear for it). When it ends, the kernel ends every process left in the
namespace, so nothing a guest program started (detached, in a session of its own) outlives it.

This file is run as a program of its own (only the standard library, with -I -S: no environment variable or
site directory of the worker's reaches it), so that its namespaces and its dropped capabilities are its alone:
the worker that starts it keeps its own. The program gets the plain environment GUEST_ENVIRONMENT. Exit status:
the program's, 128+N if signal N ended it, 126 or 127 as chroot(8) when it cannot be run (with a message), and
CONFINE_FAILED when the confinement itself could not be set up (with a message naming the step).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import sys

GUEST_ENVIRONMENT = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "HOME": "/root",
    "TERM": "dumb",
    # dracut would try mknod and copy SELinux labels (both need capabilities the guest's programs lack); it
    # manages without either.
    "DRACUT_NO_MKNOD": "1",
    "DRACUT_NO_XATTR": "1",
}
CONFINE_FAILED = 125

# linux/capability.h. Root's ownership of a guest's files, and the rights to give files away and to change
# identity (package scripts drop to their users), are what guest tools use; nothing else.
KEPT_CAPABILITIES = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4, "CAP_KILL": 5,
                     "CAP_SETGID": 6, "CAP_SETUID": 7}
# The parts of a fresh /proc that reach the kernel or the hardware (as container runtimes make them read-only).
READ_ONLY_PROC = ("sys", "sysrq-trigger", "bus", "fs", "irq", "acpi", "driver", "scsi", "asound")
# Socket families a guest's tools may use; any other could make the host kernel load its protocol's module.
SOCKET_FAMILIES = (1, 2, 10, 16)     # AF_UNIX, AF_INET, AF_INET6, AF_NETLINK
# ...and of their protocols, those the tools use (the others have modules too: SCTP, netlink's crypto_user).
_INET_PROTOCOLS = (0, 1, 6, 17, 58)                         # default, ICMP, TCP, UDP, ICMPv6
SOCKET_PROTOCOLS = {2: _INET_PROTOCOLS, 10: _INET_PROTOCOLS,
                    16: (0, 4, 7, 9, 15, 16)}   # route, sock_diag, selinux, audit, kobject_uevent, generic
# ioctls (linux/loop.h) that rebind, reconfigure or resize a loop device; reading its status stays allowed.
LOOP_CHANGES = (0x4C00, 0x4C01, 0x4C02, 0x4C04, 0x4C06, 0x4C07, 0x4C08, 0x4C09, 0x4C0A)

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC, _CLONE_NEWPID, _CLONE_NEWNET = (
    0x00020000, 0x04000000, 0x08000000, 0x20000000, 0x40000000)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAPABILITY_VERSION_3 = 0x20080522
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_ACT_ERRNO = 0x00050000
_SCMP_CMP_EQ, _SCMP_CMP_GE, _SCMP_CMP_MASKED_EQ = 4, 5, 7
# The 32-bit architectures a machine also runs programs of (audit.h's AUDIT_ARCH_*): x86-64 runs i386 and x32,
# aarch64 runs arm.
_COMPAT_ARCHES = {0xC000003E: (0x40000003, 0x4000003E), 0xC00000B7: (0x40000028,)}


class ConfineError(Exception):
    """A step of the confinement failed: the program must not run."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class _ArgCompare(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


def _call(what: str, result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise ConfineError(f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, what: str) -> None:
    _call(what, _libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                            ctypes.c_ulong(flags), None))


def _fresh_proc() -> None:
    """A /proc of the new PID namespace at the chroot's /proc, its kernel knobs read-only."""
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "mounting a fresh proc on /proc")
    for name in READ_ONLY_PROC:
        path = "/proc/" + name
        if not os.path.lexists(path):
            continue
        _mount(path, path, None, _MS_BIND | _MS_REC, f"binding {path}")
        _mount(None, path, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
               f"making {path} read-only")


def _drop_capabilities(last_capability: int) -> None:
    """Every capability but KEPT_CAPABILITIES out of the bounding, ambient, inheritable, permitted and effective
    sets; no_new_privs on."""
    kept = sum(1 << number for number in KEPT_CAPABILITIES.values())
    for number in range(last_capability + 1):
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


def _load_filter(seccomp: ctypes.CDLL) -> None:
    """The seccomp filter of the module docstring, for this machine's own system calls and its 32-bit ones (an
    i386 or armhf guest's programs, and any program's int $0x80). Every rule holds for both: libseccomp gives a
    rule to the architectures the filter has when it is added. i386 programs open sockets through socketcall(),
    whose arguments a filter cannot read, so on that path a socket is refused whatever its family; a repair's
    tools do not need one (syslog and nscd fall back without)."""
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
    seccomp.seccomp_arch_native.restype = ctypes.c_uint32
    seccomp.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    seccomp.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                               ctypes.POINTER(_ArgCompare)]
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    seccomp.seccomp_release.argtypes = [ctypes.c_void_p]
    context = seccomp.seccomp_init(_SCMP_ACT_ALLOW)
    if not context:
        raise ConfineError("making a seccomp filter failed")
    try:
        refused = _SCMP_ACT_ERRNO | errno.EPERM

        def deny(name: str, *compares: tuple[int, int, int, int]) -> None:
            number = seccomp.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                raise ConfineError(f"the system call {name} is unknown to libseccomp")
            array = (_ArgCompare * max(len(compares), 1))(*(_ArgCompare(*c) for c in compares))
            _check(seccomp.seccomp_rule_add_array(context, refused, number, len(compares), array),
                   f"a seccomp rule for {name}")

        for arch in _COMPAT_ARCHES.get(seccomp.seccomp_arch_native(), ()):
            _check(seccomp.seccomp_arch_add(context, arch), f"adding architecture {arch:#x}")
        # The kernel reads ints and an unsigned int: a value with any of the upper 32 bits set is caught by a ">="
        # rule (families, protocols), or compared on its lower 32 bits only (ioctl requests).
        for call in ("socket", "socketpair"):
            for family in _refused_below(SOCKET_FAMILIES):
                deny(call, (0, _SCMP_CMP_EQ, family, 0))
            deny(call, (0, _SCMP_CMP_GE, max(SOCKET_FAMILIES) + 1, 0))
            for family, protocols in SOCKET_PROTOCOLS.items():
                for protocol in _refused_below(protocols):
                    deny(call, (0, _SCMP_CMP_EQ, family, 0), (2, _SCMP_CMP_EQ, protocol, 0))
                deny(call, (0, _SCMP_CMP_EQ, family, 0), (2, _SCMP_CMP_GE, max(protocols) + 1, 0))
        for name in ("keyctl", "add_key", "request_key"):
            deny(name)
        for request in LOOP_CHANGES:
            deny("ioctl", (1, _SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, request))
        _check(seccomp.seccomp_load(context), "loading the seccomp filter")
    finally:
        seccomp.seccomp_release(context)


def _refused_below(allowed: tuple[int, ...]) -> list[int]:
    return [n for n in range(max(allowed)) if n not in allowed]


def _check(result: int, what: str) -> None:
    """A libseccomp call's result: negative errno on failure."""
    if result < 0:
        raise ConfineError(f"{what}: {os.strerror(-result)}")


def _exec_program(argv: list[str]) -> None:
    """The guest's program, looked up in the guest's PATH (by hand: os.execvpe imports a module, and the host's
    modules are out of reach once chrooted). Never returns."""
    for signum in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):     # as Python left them: back to the default
        signal.signal(signum, signal.SIG_DFL)
    candidates = [argv[0]] if "/" in argv[0] else [os.path.join(d, argv[0])
                                                   for d in GUEST_ENVIRONMENT["PATH"].split(":")]
    error: OSError = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
    for path in candidates:
        try:
            os.execve(path, argv, GUEST_ENVIRONMENT)
        except FileNotFoundError:
            continue
        except OSError as e:
            error = e
    print(f"cannot run {argv[0]} in the guest: {error.strerror}", file=sys.stderr)
    os._exit(127 if isinstance(error, FileNotFoundError) else 126)


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _init(root: str, argv: list[str], parent_alive: int, last_capability: int, seccomp: ctypes.CDLL) -> int:
    """The namespace's first process: dies with its parent, sets up the guest's view, starts the program, reaps
    every process, and ends with the program (its exit code)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if select.select([parent_alive], [], [], 0)[0]:     # the parent died before the signal was set: end now
        return CONFINE_FAILED
    _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)        # not to be traced, nor its memory read, by the guest's programs
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.chroot(root)
    os.chdir("/")
    _fresh_proc()
    _drop_capabilities(last_capability)
    _load_filter(seccomp)
    program = os.fork()
    if program == 0:
        try:
            os.close(parent_alive)
            _exec_program(argv)
        finally:
            os._exit(CONFINE_FAILED)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return CONFINE_FAILED
        if pid == program:
            return _exit_code(status)


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--":
        print("usage: confine.py ROOT -- PROGRAM ARGS...", file=sys.stderr)
        return 2
    root, argv = os.path.realpath(args[0]), args[2:]
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:     # the host's, read before the guest's view is made
            last_capability = int(f.read())
        seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        _call("making namespaces of its own", _libc.unshare(
            _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS))
        # Mounts are shared with the host's by default (systemd makes / shared): private, or /proc would show there.
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE, "making the mounts private")
    except (ConfineError, OSError, ValueError) as e:
        print(f"the guest's program could not be confined ({e})", file=sys.stderr)
        return CONFINE_FAILED
    parent_alive, alive = os.pipe()     # the init sees its read end close when this process is gone
    sys.stdout.flush()
    sys.stderr.flush()
    init = os.fork()
    if init == 0:
        code = CONFINE_FAILED
        try:
            os.close(alive)
            code = _init(root, argv, parent_alive, last_capability, seccomp)
        except (ConfineError, OSError) as e:
            print(f"the guest's program could not be confined ({e})", file=sys.stderr)
        finally:
            os._exit(code)
    os.close(parent_alive)
    _, status = os.waitpid(init, 0)
    return _exit_code(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
