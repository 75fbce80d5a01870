"""Skills for a session: names checked, copied from the skill roots into the managed server's global skills
directory (where OpenCode discovers them; a repository's own config is not read), and allowed for that session
only through its permission rules (``skill: deny`` for everything else), so one run never sees another's."""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scillm_core import errors

__all__ = ["MAX_SKILL_BYTES", "SKILL_NAME", "check_skill_names", "materialise", "skill_rules"]

SKILL_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")  # OpenCode's own rule (and the directory name)
MAX_SKILL_BYTES = 8 << 20
MAX_SKILL_FILES = 500
_LOCK = threading.Lock()                # materialise runs in worker threads; one copy at a time
_STAMPS: dict[Path, tuple[Any, ...]] = {}  # dest -> what its source looked like when copied (skip unchanged)


def check_skill_names(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise errors.InvalidRequest(f"skills must be an array of skill names @ {where}", param=where)
    names: list[str] = []
    for i, name in enumerate(value):
        if not isinstance(name, str) or len(name) > 64 or not SKILL_NAME.match(name):
            raise errors.InvalidRequest(f"skill name {name!r} must match {SKILL_NAME.pattern} (at most 64 characters)"
                                        f" @ {where}[{i}]", param=f"{where}[{i}]")
        if name not in names:
            names.append(name)
    return names


def _find(name: str, roots: Sequence[Path]) -> Path | None:
    for root in roots:
        candidate = root / name
        if (candidate / "SKILL.md").is_file() and not candidate.is_symlink():
            return candidate
    return None


def _stamp(source: Path) -> tuple[Any, ...]:
    out = []
    for dirpath, _, filenames in os.walk(source, followlinks=False):
        for filename in sorted(filenames):
            st = (Path(dirpath) / filename).lstat()
            out.append((dirpath, filename, st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


def _copy(source: Path, dest: Path) -> None:
    """Copy regular files only (symlinks are skipped, so a skill cannot pull in files from elsewhere), bounded in
    size and count, then swap the copy into place atomically."""
    total = files = 0
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}"
    try:
        for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
            rel = Path(dirpath).relative_to(source)
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
            for filename in filenames:
                path = Path(dirpath) / filename
                if path.is_symlink() or not path.is_file():
                    continue
                total += path.stat().st_size
                files += 1
                if total > MAX_SKILL_BYTES or files > MAX_SKILL_FILES:
                    raise OSError(f"skill {source.name} exceeds {MAX_SKILL_BYTES} bytes or {MAX_SKILL_FILES} files")
                shutil.copyfile(path, tmp / rel / filename)
        old = dest.parent / f".{dest.name}.old.{uuid.uuid4().hex[:8]}"
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def materialise(names: Sequence[str], roots: Sequence[Path], target: Path | None,
                available: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """Copy each named skill found under ``roots`` into ``target``; ``(materialised, {missing: reason})``.
    With no ``target`` (an external server) a skill counts only if the server already has it (``available``).
    Blocking file work: call it in a worker thread."""
    done: list[str] = []
    missing: dict[str, str] = {}
    for name in names:
        if target is None:
            if name in available:
                done.append(name)
            else:
                missing[name] = "not on the OpenCode server"
            continue
        source = _find(name, roots)
        if source is None:
            missing[name] = "not found in the skill roots (" + ", ".join(map(str, roots)) + ")"
            continue
        try:
            with _LOCK:
                stamp = _stamp(source)
                dest = target / name
                if not (dest.is_dir() and _STAMPS.get(dest) == stamp):
                    target.mkdir(parents=True, exist_ok=True)
                    _copy(source, dest)
                    _STAMPS[dest] = stamp
        except OSError as exc:
            missing[name] = f"could not be copied: {exc}"
            continue
        done.append(name)
    return done, missing


def skill_rules(allowed: Sequence[str]) -> list[dict[str, str]]:
    """Session permission rules: the allowed skills, nothing else (the later rule wins in OpenCode)."""
    return [{"permission": "skill", "pattern": "*", "action": "deny"},
            *({"permission": "skill", "pattern": name, "action": "allow"} for name in allowed)]
