"""kvplug: KV-cache stores, codecs and techniques for vLLM and SGLang, installed as a plugin."""

from kvplug._version import __version__

__all__ = ["__version__"]
