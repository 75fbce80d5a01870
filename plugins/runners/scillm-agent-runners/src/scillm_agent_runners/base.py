"""What every CLI runner shares: locating the pinned binaries, a throwaway HOME, the child environment."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from attrs import frozen
from scillm_exec import CliOutcome, base_child_env, exec_config

from scillm_core import Runtime, errors
from scillm_core.sessions import SessionContext, SessionResult, SessionSpec
from scillm_core.upstream import SHAPE_ERRORS, excerpt

__all__ = ["AgentRunnersConfig", "REPO_TOOLS", "bin_dir", "cli_path", "cli_version", "outcome_result",
           "read_outcome", "runner_config", "temp_home"]

# <repo>/tools/agent-clis/node_modules/.bin: the pinned install (scripts/install-agent-clis)
REPO_TOOLS = Path(__file__).resolve().parents[5] / "tools" / "agent-clis"


@frozen(kw_only=True)
class AgentRunnersConfig:
    #: Where the CLI binaries are; default ``SCILLM_AGENT_CLIS_BIN``, else ``tools/agent-clis/node_modules/.bin``
    #: of this checkout, else the server's PATH.
    bin_dir: str | None = None
    #: The scillm model a run uses when the request names none.
    default_model: str | None = None


def runner_config(runtime: Runtime) -> AgentRunnersConfig:
    try:
        return runtime.config.section("agent_runners")  # type: ignore[no-any-return]
    except KeyError:
        return AgentRunnersConfig()


def bin_dir(runtime: Runtime) -> Path | None:
    configured = runner_config(runtime).bin_dir or runtime.env.get("SCILLM_AGENT_CLIS_BIN")
    if configured:
        return Path(configured)
    default = REPO_TOOLS / "node_modules" / ".bin"
    return default if default.is_dir() else None


def cli_path(runtime: Runtime, name: str) -> str | None:
    directory = bin_dir(runtime)
    if directory is not None:
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def cli_version(path: str) -> str | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20,
                             env={"PATH": child_path(Path(path).parent), "HOME": tempfile.gettempdir(),
                                  "NO_COLOR": "1", "DISABLE_AUTOUPDATER": "1", "PI_OFFLINE": "1"},
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[-1] if out.returncode == 0 and text else None


def child_path(cli_dir: Path | None) -> str:
    parts = [str(cli_dir)] if cli_dir else []
    node = shutil.which("node")
    if node:
        parts.append(str(Path(node).parent))
    rg = shutil.which("rg")
    if rg:
        parts.append(str(Path(rg).parent))
    parts += ["/usr/local/bin", "/usr/bin", "/bin"]
    return ":".join(dict.fromkeys(parts))


@contextlib.contextmanager
def temp_home(run_id: str) -> Iterator[Path]:
    """A private HOME for one run (mode 0700), removed afterwards: config, sessions and caches die with it."""
    home = Path(tempfile.mkdtemp(prefix=f"scillm-{run_id[-8:]}-"))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def child_env(cli: str, home: Path, extra: Mapping[str, str]) -> dict[str, str]:
    return base_child_env(str(home), path=child_path(Path(cli).parent), extra=extra)


def require(spec: SessionSpec, ctx: SessionContext, name: str) -> tuple[str, str]:
    """The CLI binary and the model; a failed-run error (not a crash) when either is missing."""
    cli = cli_path(ctx.runtime, name)
    if cli is None:
        raise errors.InvalidRequest(f"profile {spec.profile!r} needs the {name!r} CLI, which is not installed "
                                    "(scripts/install-agent-clis; see `scillm doctor`)", param="$.profile")
    model = spec.model or runner_config(ctx.runtime).default_model
    if not model:
        raise errors.InvalidRequest(f"profile {spec.profile!r} needs a model (set model, or "
                                    "agent_runners.default_model)", param="$.model")
    if not ctx.base_url or not ctx.api_key:
        raise errors.InvalidRequest("this run has no scillm endpoint for the CLI to call", param="$")
    if not spec.cwd:
        raise errors.InvalidRequest(f"profile {spec.profile!r} needs cwd", param="$.cwd")
    return cli, model


def kill_grace(ctx: SessionContext) -> float:
    return exec_config(ctx.runtime).kill_grace_s


def outcome_result(ctx: SessionContext, outcome: CliOutcome, final_text: str, *, failed: str | None = None,
                   result: Any = None) -> SessionResult:
    status, error = outcome.status, outcome.error
    if status == "completed" and failed:
        status, error = "failed", failed
    if status == "failed" and not error:
        error = "the CLI failed"
    if status == "failed" and outcome.stderr_tail.strip():
        error = f"{error}: {outcome.stderr_tail.strip().splitlines()[-1][:500]}"
    return SessionResult(run_id=ctx.run_id, status=status, exit_code=outcome.exit_code,  # type: ignore[arg-type]
                         final_text=final_text, result=result, error=error)


def read_outcome(ctx: SessionContext, outcome: CliOutcome, name: str,
                 read: Callable[[list[dict[str, Any]]], tuple[str, str | None]]) -> SessionResult:
    """The run's result from the CLI's events as ``read`` finds them: its final text, and why the run failed if it
    did. Events of the wrong shape (a number where an object belongs: a CLI's bug, or a program that is not the CLI
    it is named after) fail the run saying so, as the CLI's fault (``scillm_core.upstream.SHAPE_ERRORS``)."""
    try:
        text, failure = read(outcome.events)
    except SHAPE_ERRORS as exc:
        text, failure = "", f"{name}'s output is not in its format ({type(exc).__name__}: {excerpt(str(exc), 200)})"
    return outcome_result(ctx, outcome, text, failed=failure)
