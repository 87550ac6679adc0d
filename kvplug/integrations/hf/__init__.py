"""HF transformers integration: any kvplug method on a transformers 5.x model (prefill and decode).

``KVPress(model, method)`` is a context manager; ``press.new_cache()`` the cache to pass as ``past_key_values``.
Needs the ``[bench]`` extra (transformers).
"""

from kvplug.integrations.hf.cache import PrunedLayer, layer_types, make_cache
from kvplug.integrations.hf.press import KVPress, rope_of

__all__ = ["KVPress", "PrunedLayer", "layer_types", "make_cache", "rope_of"]
