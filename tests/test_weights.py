"""workers.weights loads every CTranslate2 Whisper quantization as ctranslate2 itself runs it, and refuses a
broken or foreign file with a ModelFormatError that names the problem.

The files are made here from the embedded tiny.en weights by tests/ct2_files.py, which is checked byte for byte
against ctranslate2 4.8.5's own converter; ctranslate2 then loads the same directories as the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import ctranslate2
import numpy as np
import pytest
import torch
from ctranslate2.specs import model_spec, whisper_spec

from app.audio import decode_audio
from loadtest.evalset import normalize, word_error_rate
from tests.conftest import JFK
from tests.ct2_files import QUANTIZATIONS, model_bin, quantize
from workers.decoding import DecodeRow, DecodingOptions
from workers.features import LogMelSpectrogram
from workers.packing import PassInput
from workers.runner import ModelRunner, embedded_model_path
from workers.weights import ModelFormatError, load_whisper, read_ct2_file

EMBEDDED = embedded_model_path()
ALIASES = {"decoder/projection/weight": "decoder/embeddings/weight"}  # Whisper ties its output projection
# Ours against ctranslate2 computing in float32 from the same file: only the kernels' rounding differs (seen: 2e-6).
SAME_WEIGHTS = 1e-4
# Against ctranslate2's int8 compute, which also quantizes the activations (seen: 4e-2).
INT8_COMPUTE = 0.1


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def tiny_en_spec() -> whisper_spec.WhisperSpec:
    """ctranslate2's WhisperSpec filled with the embedded weights, as its converter fills one before quantizing."""
    _, stored = read_ct2_file(EMBEDDED / "model.bin")
    spec = whisper_spec.WhisperSpec(num_encoder_layers=4, num_encoder_heads=6, num_decoder_layers=4, num_decoder_heads=6)
    for name, value in stored.items():
        if value.ndim:  # the scalars are the spec's own
            scope, attr = name.rsplit("/", 1)
            setattr(model_spec.index_spec(spec, scope), attr, value.copy())
    spec.register_vocabulary((EMBEDDED / "vocabulary.txt").read_text().splitlines())
    spec.validate()
    return spec


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, np.ndarray]:
    """The float16 tiny.en variables with ctranslate2 4.8.5's metadata (it writes switches the embedded file's older
    converter did not), the projection left to its alias."""
    return {name: np.asarray(v.numpy()) for name, v in tiny_en_spec().variables().items() if name not in ALIASES}


def write_model_dir(path: Path, data: bytes) -> Path:
    (path / "model.bin").write_bytes(data)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (path / name).symlink_to(EMBEDDED / name)
    return path


@pytest.fixture(scope="module")
def speech() -> torch.Tensor:
    """The log-mel window both implementations encode: JFK's 11 s of speech."""
    return LogMelSpectrogram(80)(torch.from_numpy(decode_audio(JFK.read_bytes(), 60)))


def ct2_encode(model_dir: Path, compute_type: str, speech: torch.Tensor) -> tuple[ctranslate2.models.Whisper, np.ndarray]:
    """ctranslate2's Whisper on ``model_dir`` (its ``compute_type`` says what it chose) and its encoder output."""
    whisper = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type=compute_type)
    return whisper, np.array(whisper.encode(ctranslate2.StorageView.from_array(speech.numpy()[None])))[0]


def our_run(runner: ModelRunner, speech: torch.Tensor) -> tuple[np.ndarray, str]:
    encoded = runner.encode([PassInput.alone(speech)])
    decoder, row = runner.new_decoder(), DecodeRow(prompt=runner.tokenizer.sot_sequence(None))
    decoder.add([row], encoded)
    while decoder.running:
        decoder.step()
    return encoded[0].numpy(), runner.tokenizer.decode(row.tokens)


@pytest.mark.parametrize("quantization", ["float16", "int8", "int8_bfloat16", "int16"])
def test_the_writer_writes_what_ctranslate2_writes(tmp_path: Path, checkpoint: dict, quantization: str) -> None:
    """These four take every branch of ctranslate2's quantization: int8 and int16 weights; float16, bfloat16 and
    float32 for the rest; plain int8 keeping the checkpoint's float type. ctranslate2 finds the alias itself."""
    spec = tiny_en_spec()
    spec.optimize(quantization)
    spec._serialize(str(tmp_path / "model.bin"))
    assert (tmp_path / "model.bin").read_bytes() == model_bin(quantize(checkpoint, quantization), ALIASES)
    (tmp_path / "model.bin").unlink()


@pytest.fixture(scope="module", params=QUANTIZATIONS)
def quantized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              checkpoint: dict) -> Iterator[tuple[str, Path]]:
    """A model directory as ``ct2-transformers-converter --quantization <param>`` writes it."""
    quantization = request.param
    model_dir = write_model_dir(tmp_path_factory.mktemp(quantization), model_bin(quantize(checkpoint, quantization), ALIASES))
    yield quantization, model_dir
    (model_dir / "model.bin").unlink()


def test_every_quantization_runs_as_ctranslate2_runs_it(quantized: tuple[str, Path], speech: torch.Tensor) -> None:
    quantization, model_dir = quantized
    runner = ModelRunner(model_dir, torch.device("cpu"), DecodingOptions())
    ours, our_text = our_run(runner, speech)
    whisper, theirs = ct2_encode(model_dir, "default", speech)
    compute_type = whisper.compute_type
    prompt = runner.tokenizer.sot_sequence(None)
    their_tokens = whisper.generate(ctranslate2.StorageView.from_array(theirs[None]), [prompt], beam_size=1)[0].sequences_ids[0]
    their_text = runner.tokenizer.decode(their_tokens)
    # asked to compute in float32, ctranslate2 dequantizes the weights as the loader does
    same_weights = theirs if compute_type == "float32" else ct2_encode(model_dir, "float32", speech)[1]
    figures = (f"{quantization}: ctranslate2 {compute_type}, relative error {relative_error(ours, theirs):.2e}, "
               f"{relative_error(ours, same_weights):.2e} vs its float32; ours {our_text!r}, its {their_text!r}")
    print(figures)
    assert relative_error(ours, same_weights) < SAME_WEIGHTS, figures
    if compute_type == "float32":  # a float file: the same network
        assert normalize(our_text) == normalize(their_text), figures
    else:
        assert relative_error(ours, theirs) < INT8_COMPUTE, figures
        assert word_error_rate([their_text], [our_text]) <= 0.1, figures


def test_int8_read_without_its_scales_fails_the_bound(tmp_path: Path, checkpoint: dict, speech: torch.Tensor) -> None:
    """The loader before scales were read took int8 values for the weights. The bound above catches that."""
    int8 = quantize(checkpoint, "int8")
    unscaled = {name: v.astype(np.float32) if v.ndim else v for name, v in int8.items() if not name.endswith("_scale")}
    model_dir = write_model_dir(tmp_path, model_bin(unscaled, ALIASES))
    model, _ = load_whisper(model_dir, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        ours = model.encoder(speech[None])[0].numpy()
    (model_dir / "model.bin").write_bytes(model_bin(int8, ALIASES))
    _, theirs = ct2_encode(model_dir, "float32", speech)
    error = relative_error(ours, theirs)
    print(f"int8 without scales: relative error {error:.2f}")
    assert error > 1  # worse than an output of zeros, where the scaled load is within SAME_WEIGHTS
    (model_dir / "model.bin").unlink()


def retyped(data: bytes, name: str, code: int) -> bytes:
    """``data`` with the dtype code of the rank-1 variable ``name`` replaced."""
    header = (len(name) + 1).to_bytes(2, "little") + name.encode() + b"\0"
    at = data.index(header) + len(header) + 1 + 4  # rank byte, one u32 dim
    return data[:at] + bytes([code]) + data[at + 1 :]


def without(variables: dict, name: str) -> dict:
    return {n: v for n, v in variables.items() if n != name}


INT8_FFN = "encoder/layer_0/ffn/linear_0/weight"
GLU_FFN = "decoder/layer_0/ffn/linear_0_noact/weight"  # a gated FFN, as Llama-style decoders have
BROKEN: dict[str, tuple[Callable[[dict], bytes], str]] = {
    "unknown dtype code": (lambda c: retyped(model_bin(c, ALIASES), "encoder/conv1/bias", 9),
                           r"'encoder/conv1/bias' has unknown dtype code 9"),
    "missing scale": (lambda c: model_bin(without(quantize(c, "int8"), f"{INT8_FFN}_scale"), ALIASES),
                      rf"{INT8_FFN} is int8 but there is no {INT8_FFN}_scale"),
    "int16 with a scale per row": (
        lambda c: model_bin({**quantize(c, "int16"), "encoder/conv1/weight_scale": np.ones(384, np.float32)}, ALIASES),
        r"encoder/conv1/weight_scale has 384 values; int16 encoder/conv1/weight .* needs 1"),
    "extra variable": (lambda c: model_bin({**c, GLU_FFN: c["decoder/layer_0/ffn/linear_0/weight"]}, ALIASES),
                       rf"1 variables are not part of Whisper .*'{GLU_FFN}'"),
    "scale of a float weight": (lambda c: model_bin({**c, "encoder/conv1/weight_scale": np.ones(384, np.float32)}, ALIASES),
                                r"not part of Whisper .*'encoder/conv1/weight_scale'"),
    "truncated": (lambda c: model_bin(c, ALIASES)[:-1000], r"file ends early .*truncated"),
    "untied projection": (lambda c: model_bin({**c, "decoder/projection/weight": -c["decoder/embeddings/weight"]}, {}),
                          r"decoder/projection/weight is not decoder/embeddings/weight"),
    "another activation": (lambda c: model_bin({**c, "decoder/activation": np.asarray(np.int8(1))}, ALIASES),
                           r"decoder/activation is 1 where Whisper's is 3"),
    "newer revision": (lambda c: model_bin(c, ALIASES, revision=4), r"WhisperSpec revision 4 is newer"),
    "older binary version": (lambda c: model_bin(c, ALIASES, version=5), r"binary version 5 is too old"),
    "another spec": (lambda c: model_bin(c, ALIASES, spec="TransformerDecoderModelSpec"), r"not 'WhisperSpec'"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_or_foreign_file_is_refused_by_name(tmp_path: Path, checkpoint: dict, case: str) -> None:
    make, message = BROKEN[case]
    model_dir = write_model_dir(tmp_path, make(checkpoint))
    with pytest.raises(ModelFormatError, match=message):
        load_whisper(model_dir, torch.device("cpu"), torch.float32)
    (model_dir / "model.bin").unlink()
