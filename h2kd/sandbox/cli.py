"""h2k-sandbox: run a command (or a shell) against a private h2kd stack, like dbus-run-session does for a session bus.

    h2k-sandbox run [--state-dir DIR] [--keep] [--no-daemon] -- CMD ARGS...
    h2k-sandbox shell [--state-dir DIR] [--keep]

CMD gets DBUS_SYSTEM_BUS_ADDRESS pointing at the private bus, so `busctl --system`, `gdbus --system`
and h2kctl talk to the private h2kd, plus H2K_SANDBOX_* variables (output dir, state dir, logs,
metrics URL, the systemd manager's bus). The exit status is CMD's (128+N if a signal N ended it).
The stack is torn down when CMD ends, and also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from h2kd.sandbox.stack import Stack, StackError, missing_programs, new_base_dir

EXIT_SETUP_FAILED = 125   # as env(1) and dbus-run-session: the command itself never ran


class _Terminated(Exception):
    """SIGTERM or SIGHUP reached h2k-sandbox itself."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="h2k-sandbox",
        description="Boot a private system bus with polkitd, journald, a systemd manager and h2kd, "
                    "run a command against it, and tear it all down.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run CMD ARGS... inside the stack; exit with its status"),
                            ("shell", "run an interactive shell inside the stack")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--state-dir", type=Path, help="keep h2kd's store, and the outputs (in its output/), here "
                       "across runs (default: inside the temporary base directory)")
        p.add_argument("--keep", action="store_true",
                       help="keep the base directory (logs, outputs) afterwards and print where it is")
        p.add_argument("--no-daemon", action="store_true", help="start everything but h2kd")
        if name == "run":
            p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    return parser


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(signum)


def _wait_child(child: subprocess.Popen[bytes]) -> int:
    """Wait for CMD; pass SIGTERM/SIGHUP on to it and keep waiting so that it can clean up."""
    while True:
        try:
            code = child.wait()
            return 128 - code if code < 0 else code
        except _Terminated as stop:
            if child.poll() is None:
                child.send_signal(stop.signum)
        except KeyboardInterrupt:
            # The terminal sent SIGINT to CMD too (same process group): wait for it to react.
            continue


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            print("h2k-sandbox run: no command given (h2k-sandbox run -- CMD ARGS...)", file=sys.stderr)
            return 2
    else:
        command = [os.environ.get("SHELL") or "/bin/bash"]

    if os.geteuid() != 0:
        print("h2k-sandbox: must run as root: it starts polkitd, systemd-journald and a systemd "
              "manager in cgroups of their own (try: sudo h2k-sandbox ...)", file=sys.stderr)
        return EXIT_SETUP_FAILED
    missing = missing_programs()
    if missing:
        print("h2k-sandbox: missing programs: " + ", ".join(missing) +
              " (Debian packages: dbus, polkitd, systemd, util-linux; `make deps` installs the rest)",
              file=sys.stderr)
        return EXIT_SETUP_FAILED

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_terminated)
    base = new_base_dir("h2k-sandbox-")
    # A kept store keeps its outputs: its jobs name files there, and queued ones are to write there.
    outputs = args.state_dir / "output" if args.state_dir else None
    stack = Stack(base, state_dir=args.state_dir, start_daemon=not args.no_daemon, output_dir=outputs)
    status = EXIT_SETUP_FAILED
    try:
        try:
            stack.start()
        except StackError as exc:
            print(f"h2k-sandbox: the stack did not start: {exc}", file=sys.stderr)
            return EXIT_SETUP_FAILED
        env = {**os.environ, **stack.env()}
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        try:
            child = subprocess.Popen(command, env=env)
        except OSError as exc:
            print(f"h2k-sandbox: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
            return 127 if isinstance(exc, FileNotFoundError) else 126
        status = _wait_child(child)
        return status
    except (KeyboardInterrupt, _Terminated) as exc:
        # Interrupted while the stack was starting: stop what runs and report it as a signal would.
        signum = exc.signum if isinstance(exc, _Terminated) else signal.SIGINT
        status = 128 + signum
        return status
    finally:
        # A second Ctrl-C or SIGTERM must not cut the teardown short.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        try:
            stack.stop()
        except StackError as exc:
            print(f"h2k-sandbox: {exc}", file=sys.stderr)
        if args.keep:
            print(f"h2k-sandbox: kept {base} (logs in {base / 'logs'})", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
