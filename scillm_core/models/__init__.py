"""Core models: chat (requests, responses, stream chunks) and sessions (agent runs)."""

from scillm_core.models.chat import *  # noqa: F403
from scillm_core.models.chat import __all__ as _chat_all

__all__ = list(_chat_all)
