"""Rotary position embedding spec, so a method can undo RoPE on cached keys (KVQuant's pre-RoPE keys)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Rope:
    """RoPE as HF transformers applies it: ``x * cos + rotate(x) * sin`` with ``cos, sin`` of
    ``positions * inv_freq`` times ``attention_scaling``. ``interleaved`` False = rotate-half (Llama, Qwen,
    Gemma); True = GPT-J pairs ``(2i, 2i+1)``. A shorter ``inv_freq`` (partial rotary) rotates the first
    ``2 * len(inv_freq)`` channels only. From HF: ``Rope(model.model.rotary_emb.inv_freq,
    model.model.rotary_emb.attention_scaling)``."""

    inv_freq: Tensor  # [R/2]
    attention_scaling: float = 1.0
    interleaved: bool = False

    def _cos_sin(self, positions: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        ang = positions.to(device=device, dtype=torch.float32).unsqueeze(-1) * self.inv_freq.to(device).float()
        if self.interleaved:
            ang = ang.repeat_interleave(2, dim=-1)
        else:
            ang = torch.cat([ang, ang], dim=-1)
        return ang.cos(), ang.sin()

    def _rotate(self, x: Tensor) -> Tensor:
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack([-x2, x1], dim=-1).flatten(-2)
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    def apply(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x [..., N, D]`` (float32 out) at ``positions`` (``[N]`` or ``[..., N]``)."""
        return self._turn(x, positions, inverse=False)

    def mean_rotation(self, positions: Tensor, head_dim: int) -> Tensor:
        """``[D, D]`` matrix ``M`` with ``M @ x`` = the mean over ``positions`` of ``x`` rotated to each (float32;
        channels past the rotary part pass through). Rotation is linear in ``cos`` and ``sin``, so ``M`` uses
        their means: ``x * mean(cos) + rotate(x) * mean(sin)``."""
        r = 2 * self.inv_freq.numel()
        cos, sin = self._cos_sin(positions.reshape(-1), self.inv_freq.device)
        mc, ms = cos.mean(0) * self.attention_scaling, sin.mean(0) * self.attention_scaling
        eye = torch.eye(head_dim, dtype=torch.float32)
        rows = eye.clone()  # row i = M e_i
        rows[:, :r] = eye[:, :r] * mc + self._rotate(eye[:, :r]) * ms
        return rows.transpose(0, 1)

    def invert(self, x: Tensor, positions: Tensor) -> Tensor:
        """Undo :meth:`apply` (float32 out)."""
        return self._turn(x, positions, inverse=True)

    def _turn(self, x: Tensor, positions: Tensor, inverse: bool) -> Tensor:
        x = x.float()
        r = 2 * self.inv_freq.numel()
        rot, rest = x[..., :r], x[..., r:]
        cos, sin = self._cos_sin(positions, x.device)
        if inverse:
            out = (rot * cos - self._rotate(rot) * sin) / self.attention_scaling
        else:
            out = (rot * cos + self._rotate(rot) * sin) * self.attention_scaling
        return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def default_inv_freq(head_dim: int, theta: float = 10000.0) -> Tensor:
    """``1 / theta ** (arange(0, D, 2) / D)``: the plain RoPE frequencies."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
