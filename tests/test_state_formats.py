"""The compressed accumulator formats (classp_fused.state_formats): the random bits, bfloat16
rounding and the 8-bit block codes, against values worked out independently."""
import pytest
import torch

from classp_fused import state_formats as sf

BLOCK = sf.BLOCK


def bits_for(key: int, n: int, offset: int = 0) -> torch.Tensor:
    return sf.element_bits(torch.tensor(key), torch.arange(offset, offset + n))


def q_of(codes: torch.Tensor) -> torch.Tensor:
    """q(c) in float64 from the format's definition: 2**(e-32) * (1 + m/8), or m * 2**-34."""
    e, m = (codes.long() // 8).double(), (codes.long() % 8).double()
    return torch.where(e >= 1, 2.0 ** (e - 32) * (1 + m / 8), m * 2.0 ** -34)


def test_mix32_and_element_bits_known_values():
    # lowbias32 computed in C with uint32 arithmetic
    x = torch.tensor([0, 1, 2, 0xDEADBEEF, 0xFFFFFFFF, 123456789])
    expected = [0, 0x688990C0, 0xD1132181, 0xE628C683, 0x6768824A, 0xA8F1DB88]
    assert sf.mix32(x).tolist() == expected
    # beyond 2**32 the key takes the high half: mix32(i mod 2**32 ^ mix32(key + (i >> 32)))
    index = torch.tensor([7, 2 ** 32 + 7])
    assert sf.element_bits(torch.tensor(42), index).tolist() == [0x04F45CAE, 0x9F78F64D]


def test_tensor_key_depends_on_seed_and_step():
    keys = {int(sf.tensor_key(seed, torch.tensor(float(step))))
            for seed in (0, 1, 2 ** 32 + 1) for step in (0, 1, 2)}
    assert len(keys) == 6  # seed 2**32 + 1 is seed 1 (the low 32 bits)
    assert all(0 <= k < 2 ** 32 for k in keys)


def test_decode_is_the_definition_and_encode_keeps_grid_values():
    g = torch.Generator().manual_seed(0)
    n = 5 * BLOCK + 17
    codes = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    codes[::BLOCK] = torch.randint(248, 256, (sf.num_blocks(n),), generator=g,
                                   dtype=torch.uint8)  # a top code: the scale is kept
    scales = 2.0 ** torch.tensor([-115.0, -3.0, 0.0, 5.0, 60.0, 127.0])
    values = sf.decode(codes, scales)
    expected = q_of(codes) * scales.double().repeat_interleave(BLOCK)[:n]
    assert torch.equal(values.double(), expected)  # exact in float32
    for key in (1, 2, 3):
        again, again_scales = sf.encode_blocks(values, bits_for(key, n))
        assert torch.equal(again, codes) and torch.equal(again_scales, scales)


def test_bf16_keeps_representable_values_and_rounds_to_neighbours():
    g = torch.Generator().manual_seed(1)
    exact = torch.rand(4096, generator=g).bfloat16().float()
    assert torch.equal(sf.round_bf16(exact, bits_for(5, 4096)).float(), exact)
    x = torch.rand(4096, generator=g) + 0.5
    rounded = sf.round_bf16(x, bits_for(6, 4096)).float()
    down = x.view(torch.int32).bitwise_and(~0xFFFF).view(torch.float32)
    up = (x.view(torch.int32).bitwise_and(~0xFFFF) + 0x10000).view(torch.float32)
    assert bool(((rounded == down) | (rounded == up)).all())
    assert bool((rounded == down).any() and (rounded == up).any())


@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
def test_rounding_is_unbiased_over_keys(fmt):
    g = torch.Generator().manual_seed(2)
    n, keys = 2 * BLOCK, 4000
    x = torch.rand(n, generator=g) * 2.0 ** torch.randint(-12, 0, (n,), generator=g)
    x[0] = 1.0  # block tops: the scale is 2**1
    x[BLOCK] = 0.9
    total = torch.zeros(n, dtype=torch.float64)
    for key in range(keys):
        bits = bits_for(key, n)
        if fmt == "bf16":
            total += sf.round_bf16(x, bits).double()
        else:
            total += sf.decode(*sf.encode_blocks(x, bits)).double()
    mean = total / keys
    # the rounding error of one draw is at most one grid step: at most 2**-3 relative above
    # 2**-31 of the scale, 2**-33 absolute below (bf16: 2**-7 relative)
    step = torch.clamp(x.double() * (2.0 ** -7 if fmt == "bf16" else 2.0 ** -3),
                       min=0.0 if fmt == "bf16" else 2.0 ** -33)
    # five standard errors of a mean of `keys` draws in [-step, step]
    assert bool(((mean - x.double()).abs() <= 5 * step / keys ** 0.5).all())


def test_a_positive_value_never_gets_code_zero():
    n = BLOCK
    x = torch.full((n,), 1e-30)
    x[0], x[1], x[2] = 1.0, 0.0, 2.0 ** -40
    for key in range(20):
        codes, scales = sf.encode_blocks(x, bits_for(key, n))
        assert codes[1] == 0
        assert bool((codes[[0, *range(2, n)]] >= 1).all())
        assert bool((sf.decode(codes, scales)[x > 0] > 0).all())


def test_saturation_is_the_top_code_at_the_largest_scale():
    x = torch.zeros(BLOCK + 3)
    x[5], x[BLOCK + 1] = sf.SATURATION, 1.0
    for key in range(5):
        codes, scales = sf.encode_blocks(x, bits_for(key, x.numel()))
        assert codes[5] == 255 and scales[0] == 2.0 ** 127
        assert sf.decode(codes, scales)[5] == sf.SATURATION
        assert scales[1] == 2.0 ** 1 and codes[BLOCK + 1] == 8 * 31 + 0  # 1 = 2**1 * 2**-1


def test_block_scale_thresholds():
    # the smallest 2**E with max <= 15/16 * 2**E; E >= -115; 0 for a block of zeros
    tops = torch.tensor([0.0, 15 / 16, 15 / 16 + 2 ** -20, 1.0, 1e-40, 3.0 * 2 ** 100])
    x = torch.zeros(len(tops) * BLOCK)
    x[::BLOCK] = tops
    assert sf.block_scales(x).tolist() == [0.0, 1.0, 2.0, 2.0, 2.0 ** -115, 2.0 ** 102]


def test_exponents_are_those_of_the_block_scales():
    exponents = torch.arange(sf.MIN_EXPONENT, sf.MAX_EXPONENT + 1)
    scales = torch.cat([2.0 ** exponents.double(), torch.zeros(1, dtype=torch.float64)]).float()
    assert torch.equal(sf.scale_exponents(scales)[:-1], exponents.to(torch.int8))
    assert sf.scale_exponents(scales)[-1] == sf.ZERO_EXPONENT
    assert torch.equal(sf.exponent_scales(sf.scale_exponents(scales)), scales)
    per_element = sf.element_exponents(scales[:3], 2 * BLOCK + 5)
    assert per_element.shape == (2 * BLOCK + 5,) and per_element.dtype == torch.int8
    assert per_element[BLOCK - 1] == sf.MIN_EXPONENT and per_element[-1] == sf.MIN_EXPONENT + 2


def test_blocks_from_exponents_keep_one_exponent_blocks_and_round_mixed_ones_to_nearest():
    """Blocks whose elements carry one exponent come back bit for bit (a zero block keeps its
    codes); a block mixing exponents is the round-to-nearest encoding of its exact values."""
    g = torch.Generator().manual_seed(3)
    n = 4 * BLOCK - 24
    codes = torch.randint(1, 256, (n,), generator=g).to(torch.uint8)
    scales = torch.tensor([2.0 ** 3, 0.0, 2.0 ** -115, 2.0 ** 127])
    exponents = sf.element_exponents(scales, n)
    restored_codes, restored_scales = sf.blocks_from_exponents(codes, exponents)
    assert torch.equal(restored_codes, codes) and torch.equal(restored_scales, scales)
    assert restored_codes.data_ptr() != codes.data_ptr()

    mixed = exponents.clone()
    mixed[:100] = -37  # 40 binades below the rest of block 0: rounded in its linear range
    mixed[3 * BLOCK:3 * BLOCK + 9] = sf.ZERO_EXPONENT  # zeros among the last block's elements
    values = sf.decode_elements(codes, mixed)
    assert torch.equal(values[:100], (q_of(codes[:100]) * 2.0 ** -37).float())
    restored_codes, restored_scales = sf.blocks_from_exponents(codes, mixed)
    half = torch.full((n,), 1 << 19, dtype=torch.int64)
    expected_codes, expected_scales = sf.encode_blocks(values, half)
    for block in (0, 3):
        part = slice(block * BLOCK, (block + 1) * BLOCK)
        assert torch.equal(restored_codes[part], expected_codes[part])
        assert restored_scales[block] == expected_scales[block]
    assert not torch.equal(restored_codes[:100], codes[:100])
    assert torch.equal(restored_codes[BLOCK:3 * BLOCK], codes[BLOCK:3 * BLOCK])
    assert torch.equal(restored_scales[1:3], scales[1:3])
    decoded = sf.decode(restored_codes, restored_scales)
    assert torch.equal(decoded[100:BLOCK], values[100:BLOCK])  # at the scale they had
    assert torch.equal(decoded[3 * BLOCK:3 * BLOCK + 9], torch.zeros(9))

    empty = torch.zeros(0, dtype=torch.uint8)
    restored_codes, restored_scales = sf.blocks_from_exponents(empty, empty.to(torch.int8))
    assert restored_codes.shape == (0,) and restored_scales.shape == (0,)
