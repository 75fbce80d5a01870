"""scillm core: hook specs, plugin manager, models, errors, config, pipeline, app factory and state store.

Plugins import what they need from here; the names below are the public API (a test pins the list).
"""

from scillm_core.app import create_app
from scillm_core.config import Config, ConfigError, Env, load_config
from scillm_core.context import CallContext, Runtime
from scillm_core.hookspecs import hookimpl, hookspec
from scillm_core.identity import MASTER, Identity, Job, identity_of, job_of, max_cost_of, require_visible
from scillm_core.models import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Choice,
    ChunkChoice,
    Delta,
    Embedding,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
    FileData,
    FilePart,
    FunctionCall,
    FunctionCallDelta,
    FunctionDef,
    ImagePart,
    ImageUrl,
    Message,
    OtherPart,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from scillm_core.models.convert import structure, unstructure
from scillm_core.models.native import NativeRequest, with_native
from scillm_core.pipeline import ChatResult, OpeningStream, open_stream, run_chat, run_embeddings, then
from scillm_core.plugins import PluginLoadError
from scillm_core.registry import CommandRegistry, MiddlewareRegistry, Provider, ProviderRegistry, Route, SurfaceRegistry
from scillm_core.sessions import SessionContext, SessionResult, SessionSpec
from scillm_core.timeouts import Timeouts
from scillm_core.version import __version__
from scillm_core.web import (
    call_context,
    caller_of,
    error_response,
    json_response,
    ops_response,
    parse_json,
    read_body,
    read_json,
    request_id_of,
    runtime_of,
    send_error,
    served_headers,
    session_of,
    sse_data,
    sse_error,
)

__all__ = [
    "CallContext", "ChatChunk", "ChatRequest", "ChatResponse", "ChatResult", "Choice", "ChunkChoice",
    "CommandRegistry", "Config", "ConfigError", "Delta", "Embedding", "EmbeddingsRequest", "EmbeddingsResponse",
    "EmbeddingsUsage", "Env", "FileData", "FilePart", "FunctionCall",
    "FunctionCallDelta", "FunctionDef", "ImagePart", "ImageUrl", "Message", "MiddlewareRegistry", "OtherPart",
    "PluginLoadError", "Provider", "ProviderRegistry", "Route", "Runtime", "SessionContext", "SessionResult",
    "SessionSpec", "SurfaceRegistry", "TextPart", "Tool", "ToolCall", "ToolCallDelta", "Usage", "__version__",
    "create_app", "error_response", "hookimpl", "hookspec", "json_response", "load_config", "ops_response", "run_chat",
    "run_embeddings",
    "runtime_of", "send_error", "structure", "then", "unstructure", "OpeningStream",
    "open_stream", "caller_of", "read_json", "request_id_of",
    "sse_data", "sse_error", "NativeRequest", "with_native", "parse_json", "read_body", "served_headers",
    "session_of",
    "Timeouts",
    "Identity", "Job", "MASTER", "identity_of", "job_of", "max_cost_of", "require_visible", "call_context",
]
