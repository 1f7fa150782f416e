"""specialist.onednn: float32 linear layers through oneDNN's packed kernel, only where no gradient is wanted and only
inside `packed_linears`; the same numbers as F.linear up to the order of the sums."""

from __future__ import annotations

import copy
import gc
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specialist import onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch has no oneDNN packed linear kernel")


def held_for(weight: torch.Tensor) -> set:
    return {key for key in onednn._HELD if key[0] == id(weight)}


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 24, bias=False))


def test_inside_the_scope_a_layer_reads_its_packed_weight_and_gives_float32s_numbers():
    model = small_model()
    x = torch.randn(3, 5, 24)  # 3-D, as a decoder's hidden states
    expected = model(x)
    with torch.inference_mode(), onednn.packed_linears(model):
        got = model(x)
    assert all(held_for(layer.weight) == {(id(layer.weight), "onednn")} for layer in (model[0], model[2]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got.dtype == torch.float32 and got.shape == (3, 5, 24)


def test_outside_the_scope_and_where_a_gradient_is_wanted_the_layer_is_torchs_own():
    model = small_model()
    onednn.install(model)
    model(torch.randn(2, 24))  # installed, but outside packed_linears
    assert not held_for(model[0].weight)
    with onednn.packed_linears(model):  # grad mode on and trainable weights: autograd's path
        x = torch.randn(2, 24, requires_grad=True)
        model(x).sum().backward()
    assert not held_for(model[0].weight) and x.grad is not None and model[0].weight.grad is not None
    reference = x.detach().clone().requires_grad_(True)
    F.linear(F.gelu(F.linear(reference, model[0].weight, model[0].bias)), model[2].weight).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)


def test_autocast_other_dtypes_and_empty_inputs_take_torchs_path():
    model = small_model()
    with torch.no_grad(), onednn.packed_linears(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(torch.randn(2, 24)).dtype == torch.bfloat16
        assert not held_for(model[0].weight)
        assert model(torch.randn(0, 24)).shape == (0, 24)
        double = copy.deepcopy(model).double()
        assert double(torch.randn(2, 24, dtype=torch.float64)).dtype == torch.float64
    assert not held_for(model[0].weight)


def test_a_weight_changed_in_place_is_packed_again_and_a_freed_one_takes_its_copy_with_it():
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.no_grad(), onednn.packed_linears(layer):
        layer(x)
        first = onednn.packed(layer.weight)
        layer.weight.mul_(3)  # a merge or a training step writes the weight in place
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        assert onednn.packed(layer.weight) is not first
    key = (id(layer.weight), "onednn")
    assert key in onednn._HELD
    del layer
    gc.collect()
    assert key not in onednn._HELD


def test_the_output_layer_keeps_torchs_forward_and_a_copy_keeps_its_own():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    ids = torch.tensor([[1, 5, 9, 4]])
    expected = model(input_ids=ids).logits
    with torch.inference_mode(), onednn.packed_linears(model):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert "forward" not in vars(model.lm_head) and not held_for(model.lm_head.weight)
    assert "forward" in vars(model.model.layers[0].mlp.gate_proj)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].mlp.gate_proj.weight.zero_()
    with torch.inference_mode(), onednn.packed_linears(twin):
        assert not torch.allclose(twin(input_ids=ids).logits, expected)  # the copy reads its own weights
    with torch.inference_mode(), onednn.packed_linears(model):
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_an_adapter_on_the_base_reads_packed_base_weights_and_its_own_adapter():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    ids = torch.tensor([[3, 7, 2, 8, 1]])
    expected = model(input_ids=ids).logits
    with torch.inference_mode(), onednn.packed_linears(model):
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert not torch.allclose(plain, expected)


def test_the_scope_is_per_thread_and_two_threads_pack_a_weight_once(monkeypatch):
    layer = nn.Linear(32, 32)
    made, seen = [], {}
    real = onednn.pack

    def slow_pack(weight):
        made.append(1)
        threading.Event().wait(0.2)  # a second thread arrives while the first is packing
        return real(weight)

    monkeypatch.setattr(onednn, "pack", slow_pack)

    def packing():
        with torch.no_grad(), onednn.packed_linears(layer):
            layer(torch.randn(2, 32))

    def outside():
        seen["active"] = onednn._MODE.get()

    with onednn.packed_linears(layer):
        other = threading.Thread(target=outside)
        other.start()
        other.join()
    assert seen["active"] is None  # a context does not leak into another thread
    threads = [threading.Thread(target=packing) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1


def test_switched_off_the_scope_changes_nothing():
    model = small_model()
    with torch.no_grad(), onednn.packed_linears(model, enabled=False):
        model(torch.randn(2, 24))
    assert "forward" not in vars(model[0]) and not held_for(model[0].weight)


def test_training_through_frozen_packed_layers_gives_autograds_gradients():
    """LoRA's shape: frozen base layers (packed, weight.T packed for the input's gradient) with a trainable bias
    and a trainable layer in between; the loss and every gradient match torch's own layers."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(24, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    model[0].weight.requires_grad_(False)  # frozen, trainable bias
    model[4].requires_grad_(False)  # frozen altogether
    x = torch.randn(5, 7, 24, requires_grad=True)

    def loss_and_grads(scope):
        for parameter in model.parameters():
            parameter.grad = None
        x.grad = None
        with scope:
            loss = model(x).pow(2).mean()
            loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad] + [x.grad.clone()]

    from contextlib import nullcontext

    expected_loss, expected = loss_and_grads(nullcontext())
    loss, got = loss_and_grads(onednn.packed_linears(model))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-7)
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    assert (id(model[4].weight), "onednn-t") in onednn._HELD  # the frozen layer's backward read weight.T packed
    assert not held_for(model[2].weight)  # the trainable one stayed torch's


def test_the_chunked_loss_through_packed_output_layers_matches_torchs():
    from specialist.logits import chunked_head_cross_entropy

    torch.manual_seed(3)
    head = nn.Linear(32, 500, bias=False).requires_grad_(False)
    targets = torch.randint(0, 500, (40,))

    def run(scope):
        hidden = torch.randn(40, 32, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        with scope:
            loss = chunked_head_cross_entropy(hidden, head, targets, chunk=16)
            loss.backward()
        return loss.detach(), hidden.grad

    from contextlib import nullcontext

    expected_loss, expected_grad = run(nullcontext())
    loss, grad = run(onednn.packed_linears(head))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert held_for(head.weight) == {(id(head.weight), "onednn")}  # the backward's product is torch's (measured)


def test_training_packed_kernels_resolves_and_refuses_what_cannot_be(monkeypatch):
    from specialist.config import TrainingConfig
    from specialist.errors import ConfigError
    from specialist.train.loop import trains_packed

    model = nn.Linear(4, 4)
    assert trains_packed(TrainingConfig(), model) is True  # auto, on the CPU, with the kernels
    assert trains_packed(TrainingConfig(packed_kernels=False), model) is False
    monkeypatch.setattr(onednn, "available", lambda: False)
    assert trains_packed(TrainingConfig(), model) is False
    with pytest.raises(ConfigError, match="packed_kernels: true needs .* oneDNN kernels missing"):
        trains_packed(TrainingConfig(packed_kernels=True), model)
    with pytest.raises(ValueError):
        TrainingConfig(packed_kernels="sometimes")


def test_a_trainings_copies_are_let_go_of_after_it():
    model = small_model()
    model[0].requires_grad_(False)
    with onednn.packed_linears(model):
        model(torch.randn(3, 24, requires_grad=True)).sum().backward()
    assert {(id(model[0].weight), "onednn"), (id(model[0].weight), "onednn-t")} <= set(onednn._HELD)
    onednn.drop_copies(model)
    assert not held_for(model[0].weight)


def test_inside_a_training_a_trainable_weight_is_never_read_from_a_copy():
    """torch's fused AdamW (the Trainer's default) writes a weight without moving its version counter: a copy
    made before the step would be read after it. Inside a training's scope, even in an evaluation's no-grad
    generation nested in it, trainable weights are torch's and only frozen ones are packed."""
    torch.manual_seed(5)
    model = small_model()
    model[0].requires_grad_(False)  # frozen: packed; model[2] trains
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    x = torch.randn(4, 24)
    with onednn.packed_linears(model, training=True):
        for _ in range(3):
            model(x).pow(2).mean().backward()
            version = model[2].weight._version
            optimizer.step()
            optimizer.zero_grad()
            assert model[2].weight._version == version  # the fused step left the counter where it was
            with torch.inference_mode(), onednn.packed_linears(model):  # an evaluation inside the training
                torch.testing.assert_close(model(x), F.gelu(x @ model[0].weight.T + model[0].bias) @ model[2].weight.T)
                assert onednn._MODE.get() == "frozen"
    assert not held_for(model[2].weight) and (id(model[0].weight), "onednn") in onednn._HELD


def test_inside_a_training_the_greedy_head_keeps_no_copy_of_a_trainable_output_layer():
    from transformers import LlamaConfig, LlamaForCausalLM

    from specialist import decode

    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    weight = model.get_output_embeddings().weight
    hidden = torch.randn(3, 32)
    with onednn.packed_linears(model, enabled=False, training=True):
        head = decode.greedy_head(model)
        assert head.low is None
        with torch.no_grad():
            weight.mul_(-1)
        assert head.pick(hidden).tolist() == (hidden @ weight.T).argmax(-1).tolist()
    assert not held_for(weight)


def test_drop_copies_lets_go_of_every_kind_a_weight_has():
    """A merge through `weight.data` leaves every derived copy stale, the greedy head's bfloat16 one included."""
    layer = nn.Linear(8, 8)
    onednn.held_copy(layer.weight, "greedy-head", lambda w: w.clone())
    with torch.no_grad(), onednn.packed_linears(layer):
        layer(torch.randn(2, 8))
    assert held_for(layer.weight) == {(id(layer.weight), "greedy-head"), (id(layer.weight), "onednn")}
    onednn.drop_copies(layer)
    assert not held_for(layer.weight)
