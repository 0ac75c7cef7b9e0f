import numpy as np
import pytest

from engine.config import ConfigError
from engine.quantize import GROUP_SIZE, QUANTIZATIONS, dequantize, quant_spec, quantize

QUANTIZED = ["q4f16_1", "q8f16_1"]


@pytest.mark.parametrize("name", QUANTIZED)
def test_round_trip_is_exact_on_the_grid(name):
    spec = quant_spec(name)
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.01, 1.0, (6, 4)).astype(np.float16)
    q = rng.integers(-spec.max_int, spec.max_int + 1, (6, 4 * GROUP_SIZE))
    q[:, ::GROUP_SIZE] = spec.max_int  # each group reaches max |q|, so its scale is recovered exactly
    w = q * np.repeat(scale.astype(np.float32), GROUP_SIZE, axis=1)
    packed, s = quantize(w, spec)
    assert packed.dtype == np.uint32 and packed.shape == (6, 4 * GROUP_SIZE // spec.per_word)
    np.testing.assert_array_equal(s, scale)
    np.testing.assert_allclose(dequantize(packed, s, spec), w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", QUANTIZED)
def test_error_is_bounded_per_group(name):
    spec = quant_spec(name)
    w = np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)
    packed, scale = quantize(w, spec)
    err = np.abs(dequantize(packed, scale, spec) - w).reshape(8, -1, GROUP_SIZE)
    # half a quantization step, plus the fp16 rounding of the scale
    bound = scale.astype(np.float32)[:, :, None] * (0.5 + spec.max_int * 2**-10)
    assert (err <= bound + 1e-7).all()


def test_q8_is_much_tighter_than_q4():
    w = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    e4 = np.abs(dequantize(*quantize(w, quant_spec("q4f16_1")), quant_spec("q4f16_1")) - w).mean()
    e8 = np.abs(dequantize(*quantize(w, quant_spec("q8f16_1")), quant_spec("q8f16_1")) - w).mean()
    assert e8 * 10 < e4


def test_packing_puts_the_first_value_in_the_lowest_bits():
    spec = quant_spec("q4f16_1")
    w = np.zeros((1, GROUP_SIZE), np.float32)
    w[0, 0], w[0, 1] = 7.0, -7.0  # scale 1: q = 14 and 0
    packed, _ = quantize(w, spec)
    assert packed[0, 0] & 0xF == 14 and (packed[0, 0] >> 4) & 0xF == 0 and (packed[0, 0] >> 8) & 0xF == 7


def test_zero_groups_do_not_divide_by_zero():
    spec = quant_spec("q4f16_1")
    w = np.zeros((2, 64), np.float32)
    np.testing.assert_array_equal(dequantize(*quantize(w, spec), spec), w)


@pytest.mark.parametrize("shape", [(4, 33), (4, 48), (8,)])
def test_odd_shapes_are_refused(shape):
    with pytest.raises(ConfigError, match="group size|2-D"):
        quantize(np.ones(shape, np.float32), quant_spec("q4f16_1"))


def test_unknown_quantization_names_the_choices():
    with pytest.raises(ConfigError, match="q4f16_1"):
        quant_spec("q3f16_0")
    assert set(QUANTIZATIONS) >= {"q0f16", "q4f16_1", "q8f16_1"}
