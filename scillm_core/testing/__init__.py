"""The plugin test harness, shipped in core and opt-in for plugin authors.

- :func:`make_app`: an isolated app (fresh plugin manager, only the environment you pass, a temp data dir);
- :class:`ServerThread`: serve it on a real loopback port so official SDK clients can talk to it;
- :class:`FakeOpenAI` (and the :class:`FakeUpstream` base): scripted upstreams speaking the real wire format;
- :class:`Reply`: provider-neutral scripted answers (text, tool calls, errors, stream shapes, faults);
- :class:`HookRecorder`: a plugin that records pipeline hook calls;
- :class:`SilentListener`: a loopback port that accepts and never answers (for "never fetched" tests);
- :class:`ProviderContract`: the test class every provider plugin runs (``scillm_core.testing.contract``);
- ``fake_cli.py`` (next to this file): a scripted stand-in for an agent CLI, for ``run_session`` runner tests
  (:func:`install_fake_cli` puts it in a bin dir under a real CLI's name);
- :mod:`scillm_core.testing.files`: PDFs and ZIPs built in memory, valid and hostile (content-stream bomb,
  overlapping entries).

Enable the fixtures with ``pytest_plugins = ["scillm_core.testing.pytest_plugin"]``.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scillm_core.testing.fakes import FakeOpenAI, FakeUpstream, RecordedRequest
from scillm_core.testing.listener import SilentListener
from scillm_core.testing.recorder import HookRecorder
from scillm_core.testing.replies import Reply, ToolCallSpec, fake_vector
from scillm_core.testing.server import ServerThread, free_port

__all__ = ["DEV_KEY", "FakeOpenAI", "FakeUpstream", "HookRecorder", "RecordedRequest", "Reply", "ServerThread",
           "SilentListener", "ToolCallSpec", "fake_vector", "free_port", "install_fake_cli", "make_app"]

DEV_KEY = "sk-dev-proxy-123"


def install_fake_cli(bin_dir: Path, name: str = "claude") -> Path:
    """``fake_cli.py`` as an executable ``bin_dir/name`` (run by this interpreter), so a runner that starts the real
    CLI by that name (``agent_runners.bin_dir``) drives the fake; the executable's path."""
    shim = bin_dir / name
    shim.write_text(f"#!{sys.executable}\n" + Path(__file__).with_name("fake_cli.py").read_text())
    shim.chmod(0o755)
    return shim


def make_app(*, env: Mapping[str, str] | None = None, config: Mapping[str, Any] | None = None,
             plugins: Sequence[tuple[str, object]] = (), entry_points: bool = True,
             data_dir: str | Path | None = None, only: Sequence[str] | None = None) -> Any:
    """An app that sees only ``env`` (not the process environment) and ``config`` tables; ``only`` limits the
    installed plugins loaded to those entry-point names."""
    from scillm_core.app import create_app
    from scillm_core.config import Config, Env

    values = dict(env or {})
    values.setdefault("SCILLM_DATA_DIR", str(data_dir or tempfile.mkdtemp(prefix="scillm-test-")))
    cfg = Config(tables=dict(config or {}), env=Env(values), data_dir=Path(values["SCILLM_DATA_DIR"]))
    return create_app(cfg, plugins=plugins, entry_points=entry_points, only=only)
