"""Core models: chat (requests, responses, stream chunks) and embeddings."""

from scillm_core.models.chat import *  # noqa: F403
from scillm_core.models.chat import __all__ as _chat_all
from scillm_core.models.embeddings import *  # noqa: F403
from scillm_core.models.embeddings import __all__ as _embeddings_all

__all__ = [*_chat_all, *_embeddings_all]
