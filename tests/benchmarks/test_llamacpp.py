"""The pure helpers of benchmarks/llamacpp.py (the llama.cpp side of benchmarks/decode.py): where a
GGUF is cached per type, finding llama.cpp's converter, when a cached GGUF is stale, greedy-token
agreement, and that a machine without llama.cpp gets the setup steps instead of a crash. The build,
conversion and timing themselves are benchmark work, not tests."""

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_llamacpp", ROOT / "benchmarks" / "llamacpp.py")
llamacpp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llamacpp)


def test_gguf_path_one_file_per_type_beside_the_checkpoint(tmp_path: Path) -> None:
    paths = {llamacpp.gguf_path(tmp_path, t) for t in llamacpp.OUTTYPES}
    assert len(paths) == len(llamacpp.OUTTYPES)
    assert all(p.parent == tmp_path and p.suffix == ".gguf" for p in paths)
    assert llamacpp.gguf_path(tmp_path, "q8_0").name == "model-q8_0.gguf"


def test_gguf_path_rejects_an_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="q4_k"):
        llamacpp.gguf_path(tmp_path, "q4_k")


def test_same_precision_maps_each_timed_dtype_to_a_converted_type() -> None:
    assert llamacpp.SAME_PRECISION == {"float32": "f32", "bfloat16": "bf16"}
    assert set(llamacpp.SAME_PRECISION.values()) < set(llamacpp.OUTTYPES)


@pytest.mark.parametrize("place", [pytest.param("vendor/llama.cpp/convert_hf_to_gguf.py", id="sdist"),
                                   pytest.param("convert_hf_to_gguf.py", id="llama.cpp-checkout")])
def test_find_converter_in_the_sdist_or_a_checkout(tmp_path: Path, place: str) -> None:
    (tmp_path / place).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / place).write_text("")
    assert llamacpp.find_converter(tmp_path) == tmp_path / place


def test_find_converter_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setenv("LLAMA_CPP_SRC", str(tmp_path))
    assert llamacpp.find_converter(None) == tmp_path / "convert_hf_to_gguf.py"
    monkeypatch.delenv("LLAMA_CPP_SRC")
    assert llamacpp.find_converter(None) is None


def test_find_converter_names_a_folder_without_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        llamacpp.find_converter(tmp_path)


def test_needs_conversion_when_missing_or_older_than_a_source(tmp_path: Path) -> None:
    gguf, weights = tmp_path / "model-f32.gguf", tmp_path / "model.safetensors"
    weights.write_text("w")
    assert llamacpp.needs_conversion(gguf, [weights])
    gguf.write_text("g")
    os.utime(weights, (1000, 1000))
    os.utime(gguf, (2000, 2000))
    assert not llamacpp.needs_conversion(gguf, [weights, tmp_path / "tokenizer.model"])  # absent: ignored
    os.utime(weights, (3000, 3000))
    assert llamacpp.needs_conversion(gguf, [weights])


@pytest.mark.parametrize("a, b, n", [
    pytest.param([5, 6, 7], [5, 6, 7], 3, id="equal"),
    pytest.param([5, 6, 7, 8], [5, 6, 9, 8], 2, id="differ-then-agree-again"),
    pytest.param([1], [2], 0, id="first-differs"),
    pytest.param([1, 2], [1, 2, 3], 2, id="shorter"),
])
def test_leading_agreement_counts_tokens_before_the_first_difference(a, b, n) -> None:
    assert llamacpp.leading_agreement(a, b) == n


def test_missing_packages_names_what_to_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def find_spec(name: str):
        if name == "google.protobuf":
            raise ModuleNotFoundError(name)  # what find_spec does when `google` itself is absent
        return None if name == "llama_cpp" else object()
    monkeypatch.setattr(llamacpp.importlib.util, "find_spec", find_spec)
    assert llamacpp.missing_packages() == ["llama-cpp-python==0.3.36", "protobuf"]


def test_prepare_without_llama_cpp_prints_the_setup_and_converts_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(llamacpp, "missing_packages", lambda: ["llama-cpp-python==0.3.36"])
    (tmp_path / "convert_hf_to_gguf.py").write_text("raise SystemExit('must not run')")
    assert llamacpp.prepare(tmp_path, tmp_path, vocab=32000) is None
    out = capsys.readouterr().out
    assert "pip install llama-cpp-python==0.3.36" in out and "missing here: llama-cpp-python" in out
    assert not list(tmp_path.glob("*.gguf")) and not (tmp_path / "tokenizer.model").exists()
