"""The curated public API and the documentation of every hook."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import scillm_core
from scillm_core import hookspecs

ROOT = Path(__file__).resolve().parents[1]


# The API third-party plugins build on: changing this list is a breaking change and must be deliberate.
PUBLIC_API = [
    'CallContext',
    'ChatChunk',
    'ChatRequest',
    'ChatResponse',
    'ChatResult',
    'Choice',
    'ChunkChoice',
    'CommandRegistry',
    'Config',
    'ConfigError',
    'Delta',
    'Embedding',
    'EmbeddingsRequest',
    'EmbeddingsResponse',
    'EmbeddingsUsage',
    'Env',
    'FileData',
    'FilePart',
    'FunctionCall',
    'FunctionCallDelta',
    'FunctionDef',
    'Identity',
    'ImagePart',
    'ImageUrl',
    'Job',
    'MASTER',
    'Message',
    'MiddlewareRegistry',
    'NativeRequest',
    'OpeningStream',
    'OtherPart',
    'PluginLoadError',
    'Provider',
    'ProviderRegistry',
    'Route',
    'Runtime',
    'SessionContext',
    'SessionResult',
    'SessionSpec',
    'SurfaceRegistry',
    'TextPart',
    'Timeouts',
    'Tool',
    'ToolCall',
    'ToolCallDelta',
    'Usage',
    '__version__',
    'call_context',
    'caller_of',
    'create_app',
    'error_response',
    'hookimpl',
    'hookspec',
    'identity_of',
    'job_of',
    'json_response',
    'load_config',
    'max_cost_of',
    'open_stream',
    'ops_response',
    'parse_json',
    'read_body',
    'read_json',
    'request_id_of',
    'require_visible',
    'run_chat',
    'run_embeddings',
    'runtime_of',
    'send_error',
    'served_headers',
    'session_of',
    'sse_data',
    'sse_error',
    'structure',
    'then',
    'unstructure',
    'with_native',
]


def test_exported_members_are_exactly_the_public_api():
    assert sorted(scillm_core.__all__) == PUBLIC_API
    for name in PUBLIC_API:
        assert hasattr(scillm_core, name), name


def hook_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, "scillm_spec")]


def test_every_hook_has_a_documented_heading():
    doc = (ROOT / "docs" / "hooks.md").read_text()
    headings = set(re.findall(r"^## `?([a-z_]+)`?", doc, flags=re.M))
    assert hook_names(), "no hook specs found"
    missing = [name for name in hook_names() if name not in headings]
    assert not missing, f"hooks without a heading in docs/hooks.md: {missing}"
    stale = headings - set(hook_names())
    assert not stale, f"docs/hooks.md documents hooks that do not exist: {stale}"


def test_every_hook_spec_has_a_docstring():
    for name in hook_names():
        assert (getattr(hookspecs, name).__doc__ or "").strip(), name
