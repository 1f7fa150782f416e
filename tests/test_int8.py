"""The int8 model keeps its weights int8 in memory and computes what the dequantized float model computes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from specialist.errors import ConfigError
from specialist.int8 import SCALE_SUFFIX, Int8Embedding, Int8Linear, dequantize_weights, load_int8, save_int8


def tiny_gemma(tokenizer, tie: bool = True):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(1)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              tie_word_embeddings=tie, layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(config).eval()


def export_int8(model, folder):
    """What `specialist export --format int8` writes that the loader reads: the int8 file and the config."""
    folder.mkdir(parents=True, exist_ok=True)
    save_int8(model, folder / "w.safetensors")
    model.config.save_pretrained(folder)
    return folder, folder / "w.safetensors"


def dequantized_reference(model, weights):
    """The float model with the stored int8 weights dequantized into it (what loading did before)."""
    import copy

    reference = copy.deepcopy(model)
    reference.load_state_dict(dequantize_weights(load_file(str(weights))), strict=False)
    reference.tie_weights()
    return reference.eval()


@pytest.fixture(params=["llama", "gemma"])
def float_model(request, tiny_model):
    model, tokenizer = tiny_model
    return (model.eval() if request.param == "llama" else tiny_gemma(tokenizer)), tokenizer


def test_every_matrix_is_held_as_int8_and_no_float_copy_exists(float_model, tmp_path):
    model, _ = float_model
    loaded = load_int8(*export_int8(model, tmp_path / "q8"))
    tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    matrices = {name: t for name, t in tensors.items() if t.ndim == 2}
    assert matrices and all(t.dtype == torch.int8 for t in matrices.values())
    assert all(t.ndim <= 1 for t in tensors.values() if t.is_floating_point())  # norms, scales only
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Embedding) for m in loaded.modules())
    head, embedding = loaded.get_output_embeddings(), loaded.get_input_embeddings()
    assert isinstance(head, Int8Linear) and isinstance(embedding, Int8Embedding)
    # tied: one int8 copy of the vocabulary matrix, shared by the lookup and the LM head
    assert head.weight is embedding.weight and head.weight_scale is embedding.weight_scale
    held = {t.data_ptr(): t.numel() * t.element_size() for t in tensors.values()}
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(held.values()) < 0.35 * float_bytes
    assert not any(p.requires_grad for p in loaded.parameters())


def test_int8_logits_equal_the_dequantized_model_and_stay_close_to_float(float_model, tmp_path):
    model, _ = float_model
    folder, weights = export_int8(model, tmp_path / "q8")
    loaded, reference = load_int8(folder, weights), dequantized_reference(model, weights)
    ids = torch.randint(4, model.config.vocab_size, (3, 11))
    with torch.inference_mode():
        got, want, exact = loaded(input_ids=ids).logits, reference(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)  # only the order of the sums differs
    assert float((got - exact).norm() / exact.norm()) < 0.05  # int8 rounding, as the export check measures
    if hasattr(loaded.get_input_embeddings(), "embed_scale") and loaded.get_input_embeddings().embed_scale is not None:
        assert float(loaded.get_input_embeddings().embed_scale) == pytest.approx(model.config.hidden_size ** 0.5)


def test_the_int8_model_answers_with_grad_enabled_and_generates(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    loaded = load_int8(*export_int8(model.eval(), tmp_path / "q8")).eval()
    ids = tokenizer("Invalid user webmaster", return_tensors="pt")["input_ids"]
    assert loaded(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)  # no inference_mode
    out = loaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        want = dequantized_reference(model, tmp_path / "q8" / "w.safetensors").generate(
            ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1] and torch.equal(out, want)


def test_an_untied_head_is_its_own_int8_matrix(tiny_model, tmp_path):
    _, tokenizer = tiny_model
    model = tiny_gemma(tokenizer, tie=False)
    loaded = load_int8(*export_int8(model, tmp_path / "q8"))
    head, embedding = loaded.get_output_embeddings(), loaded.get_input_embeddings()
    assert isinstance(head, Int8Linear) and head.weight is not embedding.weight
    assert head.weight.data_ptr() != embedding.weight.data_ptr()
    ids = torch.randint(4, model.config.vocab_size, (1, 6))
    with torch.inference_mode():
        assert torch.allclose(loaded(input_ids=ids).logits, dequantized_reference(
            model, tmp_path / "q8" / "w.safetensors")(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_rows", [1, 3, 7, 64, 10_000])
def test_the_blockwise_matmul_matches_the_plain_one_at_every_block_boundary(block_rows):
    torch.manual_seed(0)
    weight = torch.randn(37, 19)
    scale = weight.abs().amax(dim=1) / 127
    q = torch.round(weight / scale[:, None]).to(torch.int8)
    bias = torch.randn(37)
    layer = Int8Linear(q, scale, bias)
    layer.block_rows = block_rows
    for x in (torch.randn(19), torch.randn(2, 5, 19), torch.randn(0, 19)):
        want = torch.nn.functional.linear(x, q.float() * scale[:, None], bias)
        assert torch.allclose(layer(x), want, rtol=1e-5, atol=1e-5) and layer(x).shape == want.shape
    half = torch.randn(4, 19, dtype=torch.bfloat16)
    assert layer(half).dtype == torch.bfloat16


def test_the_embedding_reads_int8_rows_and_scales_them():
    q = torch.tensor([[1, -2], [127, -127], [0, 5]], dtype=torch.int8)
    scale = torch.tensor([0.5, 0.01, 2.0])
    ids = torch.tensor([[2, 0], [1, 1]])
    plain = Int8Embedding(q, scale)(ids)
    assert torch.equal(plain, (q.float() * scale[:, None])[ids])
    scaled = Int8Embedding(q, scale, embed_scale=torch.tensor(3.0))(ids)
    assert torch.allclose(scaled, 3.0 * plain)


def corrupt(weights, change):
    stored = load_file(str(weights))
    change(stored)
    save_file(stored, str(weights))


@pytest.mark.parametrize("change, words", [
    (lambda s: s.pop(next(k for k in s if k.endswith(SCALE_SUFFIX))), "no scale per row"),
    (lambda s: s.update({k: v[:-1] for k, v in list(s.items()) if k.endswith(SCALE_SUFFIX)}), "no scale per row"),
    (lambda s: s.pop(next(k for k in s if "norm" in k)), "do not fit"),
    (lambda s: s.update({"model.planted.weight": torch.zeros(3)}), "do not fit"),
    (lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2, dtype=torch.int8),
                         f"model.layers.0.mlp.up_proj.weight{SCALE_SUFFIX}": torch.ones(2)}), "do not fit"),
])
def test_a_tampered_int8_file_is_refused_with_the_fix(tiny_model, tmp_path, change, words):
    model, _ = tiny_model
    folder, weights = export_int8(model, tmp_path / "q8")
    corrupt(weights, change)
    with pytest.raises(ConfigError, match=words) as info:
        load_int8(folder, weights)
    assert "export it again" in str(info.value)


def test_a_file_that_is_not_safetensors_is_refused(tiny_model, tmp_path):
    model, _ = tiny_model
    folder, weights = export_int8(model, tmp_path / "q8")
    for content in (b"", b"\x00" * 16, weights.read_bytes()[:100]):
        weights.write_bytes(content)
        with pytest.raises(ConfigError, match="not readable int8 safetensors"):
            load_int8(folder, weights)
