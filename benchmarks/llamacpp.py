"""The llama.cpp side of benchmarks/decode.py: the SentencePiece tokenizer llama.cpp's GGUF converter
needs, conversion of the benchmark checkpoint with llama.cpp's own `convert_hf_to_gguf.py` at f32,
bf16 and q8_0 (cached beside the checkpoint), and batch-1 prefill / greedy decode timing through
llama-cpp-python. None of these packages is a moekit dependency; without them the benchmark prints
how to set them up.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

OUTTYPES = ("f32", "bf16", "q8_0")
# moekit / transformers dtype -> the GGUF type of the same precision (q8_0 has no torch twin).
SAME_PRECISION = {"float32": "f32", "bfloat16": "bf16"}
CONVERTER = "convert_hf_to_gguf.py"
# Where the converter sits in the unpacked llama-cpp-python sdist, or in a llama.cpp checkout.
CONVERTER_PLACES = (Path("vendor/llama.cpp") / CONVERTER, Path(CONVERTER))
# import name -> what to pip install: llama.cpp itself, and what the converter and the
# SentencePiece -> tokenizer.json conversion (transformers) read the tokenizer with.
MODULES = {"llama_cpp": "llama-cpp-python==0.3.36", "sentencepiece": "sentencepiece",
           "google.protobuf": "protobuf"}

# Decode tokens/s measured in issue 11 (not by this benchmark): a random Mixtral-shaped model as
# built here, 32-token prompt then 128 greedy tokens, batch 1, 2 threads, median of 3.
ISSUE_LLAMA_CPP = {"f32": 140, "bf16": 337, "q8_0": 464}
ISSUE_OTHERS = {"transformers fp32": 34, "transformers bf16": 61}

SETUP = """\
To time llama.cpp beside moekit (llama-cpp-python, sentencepiece and protobuf are benchmark-only,
not moekit dependencies):
  pip install llama-cpp-python==0.3.36 sentencepiece protobuf   # builds llama.cpp: 10-20+ min on 2 cores
  pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36   # the sdist holds the converter
  tar xzf llama_cpp_python-0.3.36.tar.gz
  python benchmarks/decode.py --llama-cpp-src llama_cpp_python-0.3.36 ...   # or export LLAMA_CPP_SRC
The benchmark then gives its checkpoint a SentencePiece tokenizer (the converter needs one), converts
it to GGUF at f32, bf16 and q8_0 with vendor/llama.cpp/convert_hf_to_gguf.py (cached beside the
checkpoint) and times each in the same run."""


def gguf_path(folder: Path, outtype: str) -> Path:
    """Where the GGUF of `folder` at `outtype` is cached: beside the checkpoint."""
    if outtype not in OUTTYPES:
        raise ValueError(f"GGUF type {outtype!r} is not one of {OUTTYPES}")
    return folder / f"model-{outtype}.gguf"


def find_converter(src: Path | None) -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py under `src` (else $LLAMA_CPP_SRC): the unpacked
    llama-cpp-python sdist or a llama.cpp checkout. None when neither is given; FileNotFoundError
    when the given folder has no converter."""
    if src is None:
        env = os.environ.get("LLAMA_CPP_SRC")
        if not env:
            return None
        src = Path(env)
    for place in CONVERTER_PLACES:
        if (src / place).is_file():
            return src / place
    raise FileNotFoundError(
        f"{src} holds no {CONVERTER} (looked for {', '.join(str(p) for p in CONVERTER_PLACES)}): pass "
        f"--llama-cpp-src (or LLAMA_CPP_SRC) the folder the llama-cpp-python sdist unpacks to")


def missing_packages() -> list[str]:
    """pip names of the benchmark-only packages that do not import here."""
    def importable(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a missing parent package (google for google.protobuf)
            return False
    return [pip for name, pip in MODULES.items() if not importable(name)]


def needs_conversion(gguf: Path, sources: list[Path]) -> bool:
    """True when the cached GGUF is missing or older than any file it was converted from."""
    return not gguf.is_file() or any(s.stat().st_mtime > gguf.stat().st_mtime for s in sources if s.is_file())


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy generations share before they first differ."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def training_lines() -> list[str]:
    """Text to train the tokenizer on that every Python install has: its standard library's
    top-level modules (deterministic for one Python version)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [line for f in sorted(stdlib.glob("*.py")) for line in f.read_text(errors="ignore").splitlines()
            if line.strip()]


def write_sentencepiece_tokenizer(folder: Path, vocab: int) -> None:
    """Train a `vocab`-piece SentencePiece BPE (byte fallback, so any id sequence decodes) and
    write it as tokenizer.model (for the GGUF converter) and, converted by transformers, as
    tokenizer.json + tokenizer_config.json (for moekit and transformers), replacing the
    checkpoint's word-level tokenizer. The weights are untouched."""
    import sentencepiece as spm
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tokenizer.model"
        with model.open("wb") as out:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(training_lines()), model_writer=out,
                                           vocab_size=vocab, model_type="bpe", byte_fallback=True,
                                           character_coverage=1.0, num_threads=1, minloglevel=2)
        tok = transformers.LlamaTokenizer.from_pretrained(tmp, legacy=False)
        if len(tok) != vocab:
            raise ValueError(f"the trained SentencePiece tokenizer has {len(tok)} tokens, the model {vocab}")
        tok.save_pretrained(folder)
        (folder / "tokenizer.model").write_bytes(model.read_bytes())


def convert(folder: Path, outtype: str, converter: Path) -> Path:
    """The GGUF of `folder` at `outtype`, converted with llama.cpp's converter (this interpreter, a
    subprocess) unless a cached one is newer than the checkpoint. Written under a temporary name
    and renamed, so a failed conversion leaves no half file."""
    out = gguf_path(folder, outtype)
    sources = [*folder.glob("*.safetensors"), folder / "config.json", folder / "tokenizer.model"]
    if not needs_conversion(out, sources):
        return out
    tmp = out.with_name(out.name + ".part")
    t = time.perf_counter()
    done = subprocess.run([sys.executable, str(converter), str(folder), "--outtype", outtype,
                           "--outfile", str(tmp)], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{converter} failed on {folder} at {outtype} (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    tmp.replace(out)
    print(f"converted {folder} to {out.name} in {time.perf_counter() - t:.0f} s ({out.stat().st_size / 1e6:.0f} MB)")
    return out


def prepare(folder: Path, src: Path | None, *, vocab: int) -> dict[str, Path] | None:
    """GGUF path per type, converting what is not cached; None (after printing the setup steps and
    the issue's own figures) when llama.cpp, the converter or its tokenizer packages are missing."""
    missing, converter = missing_packages(), find_converter(src)
    if missing or converter is None:
        print(SETUP)
        print("missing here: " + ", ".join(missing + ([] if converter else ["--llama-cpp-src / LLAMA_CPP_SRC"])))
        print("llama.cpp decode tok/s as measured in issue 11 (its text, not this run): " + ", ".join(
            f"{k} {v}" for k, v in ISSUE_LLAMA_CPP.items()) + "; same measurement: " + ", ".join(
            f"{k} {v}" for k, v in ISSUE_OTHERS.items()))
        return None
    if not (folder / "tokenizer.model").is_file():
        write_sentencepiece_tokenizer(folder, vocab)
    return {t: convert(folder, t, converter) for t in OUTTYPES}


def load_gguf(path: Path, *, threads: int, n_ctx: int):
    """A llama_cpp.Llama on the CPU with `threads` threads for prompt and decode."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                           n_batch=min(n_ctx, 2048), n_gpu_layers=0, verbose=False)


def llama_speed(llm, ids: list[int], new: int) -> tuple[float, float, list[int]]:
    """(prompt tokens/s, decode tokens/s, tokens) of one greedy (temperature 0) generation of
    `new` tokens after the prompt `ids`, timed as moekit's `Generation`: the prompt up to the first
    token, then the remaining new - 1. The context is reset first, so the prompt is processed anew."""
    llm.reset()
    tokens: list[int] = []
    t = time.perf_counter()
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        tokens.append(token)
        if len(tokens) == 1:
            t_first = time.perf_counter()
        if len(tokens) == new:
            break
    t_done = time.perf_counter()
    return len(ids) / (t_first - t), (new - 1) / max(t_done - t_first, 1e-9), tokens
