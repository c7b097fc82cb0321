import pytest
import torch

from layerwise.formats import CompressedWeight, pack_bits, unpack_bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_round_trip_and_size(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (1001,), generator=g, dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.numel() == -(-1001 * bits // 8)  # ceil: 4-bit two per byte, 3-bit 8 per 3 bytes
    assert torch.equal(unpack_bits(packed, bits, 1001), values)


def test_four_bit_codes_two_per_byte_little_endian():
    packed = pack_bits(torch.tensor([1, 2, 15, 0], dtype=torch.uint8), 4)
    assert packed.tolist() == [0x21, 0x0F]


def _affine(out=8, inp=64, bits=4, block=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CompressedWeight(
        shape=(out, inp), scheme="affine", bits=bits,
        codes=torch.randint(0, 2**bits, (out, inp), generator=g, dtype=torch.uint8),
        scale=(torch.rand(out, inp // block, generator=g) * 0.01 + 1e-3).half(),
        zero_point=torch.randint(0, 2**bits, (out, inp // block), generator=g, dtype=torch.uint8),
    )


def test_affine_dequantize_is_fp16_product_of_fp16_scale():
    cw = _affine()
    dense = cw.dequantize()
    j = 40  # block 1
    expected = ((cw.codes[:, j].float() - cw.zero_point[:, 1].float()) * cw.scale[:, 1].float()).half()
    assert torch.equal(dense[:, j], expected)
    assert dense.dtype == torch.float16


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_affine_round_trip_bit_exact_and_payload(bits):
    cw = _affine(bits=bits)
    back = CompressedWeight.from_tensors(cw.meta(), cw.to_tensors())
    assert torch.equal(back.codes, cw.codes) and torch.equal(back.scale, cw.scale)
    assert torch.equal(back.zero_point, cw.zero_point)
    assert torch.equal(back.dequantize().view(torch.int16), cw.dequantize().view(torch.int16))
    expected = 8 * 64 * bits / 8 + 8 * 2 * 2 + -(-8 * 2 * bits // 8)
    assert cw.payload_bytes() == expected


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sparse", [False, True])
def test_symmetric_grid_stores_no_zero_points(bits, sparse):
    """Zero points all at 2**(bits-1): none on disk (4-bit, blocks of 32: exactly 4 + 16/32 bits per
    weight), and they come back from the meta; one zero point off the midpoint and they are stored."""
    cw = _affine(bits=bits)
    cw.zero_point.fill_(2 ** (bits - 1))
    if sparse:
        cw.mask = torch.rand(cw.shape, generator=torch.Generator().manual_seed(3)) > 0.5
        cw.codes = cw.codes * cw.mask
    tensors = cw.to_tensors()
    assert "zero_point" not in tensors and cw.meta()["zero_point"] == "midpoint"
    back = CompressedWeight.from_tensors(cw.meta(), tensors)
    assert torch.equal(back.zero_point, cw.zero_point) and back.midpoint_zero
    assert torch.equal(back.dequantize().view(torch.int16), cw.dequantize().view(torch.int16))
    if not sparse:
        assert cw.bits_per_weight() == bits + 16 / 32
    cw.zero_point[0, 0] -= 1
    assert "zero_point" in cw.to_tensors() and cw.meta()["zero_point"] == "stored"
    assert torch.equal(CompressedWeight.from_tensors(cw.meta(), cw.to_tensors()).zero_point, cw.zero_point)


def test_lut_and_sparse_round_trip():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(16, 32, generator=g) > 0.5
    codes = torch.randint(0, 8, (16, 32), generator=g, dtype=torch.uint8) * mask
    cw = CompressedWeight(shape=(16, 32), scheme="lut", bits=3, codes=codes.to(torch.uint8),
                          lut=torch.randn(4, 1, 8, generator=g).half(), mask=mask)
    back = CompressedWeight.from_tensors(cw.meta(), cw.to_tensors())
    assert torch.equal(back.dequantize().view(torch.int16), cw.dequantize().view(torch.int16))
    assert torch.equal(back.mask, mask) and torch.equal(back.codes, cw.codes)
    assert (cw.dequantize()[~mask] == 0).all()


def test_invalid_shapes_are_rejected():
    with pytest.raises(ValueError, match="does not tile"):
        CompressedWeight(shape=(8, 60), scheme="affine", bits=4, codes=torch.zeros(8, 60, dtype=torch.uint8),
                         scale=torch.ones(8, 7).half(), zero_point=torch.zeros(8, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="exceed 4 bits"):
        CompressedWeight(shape=(2, 2), scheme="affine", bits=4, codes=torch.full((2, 2), 16, dtype=torch.uint8),
                         scale=torch.ones(2, 1).half(), zero_point=torch.zeros(2, 1, dtype=torch.uint8))
