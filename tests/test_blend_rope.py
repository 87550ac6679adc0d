"""Re-rotation of stored keys: keys computed at positions p, moved to p + shift, equal the keys the model computes at
p + shift (float32, tight tolerance), for every RoPE schedule kvplug must honour. Tiny random-weight models built
offline from configs (no downloads): the model's own forward is the reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from kvplug.errors import ConfigError
from kvplug.integrations.hf.press import rope_of
from kvplug.methods.blend import delta_rotate, rerotate, rope_for_layer, rope_signature

N, SHIFT = 24, 37


def tiny_llama(rope: dict | None = None, layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_parameters=rope or {"rope_type": "default",
        "rope_theta": 10000.0}, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3(window: int = 8, seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=window, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        attn_implementation="sdpa", query_pre_attn_scalar=32,
    )  # fmt: skip
    return Gemma3ForCausalLM(cfg).eval()


def keys_at(model, ids: torch.Tensor, start: int) -> list[torch.Tensor]:
    """Each layer's post-RoPE keys ``[H, n, D]`` from the model's own forward at positions ``start...``."""
    pos = torch.arange(start, start + ids.numel()).unsqueeze(0)
    with torch.no_grad():
        cache = model(ids.unsqueeze(0), position_ids=pos, use_cache=True).past_key_values
    return [layer.keys[0].float() for layer in cache.layers]


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0},
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rerotated_keys_equal_keys_computed_at_target_positions(kind: str) -> None:
    model = tiny_llama(ROPES[kind])
    ids = torch.randint(0, 96, (N,), generator=torch.Generator().manual_seed(1))
    old, new = keys_at(model, ids, 0), keys_at(model, ids, SHIFT)
    for i in range(len(old)):
        rope = rope_for_layer(model.config, i)
        moved = rerotate(old[i], torch.arange(N), torch.arange(SHIFT, SHIFT + N), rope)
        torch.testing.assert_close(moved, new[i], atol=2e-5, rtol=1e-5)
        assert not torch.allclose(old[i], new[i], atol=1e-3)  # the shift is real: unrotated keys differ
    if kind == "yarn":
        assert rope_for_layer(model.config, 0).attention_scaling != 1.0  # YaRN's scaling is carried through


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rope_for_layer_matches_the_models_rotary_embedding(kind: str) -> None:
    model = tiny_llama(ROPES[kind])
    mine, theirs = rope_for_layer(model.config, 1), rope_of(model)
    assert theirs is not None
    torch.testing.assert_close(mine.inv_freq, theirs.inv_freq)
    assert mine.attention_scaling == pytest.approx(theirs.attention_scaling)


def test_dynamic_ntk_inverts_with_the_old_frequencies() -> None:
    """Dynamic NTK frequencies depend on the sequence length: layer-0 keys (which depend on the token alone) at
    positions past the original length are reproduced by inverting with the old Rope and applying the new one."""
    model = tiny_llama({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    ids = torch.randint(0, 96, (N,), generator=torch.Generator().manual_seed(2))
    start = 150  # past max_position_embeddings=128: the frequencies grow
    old, new = keys_at(model, ids, 0)[0], keys_at(model, ids, start)[0]
    before = rope_for_layer(model.config, 0, seq_len=N)
    after = rope_for_layer(model.config, 0, seq_len=start + N)
    assert not torch.allclose(before.inv_freq, after.inv_freq)
    moved = rerotate(old, torch.arange(N), torch.arange(start, start + N), after, old_rope=before)
    torch.testing.assert_close(moved, new, atol=2e-5, rtol=1e-5)
    wrong = rerotate(old, torch.arange(N), torch.arange(start, start + N), after)  # ignoring the change fails
    assert not torch.allclose(wrong, new, atol=1e-3)


def test_gemma3_local_and_global_layers_use_their_own_theta() -> None:
    model = tiny_gemma3(window=8)
    ids = torch.randint(0, 96, (N,), generator=torch.Generator().manual_seed(3))
    old, new = keys_at(model, ids, 0), keys_at(model, ids, SHIFT)
    thetas = set()
    for i, kind in enumerate(model.config.layer_types):
        rope = rope_for_layer(model.config, i)
        thetas.add(float(rope.inv_freq[1]))
        held = new[i].shape[1]  # sliding layers keep the last window - 1 keys
        moved = rerotate(old[i][:, -held:], torch.arange(N - held, N), torch.arange(SHIFT + N - held, SHIFT + N), rope)
        torch.testing.assert_close(moved, new[i], atol=2e-5, rtol=1e-5)
        other = rope_for_layer(model.config, 1 if kind == "sliding_attention" else 0)
        bad = rerotate(old[i][:, -held:], torch.arange(N - held, N), torch.arange(SHIFT + N - held, SHIFT + N), other)
        assert not torch.allclose(bad, new[i], atol=1e-3)  # the other layer type's theta would be wrong
    assert len(thetas) == 2


def test_delta_rotation_is_the_same_map() -> None:
    model = tiny_llama(ROPES["yarn"])
    ids = torch.randint(0, 96, (N,), generator=torch.Generator().manual_seed(4))
    old, new = keys_at(model, ids, 0)[0], keys_at(model, ids, SHIFT)[0]
    rope = rope_for_layer(model.config, 0)
    torch.testing.assert_close(delta_rotate(old, SHIFT, rope), new, atol=1e-4, rtol=1e-4)


def test_bad_inputs_are_named() -> None:
    rope = rope_for_layer(tiny_llama().config, 0)
    with pytest.raises(ValueError, match="positions"):
        rerotate(torch.zeros(2, 5, 16), torch.arange(4), torch.arange(5), rope)
    with pytest.raises(ValueError, match="layer 9"):
        rope_for_layer(tiny_llama().config, 9)
    cfg = tiny_llama().config
    cfg.rope_parameters = {"rope_type": "nonsense", "rope_theta": 1.0}
    with pytest.raises(ConfigError, match="nonsense"):
        rope_for_layer(cfg, 0)


def test_rope_signature_changes_with_the_schedule() -> None:
    a, b = tiny_llama(ROPES["default"]).config, tiny_llama(ROPES["linear"]).config
    assert rope_signature(a) != rope_signature(b)
    assert rope_signature(a) == rope_signature(tiny_llama(ROPES["default"], seed=5).config)
