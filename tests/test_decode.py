"""specialist.decode: the output layer read in bfloat16 still picks float32's greedy token, ties and crowded
bands included, and bfloat16 is used only where the CPU multiplies it natively."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specialist.decode import CANDIDATES, GreedyHead, cpu_multiplies_bf16


def exact_picks(weight: torch.Tensor, hidden: torch.Tensor) -> list[int]:
    return F.linear(hidden, weight).argmax(dim=-1).tolist()


def test_the_bf16_head_picks_the_float32_argmax_on_near_ties():
    torch.manual_seed(0)
    weight, hidden = torch.randn(5000, 64), torch.randn(12, 64) * 4
    best = F.linear(hidden, weight).argmax(dim=-1)
    # a rival a hair below (or above) each row's best token: bfloat16 cannot tell them apart, float32 can
    for row, token in enumerate(best.tolist()):
        rival = 4000 + row
        weight[rival] = weight[token] + (1 if row % 2 else -1) * 1e-5 * hidden[row] / hidden[row].norm()
    head = GreedyHead(weight, bf16=True)
    assert head.pick(hidden).tolist() == exact_picks(weight, hidden)
    assert GreedyHead(weight, bf16=False).pick(hidden).tolist() == exact_picks(weight, hidden)


def test_equal_logits_go_to_the_lowest_token_id_as_argmax_does():
    torch.manual_seed(1)
    weight, hidden = torch.randn(3000, 32), torch.randn(4, 32)
    weight[2999] = weight[17] = weight[900] = hidden.sum(0) * 10  # three equal winners for every row
    picks = GreedyHead(weight, bf16=True).pick(hidden).tolist()
    assert picks == exact_picks(weight, hidden) == [17, 17, 17, 17]


def test_a_band_wider_than_the_candidates_is_scored_in_full():
    """More tokens than CANDIDATES within the bfloat16 error of the best: the row is scored exactly in full."""
    torch.manual_seed(2)
    weight, hidden = torch.randn(4000, 32), torch.randn(3, 32)
    crowd = hidden[0] / hidden[0].norm() * 5
    for n in range(3 * CANDIDATES):
        weight[1000 + n] = crowd + 1e-6 * n * torch.randn(32)
    assert GreedyHead(weight, bf16=True).pick(hidden).tolist() == exact_picks(weight, hidden)


def test_bf16_only_where_the_cpu_has_the_instructions(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert not cpu_multiplies_bf16("flags : fpu sse avx2 fma avx512f")  # AVX2 or AVX-512 without BF16: float32
    avx512_bf16 = "flags : fpu avx2 avx512f avx512_bf16"
    expected = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
    assert cpu_multiplies_bf16(avx512_bf16) is expected
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # the AVX2-only emulation of bench/
    assert not cpu_multiplies_bf16(avx512_bf16)


def test_the_heads_copies_are_made_once_per_weight_and_freed_with_it():
    import gc

    from transformers import LlamaConfig, LlamaForCausalLM

    from specialist import decode

    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    first, second = decode.greedy_head(model), decode.greedy_head(model)
    assert first.low is second.low and (first.low is None) is (not cpu_multiplies_bf16())
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(2)  # changed in place: made again
    assert decode.greedy_head(model).largest_row == 2 * first.largest_row
    decode.greedy_head(model).pick(torch.randn(2, 32))  # where bfloat16 is not native: the float32 packing
    from specialist import onednn

    weight_id = id(model.get_output_embeddings().weight)
    held = {key for key in onednn._HELD if key[0] == weight_id}
    assert held == ({(weight_id, "greedy-head")} if cpu_multiplies_bf16() else {(weight_id, "onednn")})
    del model, first, second
    gc.collect()
    assert not held & set(onednn._HELD)  # a model let go of takes its copies with it
