"""KV quantizers (each registers itself by name); they return dequantized K/V and the true stored bytes."""

from kvplug.methods.quant.kivi import KIVI
from kvplug.methods.quant.kvquant import KVQuant
from kvplug.methods.quant.pertoken import Fp8, Int8

__all__ = ["KIVI", "Fp8", "Int8", "KVQuant"]
