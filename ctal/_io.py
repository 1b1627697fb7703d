"""Atomic file writes: a kill, a crash or a full disk never leaves a truncated file under the
real name (the old file stays until the new one is complete)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, IO

# ".<name>.<pid>.tmp": the temp file of an atomic write of <name> by process <pid>
TEMP_RE = re.compile(r"^\.(.+)\.([0-9]+)\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_files(path: str | Path) -> list[Path]:
    """Temp files that atomic writes of ``path`` left behind (a writer killed mid-write)."""
    path = Path(path)
    return sorted(p for p in path.parent.glob(f".{path.name}.*.tmp") if TEMP_RE.match(p.name))


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], durable: bool = False) -> Path:
    """Create ``path`` by ``write(binary file)`` on a temp file in the same folder, then
    ``os.replace`` it into place. ``durable`` also fsyncs the data before the rename (survives a
    power cut, costs a disk flush). The file gets the permissions the umask gives any new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return path


def write_json(path: str | Path, obj: Any, **dumps) -> Path:
    """``json.dumps(obj, indent=2, **dumps)`` written atomically to ``path``."""
    text = json.dumps(obj, indent=2, **dumps) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))
