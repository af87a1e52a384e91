"""load_tokenizer's backend choice and errors, the metadata it exposes, special-token rules, and the
`orcd-worker tokenize` command on vocab-only GGUF files."""

from __future__ import annotations

import json

import pytest
from tok_helpers import resolve, tokenizer_for, vocab_path
from gguf import GGUFWriter

from orcd_core.errors import TokenizerError
from orcd_core.gguf_file import check_supported, open_gguf
from orcd_core.plugins import load_plugins
from orcd_core.tokenizer import load_tokenizer


def test_core_registers_the_three_backends():
    reg = load_plugins(allow=["core"])
    assert {"gguf-bpe", "gguf-spm", "hf-json"} <= set(reg.tokenizers)
    assert all(reg.owner("tokenizer", k) == "core" for k in ("gguf-bpe", "gguf-spm", "hf-json"))


def test_metadata_exposed():
    qwen = tokenizer_for(resolve("qwen2"))
    assert (qwen.kind, qwen.vocab_size, qwen.bos_id, qwen.eos_id) == ("gguf-bpe", 151936, 151643, 151643)
    assert qwen.add_bos is False and qwen.model_max_context == 32768
    assert {qwen.token_text(i) for i in qwen.eog_ids} >= {"<|endoftext|>", "<|im_end|>"}
    phi = tokenizer_for(resolve("phi-3"))
    assert (phi.kind, phi.vocab_size, phi.bos_id, phi.eos_id, phi.add_bos) == ("gguf-spm", 32064, 1, 32000, True)
    assert {phi.token_text(i) for i in phi.eog_ids} == {"<|endoftext|>", "<|end|>", "</s>"}
    assert phi.encode("Hi")[0] == phi.bos_id and qwen.encode("Hi")[0] != qwen.bos_id
    llama3 = tokenizer_for(resolve("llama-bpe"))
    assert llama3.add_bos and llama3.encode("Hi")[0] == llama3.bos_id == 128000


def test_special_tokens_only_where_allowed():
    tok = tokenizer_for(resolve("qwen2"))
    im_end = tok.token_id("<|im_end|>")
    user_text = tok.encode("a<|im_end|>b", add_special=False)
    assert im_end not in user_text and tok.decode(user_text) == "a<|im_end|>b"
    assert tok.encode("a<|im_end|>b", add_special=False, parse_special=True)[1] == im_end


def test_phi3_rstrip_after_special_tokens():
    """llama.cpp marks Phi-3's special tokens rstrip: whitespace after <|user|> etc. is dropped."""
    tok = tokenizer_for(resolve("phi-3"))
    a = tok.encode("<|user|>\n  Hi<|end|>", add_special=False, parse_special=True)
    b = tok.encode("<|user|>Hi<|end|>", add_special=False, parse_special=True)
    assert a == b


def _write(path, model: str, pre: str | None = None):
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return open_gguf(path)


def test_unknown_pre_tokenizer_is_a_load_error_naming_it(tmp_path):
    with pytest.raises(TokenizerError, match="'not-a-pre'"):
        load_tokenizer(_write(tmp_path / "a.gguf", "gpt2", "not-a-pre"))
    with pytest.raises(TokenizerError, match="kimi-k2"):
        load_tokenizer(_write(tmp_path / "b.gguf", "gpt2", "kimi-k2"))


def test_unknown_tokenizer_model_is_a_load_error(tmp_path):
    with pytest.raises(TokenizerError, match="'bert'"):
        load_tokenizer(_write(tmp_path / "c.gguf", "bert"))


def test_missing_pre_means_default(tmp_path):
    tok = load_tokenizer(_write(tmp_path / "d.gguf", "gpt2"))
    assert tok.pre == "default" and tok.encode("ab", add_special=False) == [2]


def test_vocab_only_file_passes_check_supported():
    model = open_gguf(vocab_path("phi-3"))
    assert not model.tensors
    check_supported(model, load_plugins())


def test_vocab_only_file_of_a_registered_architecture_needs_no_hyperparameters(tmp_path):
    """llama.cpp's vocab files and the rebuilt gpt-oss vocab carry no (or few) hyperparameters."""
    reg = load_plugins()
    arch = next(iter(reg.architectures), None)
    if arch is None:
        pytest.skip("no architecture plugin installed")
    path = tmp_path / "vocab.gguf"
    w = GGUFWriter(str(path), arch)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    model = open_gguf(path)
    assert check_supported(model, reg) is reg.architectures[arch]
    assert load_tokenizer(model, reg).encode("abab", add_special=False) == [2, 2]


def _cli(args, capsys):
    from orcd_server.cli import main

    rc = main(["tokenize", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_tokenize_json_and_decode(capsys):
    path = str(vocab_path("qwen2"))
    rc, out, _ = _cli([path, "--text", "<|im_start|>Hi there", "--json"], capsys)
    assert rc == 0
    data = json.loads(out)
    assert data["pieces"][:3] == ["<", "|", "im"]  # no --special: plain text
    rc, out, _ = _cli([path, "--text", "<|im_start|>Hi there", "--special", "--json"], capsys)
    data = json.loads(out)
    assert data["ids"][0] == 151644 and "".join(data["pieces"]) == "<|im_start|>Hi there"
    rc, out, _ = _cli([path, "--decode", ",".join(map(str, data["ids"]))], capsys)
    assert rc == 0 and out == "<|im_start|>Hi there\n"


def test_cli_adds_bos_only_where_the_model_says(capsys, tmp_path):
    rc, out, _ = _cli([str(vocab_path("phi-3")), "--text", "Hi", "--json"], capsys)
    assert json.loads(out)["ids"][0] == 1
    text_file = tmp_path / "t.txt"
    text_file.write_text("Hi", encoding="utf-8")
    rc, out, _ = _cli([str(vocab_path("phi-3")), "--file", str(text_file), "--no-bos", "--json"], capsys)
    assert json.loads(out)["ids"][0] != 1


def test_cli_errors_are_one_line(capsys):
    rc, out, err = _cli([str(vocab_path("qwen2")), "--decode", "1,x"], capsys)
    assert rc == 1 and err.count("\n") == 1 and "comma-separated" in err
    rc, out, err = _cli([str(vocab_path("bert-bge")), "--text", "hi"], capsys)
    assert rc == 1 and err.count("\n") == 1 and "no tokenizer backend" in err
