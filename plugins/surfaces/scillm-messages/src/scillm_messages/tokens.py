"""An honest *approximation* of input tokens for ``POST /v1/messages/count_tokens``.

scillm routes to many model families with different tokenizers and most upstreams have no count endpoint, so
this does not call any upstream. The estimate is:

* text (system, messages, tool results, tool-call arguments, tool definitions as JSON): ``ceil(chars / 4)``
  — the common rule of thumb for English prose and code with BPE tokenizers; CJK text is undercounted;
* each image: 1,600 tokens (Anthropic's figure for a ~1.15 megapixel image, the largest size it uses unscaled);
* each PDF document: 1,500 tokens per page (pages counted from the PDF's ``/Type /Page`` objects, at least 1);
* 4 tokens of overhead per message.

Clients use the number for context budgeting (Claude Code compacts near its limit), where a rough but
stable estimate is what matters. The same estimate fills ``input_tokens`` in ``message_start`` until the
upstream's real count arrives in ``message_delta``.
"""

from __future__ import annotations

import base64
import binascii
import math
import re

import orjson

from scillm_core import ChatRequest, FilePart, ImagePart, OtherPart, TextPart

__all__ = ["IMAGE_TOKENS", "PDF_PAGE_TOKENS", "estimate_input_tokens"]

IMAGE_TOKENS = 1600
PDF_PAGE_TOKENS = 1500
MESSAGE_OVERHEAD = 4
_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")


def _text_tokens(chars: int) -> int:
    return math.ceil(chars / 4)


def _pdf_pages(data_url: str) -> int:
    _, _, payload = data_url.partition(",")
    try:
        raw = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        return 1
    return max(1, len(_PAGE.findall(raw)))


def estimate_input_tokens(request: ChatRequest) -> int:
    total = 0
    for message in request.messages:
        total += MESSAGE_OVERHEAD
        content = message.content
        if isinstance(content, str):
            total += _text_tokens(len(content))
        elif content:
            for part in content:
                if isinstance(part, TextPart):
                    total += _text_tokens(len(part.text))
                elif isinstance(part, ImagePart):
                    total += IMAGE_TOKENS
                elif isinstance(part, FilePart):
                    total += PDF_PAGE_TOKENS * _pdf_pages(part.file.file_data or "")
                elif isinstance(part, OtherPart):
                    total += _text_tokens(len(orjson.dumps(dict(part.data))))
        for call in message.tool_calls or ():
            total += _text_tokens(len(call.function.name) + len(call.function.arguments))
    for tool in request.tools or ():
        fn = tool.function
        total += _text_tokens(len(fn.name) + len(fn.description or "") + len(orjson.dumps(dict(fn.parameters or {}))))
    return total
