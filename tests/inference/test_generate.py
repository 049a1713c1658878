"""moekit.generate against transformers' greedy generate, token for token (fp32), on a tiny random
checkpoint of every decoder family; sampling, stop strings, EOS, chat templates, run folders."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

import moekit
from moekit.inference import load
from moekit.inference.generate import prompt_ids
from tests.hf.tiny import CASES
from tests.inference.tiny import DECODERS, save_tiny_with_tokenizer

# a prompt longer than every sliding window of the tiny configs (gpt_oss 4, mixtral-sliding 3)
PROMPT = "the quick brown fox"
NEW = 10
GREEDY_CASES = [*DECODERS, "mixtral-sliding", "deepseek_v3-yarn", "phimoe-longrope"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (checkpoint dir, transformers model, loaded moekit model), built once."""
    cache: dict[str, tuple] = {}

    def get(case: str) -> tuple:
        if case not in cache:
            model_type, overrides = CASES[case]
            path = tmp_path_factory.mktemp(case)
            hf_model = save_tiny_with_tokenizer(model_type, path, **overrides)
            cache[case] = (path, hf_model, load(path))
        return cache[case]

    return get


@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c in GREEDY_CASES])
@pytest.mark.parametrize("chunk", [pytest.param(512, id="one-prefill"), pytest.param(3, id="chunked-prefill")])
def test_greedy_equals_transformers(saved, case, chunk):
    _, hf_model, loaded = saved(case)
    ids = loaded.tokenizer.encode(PROMPT)
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW)[0, len(ids):].tolist()
    got = moekit.generate(loaded, PROMPT, max_new_tokens=NEW, temperature=0, prefill_chunk=chunk)
    assert got.prompt_ids == ids
    assert got.token_ids == want, case
    assert got.text == loaded.tokenizer.decode(want)


def test_seeded_sampling_is_reproducible(saved):
    _, _, loaded = saved("mixtral")
    runs = [moekit.generate(loaded, PROMPT, max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=20, seed=s)
            for s in (7, 7, 8)]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].token_ids != runs[2].token_ids  # 16 draws from a near-uniform 64-token model


def test_top_k_one_is_greedy(saved):
    _, _, loaded = saved("qwen3_moe")
    greedy = moekit.generate(loaded, PROMPT, max_new_tokens=8, temperature=0)
    top1 = moekit.generate(loaded, PROMPT, max_new_tokens=8, temperature=1.5, top_k=1, seed=3)
    assert top1.token_ids == greedy.token_ids


def test_stop_string_ends_and_is_cut(saved):
    _, _, loaded = saved("olmoe")
    full = moekit.generate(loaded, PROMPT, max_new_tokens=NEW, temperature=0)
    stop = full.text[4:6]
    cut = full.text[:full.text.find(stop)]
    streamed: list[str] = []
    got = moekit.generate(loaded, PROMPT, max_new_tokens=NEW, temperature=0, stop=[stop], on_text=streamed.append)
    assert got.finish_reason == "stop" and got.text == cut
    assert "".join(streamed) == cut
    assert full.finish_reason == "length" and len(full.token_ids) == NEW


def test_eos_ends_generation(saved):
    _, _, loaded = saved("qwen2_moe")
    full = moekit.generate(loaded, PROMPT, max_new_tokens=NEW, temperature=0)
    eos = full.token_ids[3]
    first = full.token_ids.index(eos)
    got = moekit.generate(dataclasses.replace(loaded, eos_ids=frozenset({eos})), PROMPT, max_new_tokens=NEW,
                          temperature=0)
    assert got.token_ids == full.token_ids[:first + 1] and got.finish_reason == "stop"


def test_chat_template_and_encoding_match_transformers(saved):
    path, _, loaded = saved("mixtral")
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert loaded.tokenizer.apply_chat_template(messages) == want
    assert loaded.tokenizer.encode(PROMPT) == hf_tok(PROMPT)["input_ids"]
    ids = prompt_ids(loaded, "hi there", chat=True)
    assert ids == hf_tok.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)


def test_missing_tokenizer_and_template_are_clear_errors(saved, tmp_path):
    path, _, loaded = saved("mixtral")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((path / f).read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load(bare)
    no_template = dataclasses.replace(loaded, tokenizer=dataclasses.replace(loaded.tokenizer, chat_template=None))
    with pytest.raises(ValueError, match="no chat template"):
        moekit.generate(no_template, "hi", chat=True, max_new_tokens=2)
    with pytest.raises(ValueError, match="beyond the context window"):
        moekit.generate(loaded, PROMPT, max_new_tokens=10_000)


def test_train_run_folder_generates(tmp_path):
    from moekit.train.run import build_model, save_final
    from moekit.train.tokenizer import train_tokenizer
    from tests.train.helpers import tiny_model_config

    texts = ["to be or not to be, that is the question"] * 20
    tokenizer = train_tokenizer(texts, vocab_size=300)
    config = tiny_model_config()
    model = build_model(config, seed=0).eval()
    save_final(model, config, tokenizer, tmp_path / "run" / "final")
    got = moekit.generate(tmp_path / "run", "to be", max_new_tokens=5, temperature=0)
    ids = tokenizer.encode("to be").ids
    with torch.no_grad():  # the same greedy tokens as a plain full-forward loop on the model
        seq = list(ids)
        for _ in range(len(got.token_ids)):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got.token_ids == seq[len(ids):]
    assert got.text == tokenizer.decode(got.token_ids)


def test_cli_generate_streams_then_reports_speed(saved, capsys):
    from moekit.cli import main

    path, _, loaded = saved("mixtral")
    want = moekit.generate(loaded, PROMPT, max_new_tokens=6, temperature=0)
    assert main(["generate", str(path), "--prompt", PROMPT, "--max-new-tokens", "6", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == PROMPT + want.text + "\n"
    assert "prompt tokens" in err and "generated tokens" in err and "tokens/s" in err
    assert main(["generate", str(path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", str(path), "--prompt", PROMPT, "--max-new-tokens", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "max_new_tokens=0" in err  # a refused request echoes no prompt before its error


@pytest.mark.parametrize("flags", [
    pytest.param(["--offload-experts", "--expert-cache", "1"], id="cache-below-one-expert"),
    pytest.param(["--expert-cache", "1MB"], id="cache-without-offload"),
])
def test_cli_generate_refuses_bad_offload_flags(saved, capsys, flags):
    from moekit.cli import main

    path, _, _ = saved("mixtral")
    assert main(["generate", str(path), "--prompt", PROMPT, "--max-new-tokens", "2", *flags]) == 2
    assert "expert" in capsys.readouterr().err


def test_cli_generate_offloaded_and_quantized(saved, capsys):
    """--offload-experts with a cache of one expert per layer prints the in-memory tokens, then the
    cache's counters; --quantize int8 runs the quantized experts."""
    from moekit.cli import main
    from moekit.inference.offload import make_format

    path, _, loaded = saved("mixtral")
    want = moekit.generate(loaded, PROMPT, max_new_tokens=6, temperature=0)
    moe = loaded.model.moe_layers()[0].config
    one_expert = make_format(moe, torch.float32, None).spec().nbytes * len(loaded.model.moe_layers())
    argv = ["generate", str(path), "--prompt", PROMPT, "--max-new-tokens", "6", "--temperature", "0"]
    assert main([*argv, "--offload-experts", "--expert-cache", str(one_expert)]) == 0
    out, err = capsys.readouterr()
    assert out == PROMPT + want.text + "\n"
    assert "expert cache:" in err and "misses" in err
    assert main([*argv, "--quantize", "int8"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith(PROMPT)
