"""Configuration validation: bad input gets an error that names the fix."""

import json

import numpy as np
import pytest

from engine.config import PRESETS, ConfigError, from_hf_folder, preset
from engine.quantize import quant_spec
from engine.sharding import ShardPlan
from engine.weights import rank_params


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="llama3-8b"):
        preset("llama9")


def test_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        from_hf_folder(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        from_hf_folder(tmp_path)


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        from_hf_folder(tmp_path)


def test_not_a_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="not a Llama"):
        from_hf_folder(tmp_path)


def test_config_without_weights(tmp_path, tiny_config):
    from engine.weights import open_source

    (tmp_path / "config.json").write_text(json.dumps(tiny_config.to_hf_dict()))
    config = from_hf_folder(tmp_path)
    with pytest.raises(ConfigError, match="safetensors"):
        open_source(config, tmp_path)


def test_transformers_v5_rope_parameters_are_read(tmp_path, tiny_config):
    raw = tiny_config.to_hf_dict()
    raw.pop("rope_theta"), raw.pop("rope_scaling")
    raw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 123.0, "factor": 2.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = from_hf_folder(tmp_path)
    assert config.rope_theta == 123.0 and config.rope_scaling["factor"] == 2.0


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_consistent(name):
    c = preset(name)
    assert c.head_dim * c.num_attention_heads >= c.hidden_size // 2
    for tp in (1, 2, 4):
        ShardPlan(c, tp).check_quant(quant_spec("q4f16_1"))


def test_bad_tp_names_the_valid_choices(tiny_config):
    with pytest.raises(ConfigError, match=r"choose tp from \[1, 2, 4\]"):
        ShardPlan(tiny_config, 3)


def test_kv_heads_are_replicated_past_their_count(tiny_config):
    plan = ShardPlan(tiny_config, 4)  # 2 KV heads
    assert plan.kv_replicated and plan.kv_heads == 1
    assert [plan.kv_head_range(r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]


def _as_numpy(params):
    return {k: v if isinstance(v, np.ndarray) else v.numpy() for k, v in params.items()}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("tp", [2, 4])
def test_random_weights_are_the_same_model_for_every_tp(tiny_config, tp, backend):
    """Shards generated independently per rank reassemble into the tp=1 weights."""
    from engine.weights import open_source

    spec = quant_spec("q0f32")
    source = open_source(tiny_config, None, seed=7, backend=backend)
    full = _as_numpy(rank_params(source, spec, ShardPlan(tiny_config, 1), 0))
    shards = [_as_numpy(rank_params(source, spec, ShardPlan(tiny_config, tp), r)) for r in range(tp)]
    d, plan = tiny_config.head_dim, ShardPlan(tiny_config, tp)
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(np.concatenate([s[name] for s in shards], axis=1), full[name])
    name = "model.layers.0.mlp.gate_up_proj.weight"
    gate = np.concatenate([s[name][:plan.intermediate] for s in shards])
    np.testing.assert_array_equal(gate, full[name][:tiny_config.intermediate_size])
    name = "model.layers.0.self_attn.qkv_proj.weight"
    q = np.concatenate([s[name][:plan.q_heads * d] for s in shards])
    np.testing.assert_array_equal(q, full[name][:tiny_config.num_attention_heads * d])
    np.testing.assert_array_equal(shards[0]["lm_head.weight"], full["lm_head.weight"])


def test_torch_quantized_random_weights_match_numpy_quantization(tiny_config):
    """The torch path quantizes on the device with the same bits as the numpy path."""
    from engine.quantize import quantize
    from engine.weights import TorchRandomSource

    spec, plan = quant_spec("q4f16_1"), ShardPlan(tiny_config, 2)
    source = TorchRandomSource(tiny_config, seed=3)
    params = _as_numpy(rank_params(source, spec, plan, 1))
    down = source.get("model.layers.0.mlp.down_proj.weight", None, plan.span("mlp", 1)).numpy()
    packed, scale = quantize(down, spec)
    np.testing.assert_array_equal(params["model.layers.0.mlp.down_proj.q_weight"], packed)
    np.testing.assert_array_equal(params["model.layers.0.mlp.down_proj.q_scale"], scale)


@pytest.mark.parametrize("quant", ["q0f16", "q4f16_1", "q8f16_1"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("lm_head", ["replicated", "vocab_parallel"])
def test_memory_prediction_of_weights_is_exact(tiny_config, quant, tp, lm_head):
    from engine import memory
    from engine.weights import nbytes, open_source

    spec = quant_spec(quant)
    plan = ShardPlan(tiny_config, tp, lm_head)
    params = rank_params(open_source(tiny_config, None), spec, plan, tp - 1)
    assert memory.weight_bytes(tiny_config, spec, tp, lm_head) == sum(nbytes(v) for v in params.values())
    if plan.vocab_parallel:
        assert params["lm_head.weight" if quant == "q0f16" else "lm_head.q_weight"].shape[0] == tiny_config.vocab_size // tp


def test_a_model_that_cannot_fit_is_refused_with_the_numbers():
    from engine import memory
    from engine.config import preset

    prediction = memory.predict(preset("llama3-70b"), quant_spec("q0f16"), 1, 1, 4096, 2048)
    assert prediction["weights"] > 130 * 2**30
    with pytest.raises(ConfigError, match=r"needs about 1\d\d\.\d GiB per device .* use a larger tp"):
        memory.check_fits(prediction, 80 * 2**30, "llama3-70b q0f16 tp=1")
    memory.check_fits(memory.predict(preset("llama3-70b"), quant_spec("q4f16_1"), 4, 1, 4096, 2048), 80 * 2**30, "ok")


def test_library_prefill_of_a_quantized_model_predicts_the_dequantized_weight():
    from engine import memory
    from engine.config import preset

    c = preset("llama3-8b")
    tir = memory.predict(c, quant_spec("q4f16_1"), 1, 1, 2048, 1024)
    library = memory.predict(c, quant_spec("q4f16_1"), 1, 1, 2048, 1024, prefill_gemm="library")
    assert library["workspace"] - tir["workspace"] == c.vocab_size * c.hidden_size * 2  # the LM head in fp16
    fp16 = quant_spec("q0f16")
    assert memory.predict(c, fp16, 1, 1, 2048, 1024, prefill_gemm="library") == memory.predict(c, fp16, 1, 1, 2048, 1024)


def test_library_prefill_attention_predicts_its_score_workspace():
    from engine import memory
    from engine.config import preset

    c = preset("llama3-8b")
    fp16 = quant_spec("q0f16")
    tir = memory.predict(c, fp16, 1, 1, 2048, 1024)
    library = memory.predict(c, fp16, 1, 1, 2048, 1024, prefill_attention="library")
    # one chunk of 1024 x 1024 float32 scores and float16 probabilities for 32 query heads
    assert library["workspace"] - tir["workspace"] == 32 * 1024 * 1024 * 6
    long = memory.predict(c, fp16, 1, 1, 8192, 8192, prefill_attention="library")
    assert long["workspace"] - memory.predict(c, fp16, 1, 1, 8192, 8192)["workspace"] == memory.ATTENTION_WORKSPACE_CAP
