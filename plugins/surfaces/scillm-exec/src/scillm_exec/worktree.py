"""Isolated git worktrees for agent runs: the agent edits a detached checkout under the run directory, so the
caller's working tree, index and branches are never touched; the evidence is a diff against the base commit.

Every git call is an argv list run as an asyncio subprocess (never on the event loop), with the repository's
hooks disabled (a worktree checkout would otherwise run a hostile repo's ``post-checkout``) and no prompts.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from attrs import frozen

from scillm_core import errors

__all__ = ["GitError", "Worktree", "create_worktree", "git", "remove_worktree", "reset_worktree", "worktree_diff"]

_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
_SAFE = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "safe.directory=*")


class GitError(errors.InvalidRequest):
    """A git command failed; the message says which and why (a 400: the cwd or ref the caller gave is unusable)."""


@frozen
class Worktree:
    #: the detached checkout the agent works in
    path: Path
    #: where the session runs inside it (``path`` plus the caller's ``cwd`` relative to its repository root)
    workdir: Path
    #: the caller's repository root (the worktree's metadata lives in its ``.git/worktrees``)
    repo: Path
    #: the commit the worktree started from; diffs are taken against it
    base: str


async def git(*args: str, cwd: Path, stdin: bytes | None = None, limit: int = 64 << 20) -> str:
    """Run ``git args`` in ``cwd``; its stdout (at most ``limit`` bytes, else :class:`GitError`). A command that
    found the index locked (an agent's own git call holds it for a moment) is tried again a few times."""
    for attempt in range(6):
        try:
            return await _git(*args, cwd=cwd, stdin=stdin, limit=limit)
        except GitError as exc:
            if "index.lock" not in str(exc) or attempt == 5:
                raise
            await asyncio.sleep(0.1 * 2 ** attempt)
    raise AssertionError("unreachable")


async def _git(*args: str, cwd: Path, stdin: bytes | None, limit: int) -> str:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"), **_GIT_ENV}
    try:
        proc = await asyncio.create_subprocess_exec(
            "git", *_SAFE, *args, cwd=str(cwd), env=env, stdin=asyncio.subprocess.PIPE if stdin is not None else
            asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except (FileNotFoundError, NotADirectoryError):
        raise GitError(f"git {args[0]}: {cwd} is not a directory (any more)") from None
    try:
        out, err = await proc.communicate(stdin)
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
        raise
    if proc.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        reason = next((line for line in lines if line.startswith(("fatal:", "error:"))), lines[-1] if lines else "")
        raise GitError(f"git {args[0]} failed in {cwd}: {reason or f'exit {proc.returncode}'}")
    if len(out) > limit:
        raise GitError(f"git {args[0]} output exceeds {limit} bytes")
    return out.decode("utf-8", "replace")


async def create_worktree(source: Path, dest: Path, *, ref: str = "HEAD") -> Worktree:
    """A detached worktree of the repository holding ``source`` at ``ref``, created at ``dest``.

    ``source`` may be a subdirectory of its repository; :attr:`Worktree.workdir` is the same subdirectory inside
    the worktree. Uncommitted changes in the caller's tree are not carried over (the agent sees ``ref``)."""
    if ref.startswith("-"):
        raise GitError(f"ref {ref!r} must not start with '-'")
    try:
        top = Path((await git("rev-parse", "--show-toplevel", cwd=source)).strip())
    except GitError:
        raise GitError(f"{source} is not inside a git repository (agent runs work in a git worktree of it)") from None
    base = (await git("rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}", cwd=top)).strip()
    dest.parent.mkdir(parents=True, exist_ok=True)
    await git("worktree", "add", "--detach", "--quiet", str(dest), base, cwd=top)
    relative = source.resolve().relative_to(top.resolve())
    return Worktree(path=dest, workdir=dest / relative, repo=top, base=base)


async def worktree_diff(worktree: Worktree) -> tuple[str, list[str]]:
    """The worktree's changes against its base commit, untracked files and the agent's own commits included:
    ``(binary patch, changed paths)``. Stages everything in the worktree's own index (the caller's is separate)."""
    await git("add", "--all", cwd=worktree.path)
    patch = await git("diff", "--cached", "--binary", "--no-color", "--no-ext-diff", worktree.base, cwd=worktree.path)
    names = await git("diff", "--cached", "--name-only", "-z", "--no-renames", worktree.base, cwd=worktree.path)
    return patch, [name for name in names.split("\0") if name]


async def reset_worktree(worktree: Worktree) -> None:
    """Put the checkout back to its base commit: changes, untracked and ignored files all go."""
    await git("reset", "--hard", "--quiet", worktree.base, cwd=worktree.path)
    await git("clean", "-fdxq", cwd=worktree.path)


async def remove_worktree(worktree: Worktree) -> None:
    """Remove the checkout and its metadata in the caller's repository (idempotent)."""
    if worktree.path.exists():
        await git("worktree", "remove", "--force", str(worktree.path), cwd=worktree.repo)
    await git("worktree", "prune", cwd=worktree.repo)
