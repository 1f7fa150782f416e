"""GGUF export, judged by llama.cpp itself: every architecture, type and tokenizer written here is loaded by
llama.cpp (llama-cpp-python, in the `test` extra), which tokenizes the prompts with the vocabulary stored in the
file and answers them; both are compared with the HF model and tokenizer. Plus the Ollama Modelfile, rendered
through its own template and compared with the run's prompt byte for byte."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
from conftest import CORPUS, build_tiny_model, build_tiny_tokenizer

from specialist import gguf_layout
from specialist.data.template import PromptTemplate
from specialist.deploy import gguf_export, llamacpp
from specialist.deploy.gguf_export import QUANT_TYPES, bpe_pre_tokenizer, write_gguf
from specialist.deploy.ollama import render_template, write_modelfile
from specialist.errors import ConfigError, ModelError

INSTRUCTION = "Parse the log line into JSON."
GOLDEN = [
    "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_38865 terminating",
    "Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186",
    "[Sun Dec 04 04:47:44 2005] [notice] workerEnv.init() ok /etc/httpd/conf/workers2.properties",
    'naïve café ✅ 我想 — "quoted", tabs\tand  double  spaces',
]
STEPS = 8
# Largest |llama.cpp - HF| next-token logit, in units of the HF logits' spread (llama.cpp keeps its KV cache in
# f16). Measured on these models: f32 at most 3.3e-3, f16 1.1e-2; a missing rotary permutation gives 0.22, a
# missing Gemma norm offset 3.2.
LOGIT_TOLERANCE = {"f32": 1e-2, "f16": 3e-2}
# Greedy tokens are compared while HF's top-2 margin (same units) exceeds this (about 3x the largest logit error):
# below it a near tie may flip legitimately and the answers part.
MARGIN = {"f32": 0.01, "f16": 0.03}
THREADS = 1  # tiny models: llama.cpp's spinning worker threads only cost time on a busy 2-core machine


# ---- tiny models of every architecture ---------------------------------------------------------------------------


def _common(tokenizer, **overrides):
    config = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return {**config, **overrides}


def build_arch_model(name: str, tokenizer, width: int = 64):
    """A random tiny model of one architecture (and layout variant) llama.cpp must compute like transformers."""
    import transformers as tf

    torch.manual_seed(0)
    common = _common(tokenizer, hidden_size=width, intermediate_size=2 * width)
    rng = np.random.default_rng(0)
    builders = {
        "llama": lambda: build_tiny_model(tokenizer),  # tied, hidden 32: the model every other test uses
        "llama-rope3-bias": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            **{**common, "max_position_embeddings": 2048}, attention_bias=True, mlp_bias=True,
            tie_word_embeddings=False, rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=False)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=128, tie_word_embeddings=True)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**common, original_max_position_embeddings=512)),
        "phi3-longrope-partial": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(
            **{**common, "max_position_embeddings": 1024}, original_max_position_embeddings=256,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                             "original_max_position_embeddings": 256,
                             "long_factor": (1 + 4 * rng.random(4)).tolist(),
                             "short_factor": (1 + rng.random(4)).tolist()})),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            **common, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)),
        # Gemma 3's own layer pattern and head size (every 6th layer global, 256), which transformers' GGUF
        # reader assumes instead of reading them
        "gemma3-as-released": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            **common, head_dim=256, query_pre_attn_scalar=256, sliding_window=8, tie_word_embeddings=True)),
    }
    return sharpen_attention(builders[name]()).eval()


def sharpen_attention(model):
    """Random init leaves attention scores near zero, where a wrong rotary layout or q/k norm hardly shows in the
    logits; larger q/k weights (and q/k norm gains) make every position's rotation matter."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    qk_rows = (config.num_attention_heads + config.num_key_value_heads) * head_dim
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(4)
            elif name.endswith("qkv_proj.weight"):
                parameter[:qk_rows].mul_(4)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                parameter.add_(1.0)
    return model


ARCHITECTURES = ["llama", "llama-rope3-bias", "qwen2", "qwen3", "phi3", "phi3-longrope-partial", "gemma3"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: torch's second thread only spins against the other workers of a 2-core machine
    (measured: this file takes 11 s with one thread, about 60 s with two while the machine is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def arch_models(tokenizer):
    cache: dict[str, object] = {}
    return lambda name: cache.setdefault(name, build_arch_model(name, tokenizer))


def hf_greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """HF's greedy tokens and, per step, its top-2 logit margin in units of the logits' spread."""
    tokens, margins, sequence = [], [], list(ids)
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(torch.tensor([sequence])).logits[0, -1].float()
            top = torch.topk(logits, 2).values
            margins.append(float((top[0] - top[1]) / logits.std()))
            tokens.append(int(logits.argmax()))
            sequence.append(tokens[-1])
    return tokens, margins


def compare_greedy(model, prompts_ids, answers, margin: float) -> tuple[int, int]:
    """Assert llama.cpp's greedy tokens equal HF's up to the first near tie; (steps compared, steps in all)."""
    compared = 0
    for ids, (got, stopped) in zip(prompts_ids, answers, strict=True):
        want, margins = hf_greedy(model, ids, len(got))
        assert not stopped
        for step, (w, g, m) in enumerate(zip(want, got, margins, strict=True)):
            if m < margin:
                break
            assert g == w, f"step {step}: llama.cpp {g} != HF {w} (HF margin {m:.3f})"
            compared += 1
    return compared, sum(len(got) for got, _ in answers)


def logit_errors(model, prompts_ids, gguf_path) -> list[float]:
    got = llamacpp.next_token_logits(gguf_path, prompts_ids, threads=THREADS)
    errors = []
    with torch.inference_mode():
        for ids, logits in zip(prompts_ids, got, strict=True):
            want = model(torch.tensor([ids])).logits[0, -1].float().numpy()
            errors.append(float(np.abs(want - logits).max() / want.std()))
    return errors


# ---- every architecture, f32 and f16: tokens, logits and greedy answers as transformers ------------------------


@pytest.mark.parametrize("qtype", ["f32", "f16"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_runs_in_llama_cpp_as_in_transformers(arch, qtype, arch_models, tokenizer, tmp_path):
    model = arch_models(arch)
    path = tmp_path / f"{arch}-{qtype}.gguf"
    written = write_gguf(model, tokenizer, path, qtype)
    template = PromptTemplate.for_tokenizer(tokenizer, INSTRUCTION)
    prompts = [template.render_prompt(line) for line in GOLDEN]
    hf_ids = [template.encode_prompt(line, tokenizer) for line in GOLDEN]

    with llamacpp.load_llama(path, n_ctx=512) as runner:  # llama.cpp's own tokenizer, from the file
        assert [runner.tokenize(p) for p in prompts] == hf_ids
    assert max(logit_errors(model, hf_ids, path)) < LOGIT_TOLERANCE[qtype]
    answers = llamacpp.greedy_answers(path, prompts, STEPS, stop_ids=[], threads=THREADS)  # text: llama.cpp tokenizes
    compared, total = compare_greedy(model, hf_ids, answers, MARGIN[qtype])
    assert compared >= total // 2, f"only {compared} of {total} greedy steps had a clear HF margin"
    expected_types = {"f32": {"F32"}, "f16": {"F16", "F32"}}[qtype]
    assert set(written["tensor_types"]) == expected_types


def test_transformers_reads_every_architecture_back(arch_models, tokenizer, tmp_path):
    """export.py's check loads the GGUF through transformers: every architecture written must read back.

    (transformers' reader assumes Gemma 3's layer pattern and query scale and Qwen 3's head_dim of 128, as the
    released models have; llama.cpp reads them from the file.)"""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([tokenizer(GOLDEN[0])["input_ids"]])
    for arch in ("qwen2", "qwen3", "phi3", "gemma3-as-released"):
        model = arch_models(arch)
        write_gguf(model, tokenizer, tmp_path / f"{arch}.gguf", "f32")
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"{arch}.gguf").eval()
        with torch.inference_mode():
            want, got = model(ids).logits[0, -1], back(ids).logits[0, -1]
        assert float((want - got).abs().max() / want.std()) < 1e-3, arch


# ---- quantized types: they load, answer, and agree as far as their bits allow ---------------------------------


@pytest.fixture(scope="module")
def wide_model(tokenizer):
    """A llama 256 wide, so the k-quants' 256-element blocks fit its rows and are really used."""
    return build_arch_model("llama-rope3-bias", tokenizer, width=256)


# (dominant tensor type, least Pearson correlation of next-token logits with HF, largest |llama.cpp - HF|
# next-token logit in units of the HF logits' spread). Measured: correlation .999 .994 .978 .974 .937 .925;
# logit error .100 .353 .570 .477 1.145 .960 (about 1.4x that allowed).
QUANTIZED = {"q8_0": ("Q8_0", 0.99, 0.15), "q6_k": ("Q6_K", 0.98, 0.5), "q5_k_m": ("Q5_K", 0.95, 0.8),
             "q5_0": ("Q5_0", 0.95, 0.7), "q4_k_m": ("Q4_K", 0.9, 1.6), "q4_0": ("Q4_0", 0.9, 1.4)}


def _tensor_types(path, names) -> set[str]:
    import gguf

    return {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if t.name in names}


@pytest.mark.parametrize("qtype", list(QUANTIZED))
def test_quantized_exports_load_answer_and_stay_correlated(qtype, wide_model, tokenizer, tmp_path):
    f16 = write_gguf(wide_model, tokenizer, tmp_path / "f16.gguf", "f16")
    written = write_gguf(wide_model, tokenizer, tmp_path / f"{qtype}.gguf", qtype, threads=2)
    dominant, least_correlation, logit_tolerance = QUANTIZED[qtype]
    matrices = {kind: n for kind, n in written["tensor_types"].items() if kind != "F32"}  # norms, biases stay f32
    assert max(matrices, key=matrices.get) == dominant
    if qtype in ("q4_0", "q5_0"):  # the embedding (and a tied head) in q8_0, as llama.cpp gives its head 6+ bits
        assert _tensor_types(tmp_path / f"{qtype}.gguf", ("token_embd.weight", "output.weight")) <= {"Q8_0"}
    assert written["bytes"] < 0.6 * f16["bytes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f16.gguf", f"{qtype}.gguf"]  # no intermediate left

    template = PromptTemplate.for_tokenizer(tokenizer, INSTRUCTION)
    hf_ids = [template.encode_prompt(line, tokenizer) for line in GOLDEN]
    got = llamacpp.next_token_logits(tmp_path / f"{qtype}.gguf", hf_ids, threads=THREADS)
    with torch.inference_mode():
        want = [wide_model(torch.tensor([ids])).logits[0, -1].numpy() for ids in hf_ids]
    correlation = min(float(np.corrcoef(w, g)[0, 1]) for w, g in zip(want, got, strict=True))
    assert correlation > least_correlation
    error = max(float(np.abs(w - g).max() / w.std()) for w, g in zip(want, got, strict=True))
    assert error < logit_tolerance, f"{qtype}: next-token logits off by {error:.3f} of their spread"
    answers = llamacpp.greedy_answers(tmp_path / f"{qtype}.gguf", hf_ids, STEPS, stop_ids=[], threads=THREADS)
    assert all(len(tokens) == STEPS and all(0 <= t < len(tokenizer) for t in tokens) for tokens, _ in answers)
    # Logits off by at most e can swap HF's greedy token only where its top-2 margin is under 2e: the answers
    # equal HF's until such a near tie. (This random model has many: on it whole answers agree for q8_0 on 2 of 4
    # prompts, q6_k 1, the rest none, where the README's demo run keeps every answer at q8_0.)
    compare_greedy(wide_model, hf_ids, answers, 2 * logit_tolerance)


def test_k_quants_without_llama_cpp_name_the_extra_to_install(monkeypatch, tokenizer, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    assert not llamacpp.llama_cpp_available()
    with pytest.raises(ConfigError, match=re.escape("pip install 'specialist[gguf]'")):
        write_gguf(build_tiny_model(tokenizer), tokenizer, tmp_path / "m.gguf", "q4_k_m")
    with pytest.raises(ConfigError, match="llama-cpp-python"):
        llamacpp.greedy_answers(tmp_path / "m.gguf", [[1, 2]], 4)
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_types_and_architectures_are_refused_with_the_lists(tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = build_tiny_model(tokenizer)
    for qtype in ("q3_k", "Q4_0", "", "f16 "):
        with pytest.raises(ConfigError, match="q4_k_m"):
            write_gguf(model, tokenizer, tmp_path / "m.gguf", qtype)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match="gemma3_text, llama, phi3, qwen2, qwen3.*'gpt2'"):
        write_gguf(gpt2, tokenizer, tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []
    assert set(QUANT_TYPES) == {"f32", "f16", "q8_0", "q5_0", "q4_0", "q6_k", "q5_k_m", "q4_k_m"}


def test_configs_llama_cpp_would_compute_differently_are_refused(tokenizer, tmp_path):
    import transformers as tf

    common = _common(tokenizer)
    bad = {
        "query_pre_attn_scalar": tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=16,
                                                                          query_pre_attn_scalar=64)),
        "use_sliding_window": tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, use_sliding_window=True,
                                                                 sliding_window=16)),
        "rope scaling 'dynamic'": tf.LlamaForCausalLM(tf.LlamaConfig(
            **common, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    }
    for problem, model in bad.items():
        with pytest.raises(ConfigError, match=re.escape(problem)):
            write_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")


def test_metadata_of_a_source_gguf_is_carried_over_with_only_the_file_type_changed(tokenizer, tmp_path):
    """The embedded Gemma comes as a GGUF: its keys (tokenizer, scores, template) are copied, not rebuilt."""
    import gguf

    model = build_tiny_model(tokenizer)
    write_gguf(model, tokenizer, tmp_path / "source.gguf", "f32", chat_template="{{ messages }}")
    write_gguf(model, tokenizer, tmp_path / "copy.gguf", "q8_0", source_gguf=tmp_path / "source.gguf")
    source, copy = (gguf.GGUFReader(str(tmp_path / n)).fields for n in ("source.gguf", "copy.gguf"))
    differing = {k for k in source.keys() | copy.keys()
                 if k not in source or k not in copy or source[k].contents() != copy[k].contents()}
    assert differing == {"general.file_type"}
    assert copy["tokenizer.chat_template"].contents() == "{{ messages }}"
    assert llamacpp.tokenize(tmp_path / "copy.gguf", GOLDEN[0]) == tokenizer(GOLDEN[0])["input_ids"]


# ---- LoRA adapters as llama.cpp applies them (`--lora`), and read back without llama.cpp -------------------------


# llama.cpp's f16 KV cache on the larger activations of a strong random adapter: measured at most 2.0e-2 (f32
# base); against the same update merged into an f32 GGUF, llama.cpp's own numbers agree within 1.9e-3 (the order
# of the f32 sums differs: W x + B (A x) against (W + B A) x), where the base alone is 3 to 5 off
LORA_TOLERANCE = 3e-2
SAME_AS_MERGED = 1e-2


def with_lora(model, seed: int = 1, strength: float = 20.0, **options):
    """`model` (a copy) with a random, non-zero LoRA on every linear layer but the head, as PEFT applies it."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **options)
    peft_model = get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():  # PEFT's non-zero init is tiny next to sharpened weights: make the update matter
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(strength)
    return peft_model


def hf_logits(model, prompts_ids) -> list[np.ndarray]:
    with torch.inference_mode():
        return [model(torch.tensor([ids])).logits[0, -1].float().numpy() for ids in prompts_ids]


def relative_errors(want, got) -> list[float]:
    return [float(np.abs(w - g).max() / w.std()) for w, g in zip(want, got, strict=True)]


def llama_cpp_with_and_without(model, tuned, tokenizer, folder, prompts_ids):
    """llama.cpp's next-token logits: base + the adapter file, the update merged into one file, the base alone."""
    import copy

    write_gguf(model, tokenizer, folder / "base.gguf", "f32")
    written = gguf_export.write_gguf_lora(tuned, "default", folder / "lora.gguf")
    write_gguf(copy.deepcopy(tuned).merge_and_unload(), tokenizer, folder / "merged.gguf", "f32")
    logits = {"adapter": llamacpp.next_token_logits(folder / "base.gguf", prompts_ids, threads=THREADS,
                                                    lora=folder / "lora.gguf"),
              "merged": llamacpp.next_token_logits(folder / "merged.gguf", prompts_ids, threads=THREADS),
              "base": llamacpp.next_token_logits(folder / "base.gguf", prompts_ids, threads=THREADS)}
    return logits, written


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_lora_adapter_applied_by_llama_cpp_computes_what_peft_computes(arch, arch_models, tokenizer, tmp_path):
    model = arch_models(arch)
    tuned = with_lora(model)
    hf_ids = [tokenizer(line)["input_ids"] for line in GOLDEN]
    logits, written = llama_cpp_with_and_without(model, tuned, tokenizer, tmp_path, hf_ids)
    want = hf_logits(tuned, hf_ids)
    print(f"{arch}: with the adapter {max(relative_errors(want, logits['adapter'])):.4f}, "
          f"without {min(relative_errors(want, logits['base'])):.3f}")
    assert max(relative_errors(logits["merged"], logits["adapter"])) < SAME_AS_MERGED
    assert max(relative_errors(want, logits["adapter"])) < LORA_TOLERANCE
    assert min(relative_errors(want, logits["base"])) > 10 * LORA_TOLERANCE  # the adapter is what closes the gap
    assert written["tensors"] == 2 * sum(1 for n, _ in tuned.named_modules() if n.endswith("lora_A"))


@pytest.mark.parametrize("options", [{"use_rslora": True}, {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
                                     {"use_rslora": True, "rank_pattern": {"k_proj": 8, "down_proj": 1}}])
def test_per_module_rank_alpha_and_rslora_scalings_are_folded_for_llama_cpp(options, arch_models, tokenizer, tmp_path):
    """llama.cpp scales every tensor by one alpha / its rank; PEFT's per-module patterns and rsLoRA must come out
    as the same update merged."""
    model = arch_models("llama")
    tuned = with_lora(model, seed=2, **options)
    hf_ids = [tokenizer(line)["input_ids"] for line in GOLDEN]
    logits, _ = llama_cpp_with_and_without(model, tuned, tokenizer, tmp_path, hf_ids)
    assert max(relative_errors(logits["merged"], logits["adapter"])) < SAME_AS_MERGED
    assert min(relative_errors(logits["merged"], logits["base"])) > 10 * LORA_TOLERANCE


@pytest.mark.parametrize("arch", ["llama-rope3-bias", "gemma3"])  # 256 wide: rank 32 corrects part of the error
def test_a_requantized_base_is_compensated_inside_the_adapter(arch, tokenizer, tmp_path):
    """A 4-bit base under an f32 adapter answers further from the tuned model than the adapter was trained for;
    the low-rank correction appended to the adapter (calibrated on other texts) brings llama.cpp closer."""
    from contextlib import nullcontext

    from specialist.deploy.lora_compensation import compensated_modules

    model = build_arch_model(arch, tokenizer, width=256)
    tuned = with_lora(model, strength=2.0)
    write_gguf(model, tokenizer, tmp_path / "base.gguf", "q4_0")
    gguf_export.write_gguf_lora(tuned, "default", tmp_path / "plain.gguf")
    calibration = [tokenizer(line)["input_ids"] for line in CORPUS if line not in GOLDEN]
    modules, report = compensated_modules(tuned, "default", tmp_path / "base.gguf", calibration, 32, nullcontext)
    gguf_export.write_gguf_lora(tuned, "default", tmp_path / "compensated.gguf", modules)
    assert report["layers"] == len(modules) and 0 <= report["error_left"] < 0.9
    assert all(a.shape[0] == b.shape[1] for _, a, b, _ in modules)
    hf_ids = [tokenizer(line)["input_ids"] for line in GOLDEN]
    want = hf_logits(tuned, hf_ids)
    errors = {name: np.mean(relative_errors(want, llamacpp.next_token_logits(
        tmp_path / "base.gguf", hf_ids, threads=THREADS, lora=tmp_path / f"{name}.gguf")))
        for name in ("plain", "compensated")}
    print(f"{arch}: logit error with the plain adapter {errors['plain']:.3f}, compensated {errors['compensated']:.3f}")
    assert errors["compensated"] < 0.8 * errors["plain"]


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
def test_reading_a_gguf_lora_back_adds_the_peft_update(arch, arch_models, tokenizer, tmp_path):
    """Loaders without llama.cpp (transformers' GGUF reader) merge the adapter file themselves: the weights must be
    PEFT's merged weights, rotary row order (llama) included."""
    import copy

    model = arch_models(arch)
    tuned = with_lora(model, seed=3)
    gguf_export.write_gguf_lora(tuned, "default", tmp_path / "lora.gguf")
    plain = copy.deepcopy(model)
    changed = gguf_layout.merge_gguf_lora(plain, tmp_path / "lora.gguf")
    merged = copy.deepcopy(tuned).merge_and_unload().state_dict()
    assert changed == sum(1 for n, _ in tuned.named_modules() if n.endswith("lora_A"))
    for name, weight in plain.state_dict().items():
        torch.testing.assert_close(weight, merged[name], rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(ConfigError, match="not a GGUF LoRA adapter"):
        write_gguf(model, tokenizer, tmp_path / "model.gguf", "f32")
        gguf_layout.merge_gguf_lora(plain, tmp_path / "model.gguf")


def test_broken_or_foreign_adapter_files_are_refused_and_change_no_weight(arch_models, tokenizer, tmp_path):
    import copy

    model = copy.deepcopy(arch_models("llama"))
    before = {name: weight.clone() for name, weight in model.state_dict().items()}
    gguf_export.write_gguf_lora(with_lora(arch_models("llama")), "default", tmp_path / "good.gguf")
    good = (tmp_path / "good.gguf").read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(good[: len(good) // 2])
    (tmp_path / "random.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.gguf").write_bytes(b"")
    gguf_export.write_gguf_lora(with_lora(arch_models("qwen2")), "default", tmp_path / "foreign.gguf")
    for name in ("truncated", "random", "empty", "foreign"):
        with pytest.raises(ConfigError):
            gguf_layout.merge_gguf_lora(model, tmp_path / f"{name}.gguf")
        for key, weight in model.state_dict().items():
            assert torch.equal(weight, before[key]), f"{name}: {key} changed"
    write_gguf(arch_models("llama"), tokenizer, tmp_path / "base.gguf", "f32")
    for name in ("truncated", "random", "empty"):
        with pytest.raises(ModelError, match="could not apply this LoRA adapter"):
            llamacpp.next_token_logits(tmp_path / "base.gguf", [[1, 2, 3]], threads=THREADS, lora=tmp_path / f"{name}.gguf")


def test_adapters_llama_cpp_cannot_apply_are_refused_with_the_way_out(arch_models, tokenizer, tmp_path):
    model = arch_models("llama")
    for options, message in [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save")]:
        with pytest.raises(ConfigError, match=message) as error:
            gguf_export.write_gguf_lora(with_lora(model, **options), "default", tmp_path / "lora.gguf")
        assert "--lora merged" in error.value.hint
    with pytest.raises(ConfigError, match="no LoRA named 'other'"):
        gguf_export.write_gguf_lora(with_lora(model), "other", tmp_path / "lora.gguf")


def test_a_lora_for_another_base_is_refused_by_llama_cpp_with_a_clear_error(arch_models, tokenizer, tmp_path):
    write_gguf(arch_models("llama"), tokenizer, tmp_path / "base.gguf", "f32")
    gguf_export.write_gguf_lora(with_lora(arch_models("qwen2")), "default", tmp_path / "lora.gguf")
    with pytest.raises(ModelError, match="could not apply this LoRA adapter"):
        llamacpp.next_token_logits(tmp_path / "base.gguf", [[1, 2, 3]], threads=THREADS, lora=tmp_path / "lora.gguf")
    with pytest.raises(ModelError, match="no such GGUF LoRA adapter"):
        llamacpp.next_token_logits(tmp_path / "base.gguf", [[1, 2, 3]], threads=THREADS, lora=tmp_path / "none.gguf")


# ---- the pre-tokenizer: llama.cpp must split text exactly as the HF tokenizer ---------------------------------

TOKENIZER_TEXTS = [
    "Hello, World! I've been told he's there; 'RE you sure? We'Ve a'lL",
    "3 33 333 3333 33333 3.3 3..3 1,000,000 2024-11-29 0x1F",
    "héllo ünïcode ✅ 🦙🦙 我想在apple工作1314151天 нещо на Български",
    "\t\ttabs  and   spaces\n\n\nnewlines\r\n   ",
    "def f(x):\n    return x**2  # comment\n",
    "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1",
    "  leading and trailing   ",
    "CamelCase UPPER lower's ------======= ......!!!!!!??????",
    "",
]


def build_bpe_tokenizer(style: str):
    """A byte-level BPE trained here with the pre-tokenizer of one model family llama.cpp implements."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, processors, trainers
    from tokenizers import pre_tokenizers as pre
    from transformers import PreTrainedTokenizerFast

    if style == "gpt-2":
        return build_tiny_tokenizer()  # conftest's: tokenizers' ByteLevel defaults
    tok = Tokenizer(models.BPE(unk_token="<unk>", ignore_merges=style == "llama-bpe"))
    splits = {"llama-bpe": gguf_export._LLAMA3_REGEX, "qwen2": gguf_export._QWEN2_REGEX,
              "gpt-4o": gguf_export._GPT4O_REGEX}
    if style == "smollm":
        tok.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre.Sequence([pre.Split(Regex(splits[style]), behavior="isolated", invert=False),
                                          pre.ByteLevel(add_prefix_space=False, use_regex=False)])
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS + TOKENIZER_TEXTS * 10, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def mismatching_texts(path, tokenizer) -> list[int]:
    with llamacpp.load_llama(path, n_ctx=64) as runner:
        return [n for n, text in enumerate(TOKENIZER_TEXTS) if runner.tokenize(text) != tokenizer(text)["input_ids"]]


@pytest.mark.parametrize("style", ["gpt-2", "smollm", "llama-bpe", "qwen2", "gpt-4o"])
def test_llama_cpp_tokenizes_like_the_hf_tokenizer_and_would_not_with_the_default_pre(style, tmp_path, monkeypatch):
    tokenizer = build_bpe_tokenizer(style)
    assert bpe_pre_tokenizer(tokenizer) == style
    model = build_tiny_model(tokenizer)
    write_gguf(model, tokenizer, tmp_path / "right.gguf", "f16")
    assert mismatching_texts(tmp_path / "right.gguf", tokenizer) == []

    # the same file with llama.cpp's "default" pre-tokenizer (what this writer used to write) splits wrongly
    monkeypatch.setattr(gguf_export, "bpe_pre_tokenizer", lambda _: "default")
    write_gguf(model, tokenizer, tmp_path / "default.gguf", "f16")
    assert mismatching_texts(tmp_path / "default.gguf", tokenizer) != []


@pytest.mark.parametrize("change, message", [
    ("prefix_space", "no pre-tokenizer matching"),
    ("whitespace", "no pre-tokenizer matching"),
    ("byte_fallback", "byte fallback"),
    ("wordpiece", "this one is WordPiece"),
    ("lowercase", "normalizes text with Lowercase"),
    ("merges", "ignore_merges=False"),
])
def test_tokenizers_llama_cpp_cannot_split_alike_are_refused(change, message, tmp_path):
    from tokenizers import Tokenizer, models, normalizers
    from tokenizers import pre_tokenizers as pre
    from transformers import PreTrainedTokenizerFast

    base = build_bpe_tokenizer("llama-bpe" if change == "merges" else "gpt-2")
    backend = base.backend_tokenizer
    if change == "prefix_space":
        backend.pre_tokenizer = pre.ByteLevel(add_prefix_space=True)
    elif change == "whitespace":
        backend.pre_tokenizer = pre.Whitespace()
    elif change == "lowercase":
        backend.normalizer = normalizers.Lowercase()
    elif change == "merges":
        backend.model = models.BPE(vocab=backend.get_vocab(), merges=[], ignore_merges=False)
    elif change in ("byte_fallback", "wordpiece"):
        model = (models.BPE(vocab={"a": 0, "<unk>": 1}, merges=[], byte_fallback=True, unk_token="<unk>")
                 if change == "byte_fallback" else models.WordPiece(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
        backend = Tokenizer(model)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>")
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        write_gguf(build_tiny_model(base), tokenizer, tmp_path / "m.gguf", "f16")
    assert "convert_hf_to_gguf.py" in str(error.value) or "GGUF base model" in str(error.value)


def test_a_tokenizer_larger_than_the_model_is_refused(tokenizer, tmp_path):
    import transformers as tf

    small = tf.LlamaForCausalLM(tf.LlamaConfig(**_common(tokenizer, vocab_size=len(tokenizer) - 10,
                                                         hidden_size=32, intermediate_size=64)))
    with pytest.raises(ConfigError, match="resize the model's embeddings"):
        write_gguf(small, tokenizer, tmp_path / "m.gguf", "f16")


# ---- the llama.cpp helpers export.py and the benchmarks call ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_gguf(build_arch_model("qwen3", tokenizer), tokenizer, path, "f32")
    return path


def test_greedy_answers_stop_on_the_given_ids_and_take_ids_or_text(tiny_gguf, tokenizer):
    ids = [tokenizer(line)["input_ids"] for line in GOLDEN]
    free = llamacpp.greedy_answers(tiny_gguf, ids, 6, stop_ids=[])
    assert all(len(tokens) == 6 and not stopped for tokens, stopped in free)
    assert llamacpp.greedy_answers(tiny_gguf, GOLDEN, 6, stop_ids=[]) == free
    first = free[0][0][0]
    stopped = llamacpp.greedy_answers(tiny_gguf, ids[:1], 6, stop_ids=[first])
    assert stopped == [([first], True)]
    third = free[1][0][2]
    until = free[1][0].index(third) + 1  # it stops at the first time the stop id comes
    assert llamacpp.greedy_answers(tiny_gguf, ids[1:2], 6, stop_ids={third}) == [(free[1][0][:until], True)]
    with llamacpp.load_llama(tiny_gguf, n_ctx=64) as runner:  # default stops: the file's end-of-generation ids
        assert runner.is_end_of_generation(tokenizer.eos_token_id)
        assert not runner.is_end_of_generation(first) or first == tokenizer.eos_token_id
    assert llamacpp.greedy_answers(tiny_gguf, [], 4) == []


def test_bad_prompts_and_files_get_errors_that_say_what_to_do(tiny_gguf, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        llamacpp.greedy_answers(tiny_gguf, [[1, len(tokenizer) + 5]], 4)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        llamacpp.greedy_answers(tiny_gguf, [[-1]], 4)
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        llamacpp.greedy_answers(tiny_gguf, [[1], []], 4)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        llamacpp.greedy_answers(tiny_gguf, [[1]], 0)
    with pytest.raises(ModelError, match="no such GGUF file"):
        llamacpp.tokenize(tmp_path / "missing.gguf", "x")
    (tmp_path / "garbage.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelError, match="could not load"):
        llamacpp.greedy_answers(tmp_path / "garbage.gguf", [[1]], 2)
    with pytest.raises(ModelError, match="could not quantize"):
        llamacpp.quantize_gguf(tmp_path / "garbage.gguf", tmp_path / "out.gguf", "q4_k_m")
    with pytest.raises(ConfigError, match="q4_k_m"):
        llamacpp.quantize_gguf(tiny_gguf, tmp_path / "out.gguf", "q2_k")


def test_throughput_is_measured_one_at_a_time_and_batched_on_the_same_work(tiny_gguf, tokenizer):
    ids = [tokenizer(line)["input_ids"] for line in GOLDEN] * 2
    result = llamacpp.measure_throughput(tiny_gguf, ids, max_new_tokens=5, parallel=3, threads=2)
    for mode in ("one_at_a_time", "batched"):
        assert result[mode]["tokens"] == len(ids) * 5 and result[mode]["tokens_per_s"] > 0
    assert 0.0 <= result["batched_equal_share"] <= 1.0 and result["parallel"] == 3
    print(result)
    with pytest.raises(ConfigError, match="parallel"):
        llamacpp.measure_throughput(tiny_gguf, ids, max_new_tokens=5, parallel=0)


# ---- Ollama Modelfile ----------------------------------------------------------------------------------------------


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as Ollama's parser reads them: bare words, or \"\"\"verbatim\"\"\" values."""
    pattern = re.compile(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER \w+) ("""(.*?)"""|\S+)$', re.MULTILINE | re.DOTALL)
    commands = [(m.group(1), m.group(3) if m.group(3) is not None else m.group(2)) for m in pattern.finditer(text)]
    assert sum(len(m.group(0)) + 1 for m in pattern.finditer(text)) == len(text), "unparsed text in the Modelfile"
    return commands


PROMPTS = ["081109 INFO dfs.DataNode: Receiving", 'hostile {{ .System }} {{ end }} }} "quotes" \\ ', "a\n\nb\t✅",
           "{{"]


def _ollama_prompt(commands, text: str, bos: str) -> str:
    values = dict((k, v) for k, v in commands if k in ("TEMPLATE", "SYSTEM"))
    return render_template(values["TEMPLATE"], system=values.get("SYSTEM", ""), prompt=text, bos=bos)


def test_modelfile_renders_the_builtin_prompt_byte_for_byte_and_llama_cpp_gets_the_same_tokens(tokenizer, tmp_path):
    write_gguf(build_tiny_model(tokenizer), tokenizer, tmp_path / "model-f16.gguf", "f16")
    template = PromptTemplate.for_tokenizer(tokenizer, INSTRUCTION)
    assert template.kind == "builtin"
    commands = parse_modelfile(write_modelfile(tmp_path, "model-f16.gguf", template).read_text())
    assert commands[0] == ("FROM", "./model-f16.gguf")
    assert ("SYSTEM", INSTRUCTION) in commands
    assert {v for k, v in commands if k == "PARAMETER stop"} == {"<eos>", "\n### "}
    assert ("PARAMETER temperature", "0") in commands
    with llamacpp.load_llama(tmp_path / "model-f16.gguf", n_ctx=256) as runner:
        for text in PROMPTS:
            rendered = _ollama_prompt(commands, text, bos="")
            assert rendered == template.render_prompt(text)
            assert runner.tokenize(rendered) == template.encode_prompt(text, tokenizer)  # BOS added by the runtime


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ '{{literal}}' }}\n{{ m['content'] }}"
                 "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_modelfile_renders_a_chat_prompt_byte_for_byte_without_a_second_bos(tokenizer, tmp_path):
    chat = build_tiny_tokenizer()
    chat.chat_template = CHAT_TEMPLATE
    write_gguf(build_tiny_model(chat), chat, tmp_path / "m.gguf", "f32")
    template = PromptTemplate.for_tokenizer(chat, "Classify {{ .Prompt }} this.")
    assert template.kind == "chat"
    commands = parse_modelfile(write_modelfile(tmp_path, "m.gguf", template, stop_strings=["<|end|>"],
                                               params={"num_ctx": 2048, "temperature": 0.2},
                                               tokenizer=chat).read_text())
    go = dict(commands)["TEMPLATE"]
    assert not go.startswith("<bos>")  # llama.cpp adds BOS itself (the file says so)
    assert {v for k, v in commands if k == "PARAMETER stop"} == {"<eos>", "<|end|>"}
    assert ("PARAMETER temperature", "0.2") in commands and ("PARAMETER num_ctx", "2048") in commands
    with llamacpp.load_llama(tmp_path / "m.gguf", n_ctx=256) as runner:
        for text in PROMPTS:
            rendered = _ollama_prompt(commands, text, bos="<bos>")
            assert rendered == template.render_prompt(text, chat)
            assert runner.tokenize(rendered[len("<bos>"):]) == template.encode_prompt(text, chat)  # BOS: runtime


@pytest.mark.parametrize("instruction, message", [
    ('say """hi""" now', "quote run"),
    ("ends with a quote\"", "quote run"),
    ("bell \x07 char", "characters Ollama's Modelfile parser drops"),
    ("zero\u200bwidth", "characters Ollama's Modelfile parser drops"),
])
def test_modelfile_refuses_values_ollama_would_parse_differently(instruction, message, tokenizer, tmp_path):
    write_gguf(build_tiny_model(tokenizer), tokenizer, tmp_path / "m.gguf", "f16")
    template = PromptTemplate(kind="builtin", instruction=instruction, eos_token="<eos>")
    with pytest.raises(ConfigError, match=re.escape(message)):
        write_modelfile(tmp_path, "m.gguf", template)
    assert not (tmp_path / "Modelfile").exists()


def test_modelfile_refuses_prompt_formats_and_arguments_it_cannot_reproduce(tokenizer, tmp_path):
    write_gguf(build_tiny_model(tokenizer), tokenizer, tmp_path / "m.gguf", "f16")
    twice = build_tiny_tokenizer()
    twice.chat_template = "{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}{% endfor %}"
    chat = PromptTemplate.for_tokenizer(twice, "")
    with pytest.raises(ConfigError, match="place the input text once"):
        write_modelfile(tmp_path, "m.gguf", chat, tokenizer=twice)
    upper = build_tiny_tokenizer()
    upper.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ConfigError, match="could not be written as an Ollama template that renders the same"):
        write_modelfile(tmp_path, "m.gguf", PromptTemplate.for_tokenizer(upper, ""), tokenizer=upper)
    with pytest.raises(ConfigError, match="needs the tokenizer"):
        write_modelfile(tmp_path, "m.gguf", chat)
    builtin = PromptTemplate.for_tokenizer(tokenizer, INSTRUCTION)
    for name in ("../m.gguf", "missing.gguf", str(tmp_path / "m.gguf")):
        with pytest.raises(ConfigError, match="no GGUF file of that name"):
            write_modelfile(tmp_path, name, builtin)
    with pytest.raises(ConfigError, match="lowercase words"):
        write_modelfile(tmp_path, "m.gguf", builtin, params={"Top K": 1})
    with pytest.raises(ConfigError, match="a number, a bool or a string"):
        write_modelfile(tmp_path, "m.gguf", builtin, params={"stop": ["a"]})
    assert not (tmp_path / "Modelfile").exists()


def test_a_conversion_parses_the_gguf_once_and_gives_what_transformers_reads(arch_models, tokenizer, tmp_path,
                                                                              monkeypatch):
    """transformers reads the file for the tokenizer's config, the tokenizer and the weights; convert_gguf parses it
    once for all three, and the folder it writes holds the model transformers reads from the file directly."""
    import gguf
    from transformers import AutoModelForCausalLM

    from specialist.models import convert_gguf

    model = arch_models("qwen2")
    path = tmp_path / "qwen2.gguf"
    write_gguf(model, tokenizer, path, "f32")
    parses = []
    original = gguf.GGUFReader

    def counting(*args, **kwargs):
        parses.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    convert_gguf(path, tmp_path / "converted")
    assert len(parses) == 1
    assert gguf.GGUFReader is counting  # the sharing ends with the conversion
    ids = torch.tensor([tokenizer(GOLDEN[0])["input_ids"]])
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="qwen2.gguf").eval()
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "converted").eval()
    with torch.inference_mode():
        assert torch.equal(direct(ids).logits, converted(ids).logits)


def test_the_shared_reader_is_put_back_when_a_conversion_fails(tmp_path):
    import gguf

    from specialist.models import gguf_parsed_once

    original = gguf.GGUFReader
    with pytest.raises(RuntimeError, match="corrupt"), gguf_parsed_once():
        assert gguf.GGUFReader is not original
        raise RuntimeError("corrupt")
    assert gguf.GGUFReader is original
