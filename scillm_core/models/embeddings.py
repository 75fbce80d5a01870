"""Provider-neutral embeddings models (the OpenAI ``/v1/embeddings`` shape).

An :class:`EmbeddingsRequest` travels the same ``route_model`` / ``call_provider`` seam as a chat request, so it has
what that seam's middleware reads: ``model``, ``stream`` (always ``False``) and ``scillm`` (scillm's own fields).
Vectors are kept as the upstream sent them (a list of floats, or an OpenAI base64 string) and converted once, by
the surface, into the encoding the client asked for; core never walks them float by float.
"""

from __future__ import annotations

import array
import base64
import sys
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Union

import attrs
from attrs import field, frozen

from scillm_core.models.chat import token_count

__all__ = ["Embedding", "EmbeddingsInput", "EmbeddingsRequest", "EmbeddingsResponse", "EmbeddingsUsage"]

_EMPTY: Mapping[str, Any] = {}
#: A string, a list of strings, a token array or a list of token arrays (the converter checks which, with the path).
EmbeddingsInput = Union[str, list[str], list[int], list[list[int]]]  # noqa: UP007  (one hashable hint to hook)


@frozen(kw_only=True)
class EmbeddingsRequest:
    """One embeddings call. ``input`` is a string, a list of strings, a token array or a list of token arrays
    (checked when it is structured); :attr:`inputs` gives it as a list."""

    stream: ClassVar[bool] = False  # the pipeline's middleware asks every request whether it streams

    model: str
    input: EmbeddingsInput
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None
    extra: Mapping[str, Any] = _EMPTY
    scillm: Mapping[str, Any] = field(default=_EMPTY)

    @property
    def inputs(self) -> list[Any]:
        """The inputs as a list (a single string or token array becomes a list of one)."""
        value = self.input
        if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
            return [value]
        return list(value)

    def texts(self, provider: str) -> list[str]:
        """The inputs as texts, for upstreams that take no token arrays (400 naming the first one)."""
        inputs = self.inputs
        for i, item in enumerate(inputs):
            if not isinstance(item, str):
                from scillm_core import errors

                where = "$.input" if len(inputs) == 1 and not isinstance(self.input[0], list) else f"$.input[{i}]"
                raise errors.InvalidRequest(f"provider {provider} embeds text, not token arrays @ {where}; send the "
                                            f"text itself", param=where)
        return inputs


@frozen(kw_only=True)
class Embedding:
    embedding: Any  # list[float], or a base64 string of little-endian float32 values
    index: int = 0
    object: str = "embedding"
    extra: Mapping[str, Any] = _EMPTY


@frozen(kw_only=True)
class EmbeddingsUsage:
    prompt_tokens: int = field(default=0, converter=token_count)  # (checked as chat's usage is)
    total_tokens: int = field(default=0, converter=token_count)
    extra: Mapping[str, Any] = _EMPTY

    @property
    def completion_tokens(self) -> int:
        """Embeddings produce no output tokens; here so usage reads the same for every response kind."""
        return 0


@frozen(kw_only=True)
class EmbeddingsResponse:
    data: tuple[Embedding, ...]
    model: str
    usage: EmbeddingsUsage | None = None
    object: str = "list"
    extra: Mapping[str, Any] = _EMPTY

    def encoded(self, encoding_format: str) -> EmbeddingsResponse:
        """The vectors as ``"float"`` lists or OpenAI ``"base64"`` strings (little-endian float32), whichever the
        upstream sent; ``ValueError`` when a vector is neither a list of numbers nor valid base64."""
        want_base64 = encoding_format == "base64"
        if all(isinstance(item.embedding, str) == want_base64 for item in self.data):
            return self
        data = tuple(attrs.evolve(item, embedding=to_base64(item.embedding) if want_base64 else
                                  from_base64(item.embedding)) for item in self.data)
        return attrs.evolve(self, data=data)


def to_base64(vector: Any) -> str:
    if isinstance(vector, str):
        return vector
    try:
        values = array.array("f", vector)
    except TypeError as exc:
        raise ValueError(f"an embedding is not a list of numbers ({exc})") from None
    if sys.byteorder == "big":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode()


def from_base64(vector: Any) -> list[float]:
    if not isinstance(vector, str):
        if not isinstance(vector, list):
            raise ValueError(f"an embedding is a {type(vector).__name__}, not a list of numbers")
        return vector
    try:
        raw = base64.b64decode(vector, validate=True)
    except ValueError:
        raise ValueError("an embedding is neither a list of numbers nor base64") from None
    if len(raw) % 4:
        raise ValueError("a base64 embedding is not a whole number of float32 values")
    values = array.array("f", raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()
