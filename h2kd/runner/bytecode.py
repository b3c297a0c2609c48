"""Byte-compiles the modules the worker imports, ahead of time, as installing the package would.

Every attempt starts a fresh Python in its unit, and its unit cannot write next to the sources
(ProtectSystem=strict). Run from a checkout, or from any install that shipped no .pyc files, each worker
would compile the same modules from source again at every start (tens of milliseconds per job). h2kd
writes the missing or stale .pyc files once, in their usual __pycache__ places, where the workers find
them; where it cannot write (a read-only install, which has its .pyc files already), nothing happens.
"""

from __future__ import annotations

import logging
import py_compile
import sys
from pathlib import Path

import h2kd

log = logging.getLogger(__name__)

# What a worker imports (h2kd.worker.main, its operations and, for a spec it must check itself, the models).
WORKER_PACKAGES = ("worker", "operations", "model")
WORKER_MODULES = ("__init__.py", "errors.py", "access.py", "observability/__init__.py", "observability/wire.py")


def worker_sources(root: Path | None = None) -> list[Path]:
    root = root or Path(h2kd.__file__).resolve().parent
    sources = [root / name for name in WORKER_MODULES]
    for package in WORKER_PACKAGES:
        sources += sorted((root / package).rglob("*.py"))
    return [s for s in sources if s.is_file()]


def compiled_path(source: Path) -> Path:
    """Where Python looks for the .pyc of `source` when no pycache prefix is set (as in the units)."""
    return source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}.pyc"


def compile_worker_modules(root: Path | None = None) -> int:
    """Write the .pyc of every worker module whose .pyc is missing or older than its source; how many."""
    if sys.implementation.cache_tag is None:
        return 0
    written = 0
    for source in worker_sources(root):
        target = compiled_path(source)
        try:
            if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
                continue
            py_compile.compile(str(source), cfile=str(target), doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
            written += 1
        except (OSError, py_compile.PyCompileError) as exc:
            if isinstance(exc, OSError) and exc.errno in (30, 13, 1):   # EROFS, EACCES, EPERM: a read-only install
                return written
            log.debug("could not byte-compile %s: %s", source, exc)
    return written

