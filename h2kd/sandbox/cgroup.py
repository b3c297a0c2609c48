"""Start a process inside a fresh cgroup of our own, check that PID 1 was left alone, and clean up.

Why this exists: a systemd manager adopts the cgroup it starts in. Started in the root cgroup of a
machine whose PID 1 is not systemd, it moves every process of the machine (PID 1 included) into its
own `init.scope`. So every manager or journald we start is first placed, *before it execs*, into a
cgroup directory of ours in each hierarchy systemd uses: `name=systemd` (v1) and the unified (v2)
tree on a hybrid host, or the single cgroup2 tree on a pure cgroup2 host.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Mapping, Sequence

CGROUP_FS = Path("/sys/fs/cgroup")

# The wrapper runs as the child process itself: it writes its own pid ($$, which becomes the pid of
# the program it execs) into each cgroup.procs given before "--", checks it is really listed there,
# and only then execs. Any failure exits 97 without ever running the program.
_ENTER_SCRIPT = r"""
self=$$
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
    echo "$self" > "$1" || exit 97
    grep -qx "$self" "$1" || exit 97
    shift
done
[ "$1" = "--" ] || exit 97
shift
exec "$@"
"""
ENTER_FAILED_EXIT = 97


class CgroupError(RuntimeError):
    """A cgroup could not be set up, or a process could not be placed in it."""


class Pid1CgroupChanged(RuntimeError):
    """PID 1 was moved out of the root cgroup: a manager was started in the root cgroup."""


def hierarchies(root: Path = CGROUP_FS) -> list[Path]:
    """The cgroup trees systemd cares about on this host.

    Hybrid: the named v1 `name=systemd` tree and the unified v2 tree. Pure cgroup2: the one tree.
    """
    systemd_v1 = root / "systemd"
    unified = root / "unified"
    if (systemd_v1 / "cgroup.procs").exists():
        found = [systemd_v1]
        if (unified / "cgroup.procs").exists():
            found.append(unified)
        return found
    if (root / "cgroup.controllers").exists():
        return [root]
    raise CgroupError(f"no name=systemd or cgroup2 hierarchy under {root}")


@dataclass
class OwnCgroup:
    """One cgroup of ours, present in every hierarchy from hierarchies()."""

    name: str
    dirs: list[Path]

    @classmethod
    def create(cls, prefix: str = "h2k", root: Path = CGROUP_FS) -> "OwnCgroup":
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        made: list[Path] = []
        try:
            for tree in hierarchies(root):
                path = tree / name
                path.mkdir()
                made.append(path)
        except OSError as exc:
            for path in made:
                _rmdir_tree(path)
            raise CgroupError(f"cannot create cgroup {name}: {exc}") from exc
        return cls(name, made)

    @property
    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs]

    def pids(self) -> set[int]:
        """Every process in this cgroup or below it, in any of its hierarchies."""
        found: set[int] = set()
        for top in self.dirs:
            for path in _walk_dirs(top):
                try:
                    text = (path / "cgroup.procs").read_text()
                except OSError:
                    continue
                found.update(int(line) for line in text.split())
        return found

    def contains(self, pid: int) -> bool:
        """Whether pid sits in this cgroup (or below) in every hierarchy."""
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return False
        wanted = "/" + self.name
        paths = {}
        for line in lines:
            _, controllers, path = line.split(":", 2)
            paths[controllers] = path
        for tree in self.dirs:
            key = "name=systemd" if tree.name == "systemd" else ""
            path = paths.get(key)
            if path is None or not (path == wanted or path.startswith(wanted + "/")):
                return False
        return True

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process still in this cgroup. They are all descendants of what we started."""
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def remove(self, timeout: float = 10.0) -> None:
        """Kill what is left, wait for it to go, then rmdir every directory, children first."""
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            self.kill_all(signal.SIGKILL)
            time.sleep(0.05)
        leftovers = self.pids()
        if leftovers:
            raise CgroupError(f"cgroup {self.name} still holds processes {sorted(leftovers)}")
        for top in self.dirs:
            while top.exists() and time.monotonic() < deadline:
                try:
                    _rmdir_tree(top)
                except OSError:
                    time.sleep(0.05)   # a just-killed process may still be leaving its cgroup
            if top.exists():
                _rmdir_tree(top)


def _walk_dirs(top: Path) -> list[Path]:
    """top and its sub-directories, deepest first."""
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(top, topdown=False):
        found.append(Path(dirpath))
    return found


def _rmdir_tree(top: Path) -> None:
    for path in _walk_dirs(top):
        try:
            path.rmdir()
        except FileNotFoundError:
            pass


def spawn_in_own_cgroup(
    argv: Sequence[str],
    *,
    prefix: str = "h2k",
    env: Mapping[str, str] | None = None,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
    cwd: str | os.PathLike[str] | None = None,
    root: Path = CGROUP_FS,
) -> tuple[subprocess.Popen[bytes], OwnCgroup]:
    """Start argv with its pid already in a fresh cgroup of ours; refuse if the move did not happen.

    The process is started through a small sh wrapper that moves itself into the cgroup and execs
    argv only if every move succeeded, so the program never runs in the root cgroup.
    """
    group = OwnCgroup.create(prefix, root)
    wrapper = ["/bin/sh", "-c", _ENTER_SCRIPT, "h2k-enter-cgroup", *map(str, group.procs_files), "--", *argv]
    try:
        proc = subprocess.Popen(
            wrapper, env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL,
            stdout=stdout, stderr=stderr, cwd=cwd, start_new_session=True,
        )
    except OSError:
        group.remove()
        raise
    # The wrapper either exec'd (then the program is in our cgroup) or exited 97. A program that
    # exits very fast may be gone before we look, so only a live process outside our cgroup counts.
    deadline = time.monotonic() + 5.0
    while True:
        code = proc.poll()
        if code == ENTER_FAILED_EXIT:
            group.remove()
            raise CgroupError(f"could not move {argv[0]} into cgroup {group.name}; not started")
        if code is not None or group.contains(proc.pid):
            return proc, group
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            group.remove()
            raise CgroupError(f"{argv[0]} did not enter cgroup {group.name}; killed it")
        time.sleep(0.01)


def pid1_cgroup() -> dict[str, str]:
    """PID 1's cgroup path per hierarchy, keyed by controller list ("name=systemd", "pids", "" for v2)."""
    paths: dict[str, str] = {}
    for line in Path("/proc/1/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        paths[controllers] = path
    return paths


def assert_pid1_untouched(before: Mapping[str, str] | None = None) -> None:
    """Raise Pid1CgroupChanged if PID 1 moved: against `before` if given, else it must sit at `/`
    in the name=systemd tree (hybrid) or the cgroup2 tree (pure cgroup2)."""
    now = pid1_cgroup()
    if before is not None:
        if dict(before) != now:
            raise Pid1CgroupChanged(f"PID 1's cgroups changed from {dict(before)} to {now}")
        return
    key = "name=systemd" if "name=systemd" in now else ""
    if now.get(key) != "/":
        raise Pid1CgroupChanged(f"PID 1 is in {now.get(key)!r} ({key or 'cgroup2'}), not '/': {now}")


def rescue_root_init_scope(root: Path = CGROUP_FS) -> list[int]:
    """Undo the trap after the fact: move every process out of `<tree>/init.scope` back to the root
    of that tree and remove those init.scope directories. Returns the pids moved."""
    moved: list[int] = []
    trees = [root / "systemd", root / "pids", root / "unified"]
    if Path("/proc/1/comm").read_text().strip() != "systemd":
        trees.append(root)   # pure cgroup2 host; with systemd as PID 1, root/init.scope is its own
    for tree in trees:
        scope = tree / "init.scope"
        if not (scope / "cgroup.procs").exists():
            continue
        for pid in (scope / "cgroup.procs").read_text().split():
            try:
                (tree / "cgroup.procs").write_text(pid)
                moved.append(int(pid))
            except OSError:
                pass
        _rmdir_tree(scope)
    return moved
