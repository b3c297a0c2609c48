"""The argparse definition of h2kctl as a plain tree of commands and options, for generators
(man page, shell completions) so that they never drift from --help."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field


@dataclass
class Option:
    flags: list[str]            # e.g. ["-o", "--output"]; empty for a positional
    metavar: str | None         # None for a flag that takes no value
    help: str
    choices: list[str] | None = None
    optional_value: bool = False  # e.g. --compress[=TYPE]
    repeat: bool = False          # positional taking one or more values
    omissible: bool = False       # positional that may be left out (JOB or JOB...)
    repeatable: bool = False      # option that may be given again, each value adding to the others (--tag)

    @property
    def takes_value(self) -> bool:
        return self.metavar is not None


@dataclass
class Command:
    name: str
    help: str
    options: list[Option] = field(default_factory=list)      # own options (without -h)
    positionals: list[Option] = field(default_factory=list)
    subcommands: list["Command"] = field(default_factory=list)


def _option(action: argparse.Action) -> Option:
    takes_value = action.nargs != 0
    metavar = action.metavar or (action.dest.upper() if takes_value else None)
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    choices = [str(c) for c in action.choices] if action.choices else None
    if choices and not action.metavar and takes_value:
        metavar = "{" + ",".join(choices) + "}"
    return Option(list(action.option_strings), metavar, (action.help or "").replace("%%", "%"), choices,
                  optional_value=action.nargs == "?", repeat=action.nargs in ("+", "*"),
                  omissible=action.nargs in ("?", "*"), repeatable=isinstance(action, argparse._AppendAction))


def walk(parser: argparse.ArgumentParser, name: str, help_text: str = "",
         skip: frozenset[str] = frozenset()) -> Command:
    """The tree of `parser`; options whose dest is in `skip` (shared global options) are left out."""
    command = Command(name, help_text or parser.description or "")
    helps: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for sub_name, sub_parser in action.choices.items():
                command.subcommands.append(walk(sub_parser, sub_name, helps.get(sub_name, ""), skip))
        elif isinstance(action, (argparse._HelpAction, argparse._VersionAction)) and name != "h2kctl":
            continue
        elif action.dest in skip:
            continue
        elif action.option_strings:
            command.options.append(_option(action))
        else:
            command.positionals.append(_option(action))
    return command


def global_dests(parser: argparse.ArgumentParser) -> frozenset[str]:
    """The dests of the options every command shares (defined on the top-level parser)."""
    return frozenset(a.dest for a in parser._actions
                     if a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._VersionAction)))
