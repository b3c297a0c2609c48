"""`python -m h2kctl.completion bash|zsh`: print a completion script (`--write` refreshes the kept copies)."""

from __future__ import annotations

import sys
from pathlib import Path

from h2kctl.completion import FILES, RENDERERS


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        here = Path(__file__).parent
        for shell, render in RENDERERS.items():
            (here / FILES[shell]).write_text(render())
        return 0
    if len(argv) != 1 or argv[0] not in RENDERERS:
        print(f"usage: python -m h2kctl.completion {{{'|'.join(RENDERERS)}}} | --write", file=sys.stderr)
        return 2
    sys.stdout.write(RENDERERS[argv[0]]())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
