"""Renders the h2kctl(1) man page (roff) from the argparse definition: `python -m h2kctl.manpage > h2kctl.1`."""

from __future__ import annotations

import sys

from h2kd import __version__
from h2kctl import schema
from h2kctl.argtree import Command, Option, global_dests, walk
from h2kctl.cli import CTRL_C_HELP, DESCRIPTION, PROG, build_parser
from h2kctl.errors import EXIT_CODE_HELP


def escape(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.split("\n"))


def _option_head(option: Option) -> str:
    flags = ", ".join(f"\\fB{escape(f)}\\fR" for f in option.flags)
    if option.metavar is None:
        return flags
    if option.optional_value:
        return f"{flags}[=\\fI{escape(option.metavar)}\\fR]"
    return f"{flags} \\fI{escape(option.metavar)}\\fR"


def _synopsis(command: Command, prefix: str) -> str:
    parts = [f"\\fB{escape(prefix + ' ' + command.name)}\\fR"]
    if command.options:
        parts.append("[\\fIOPTIONS\\fR...]")
    if command.subcommands:
        parts.append("[\\fI" + "|".join(escape(s.name) for s in command.subcommands) + "\\fR]")
    for positional in command.positionals:
        name = f"\\fI{escape(positional.metavar or '')}\\fR"
        name += "..." if positional.repeat else ""
        parts.append(f"[{name}]" if positional.omissible else name)
    return " ".join(parts)


def _command(command: Command, prefix: str, out: list[str]) -> None:
    out += [".TP", _synopsis(command, prefix), escape(command.help[:1].upper() + command.help[1:]) + "."]
    entries = command.positionals + command.options
    if entries or command.subcommands:
        out.append(".RS")
        for option in entries:
            head = _option_head(option) if option.flags else f"\\fI{escape(option.metavar or '')}\\fR"
            out += [".TP", head, escape(option.help)]
        for sub in command.subcommands:
            _command(sub, f"{prefix} {command.name}", out)
        out.append(".RE")


def render() -> str:
    parser = build_parser()
    root = walk(parser, PROG, skip=frozenset())
    shared = global_dests(parser)
    commands = [walk(p, name, next(a.help for a in action._choices_actions if a.dest == name) or "", shared)
                for action in parser._subparsers._group_actions for name, p in action.choices.items()]
    out = [f'.TH H2KCTL 1 "" "h2kd {__version__}" "h2kctl"',
           ".SH NAME", f"{PROG} \\- control h2kd, the disk image conversion daemon",
           ".SH SYNOPSIS", f"\\fB{PROG}\\fR [\\fIOPTIONS\\fR...] \\fICOMMAND\\fR [\\fIARGUMENTS\\fR...]",
           ".SH DESCRIPTION", escape(DESCRIPTION),
           ".PP", escape("On a terminal, commands that follow a job show a progress bar (percentage, bytes done "
                         "and total, rate, ETA); when standard output is not a terminal they print a plain line "
                         "per state change and per 10% of progress instead. " + CTRL_C_HELP),
           ".PP", escape("A job id that begins with - (h2kd refuses new ones; a store of an earlier version may "
                         "hold some) is given after --, which ends the options, as in the commands h2kctl suggests "
                         "for one: h2kctl cancel -- -job-1."),
           ".PP", escape("Privileged requests are authorized by polkit. When a request needs a password, "
                         "standard input is a terminal and --no-ask-password was not given, h2kctl starts "
                         "pkttyagent(1) for itself and asks; otherwise it says which polkit action was denied."),
           ".SH COMMANDS"]
    for command in commands:
        _command(command, PROG, out)
    out.append(".SH OPTIONS")
    out.append(escape("These options are accepted before the command, and after any command that takes "
                      "them (--json: the commands whose output is described under JSON OUTPUT)."))
    for option in root.options:
        out += [".TP", _option_head(option), escape(option.help[:1].upper() + option.help[1:]) + "."]
    out.append(".SH EXIT STATUS")
    for code, text in EXIT_CODE_HELP:
        out += [".TP", f"\\fB{int(code)}\\fR", escape(text)]
    out += [".SH JSON OUTPUT", escape(schema.__doc__.split("\n\n", 1)[1].strip())]
    for commands_text, description in schema.DOC:
        out += [".TP", f"\\fB{escape(commands_text)}\\fR", escape(description)]
    out += [".SH ENVIRONMENT",
            ".TP", "\\fB$DBUS_SYSTEM_BUS_ADDRESS\\fR",
            escape("The system bus to use, as for every system bus client (--address overrides it)."),
            ".TP", "\\fB$H2KCTL_PAGER\\fR, \\fB$SYSTEMD_PAGER\\fR, \\fB$PAGER\\fR",
            escape("The pager for long output (default: less with LESS=FRSXMK); the first of them that is set decides, "
                   "and \"cat\" or \"\" turns it off. A pager that cannot be run gives way to less, then more, "
                   "then no pager."),
            ".TP", "\\fB$COLUMNS\\fR, \\fB$LINES\\fR",
            escape("The width and height of the terminal, when set to a positive number: they override what the "
                   "terminal says, for progress bars, watch and the pager."),
            ".TP", "\\fB$H2KCTL_DEBUG\\fR",
            escape("When set (to anything but the empty string), an unexpected error is followed by Python's "
                   "traceback, after its one line; so is a signal from h2kd that h2kctl could not handle, "
                   "which it otherwise ignores."),
            ".SH EXAMPLES",
            ".nf", escape("h2kctl submit --wait -o /var/lib/h2kd/output/web.qcow2 --compress=zstd web.vmdk\n"
                          "h2kctl list --state running,queued\n"
                          "h2kctl inspect --json appliance.ova\n"
                          "h2kctl logs -f job-1\n"
                          "h2kctl queue priority job-1 1"), ".fi",
            ".SH SEE ALSO",
            "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBpkttyagent\\fR(1), \\fBbusctl\\fR(1)"]
    return "\n".join(out) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
