"""Core's own hook implementations: config sections, routing, dispatch and the pipeline defaults."""

from scillm_core.builtin import core as core_plugin

__all__ = ["core_plugin"]
