"""The cost model against values computed by hand for a small config, and the real pair's
published memory facts (STUDY.md)."""

import pytest

from models.cost import FULL, LINEAR, SLIDING, CostModel


@pytest.fixture
def small() -> CostModel:
    # d=8, mlp 16, vocab 10; layers: full, sliding (window 3), GDN (2 heads, dk 4, dv 8)
    return CostModel(hidden=8, intermediate=16, vocab=10, layer_types=(FULL, SLIDING, LINEAR),
                     heads=2, kv_heads=2, head_dim=4, sliding_window=3, gdn_key_heads=2,
                     gdn_value_heads=2, gdn_key_dim=4, gdn_value_dim=8, gdn_conv=4, dtype_bytes=2)


def test_params_by_hand(small):
    # LM head 80 + 3 MLPs 3*384 + 2 attention layers 2*256 + GDN 256+128+128+32
    assert small.matmul_params() == 80 + 1152 + 512 + 544


def test_token_flops_by_hand(small):
    # 2*2288 + full 32*5 + sliding 32*min(5,3) + GDN conv 2*4*32 + state 8*2*4*8
    assert small.token_flops(5) == 4576 + 160 + 96 + 256 + 512


def test_prefill_is_sum_of_token_flops(small):
    assert small.prefill_flops(5) == 27584
    assert small.prefill_flops(5) == sum(small.token_flops(t) for t in range(1, 6))
    assert small.prefill_flops(0) == 0


def test_decode_flops(small):
    assert small.decode_flops(5, 3) == sum(small.token_flops(t) for t in range(6, 9))
    assert small.request_flops(5, 3) == small.prefill_flops(8)


def test_memory_by_hand(small):
    # per token per attention layer: 2 (k,v) * 2 heads * 4 dims * 2 bytes = 32 B
    assert small.kv_cache_bytes(5) == 32 * 5 + 32 * 3
    assert small.recurrent_state_bytes() == 2 * 4 * 8 * 2
    assert small.conv_state_bytes() == 3 * 32 * 2
    assert small.memory_bytes(5) == 256 + 128 + 192
    no_evict = CostModel(**{**small.__dict__, "evict_sliding": False})
    assert no_evict.kv_cache_bytes(5) == 32 * 10


def test_real_pair_memory_facts():
    hyb, olmo = CostModel.olmo_hybrid_7b(), CostModel.olmo3_7b()
    assert hyb.kv_cache_bytes(1) == 120 * 1024  # 120 KiB per token
    assert hyb.recurrent_state_bytes() == pytest.approx(26.5e6, rel=0.01)
    assert olmo.kv_cache_bytes(10_000) - olmo.kv_cache_bytes(9_999) == 128 * 1024
    sliding = olmo.kv_cache_bytes(8192) - 8192 * 128 * 1024
    assert sliding == 1.5 * 2**30  # 24 sliding layers x 4096 tokens
    # hybrid memory advantage shrinks with context (STUDY.md: 2.5x at 8k, 1.26x at 64k)
    r8k = olmo.memory_bytes(8192) / hyb.memory_bytes(8192)
    r64k = olmo.memory_bytes(65536) / hyb.memory_bytes(65536)
    assert r8k == pytest.approx(2.5, abs=0.15) and r64k == pytest.approx(1.26, abs=0.05)


def test_invalid_configs():
    with pytest.raises(ValueError, match="sliding_window"):
        CostModel(hidden=8, intermediate=8, vocab=8, layer_types=(SLIDING,), heads=2,
                  kv_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="unknown layer"):
        CostModel(hidden=8, intermediate=8, vocab=8, layer_types=("conv",), heads=2,
                  kv_heads=2, head_dim=4)
