"""Write CTranslate2 ``model.bin`` files as ctranslate2 4.8.5's converter does, for the loader's tests.

:func:`quantize` is ``LayerSpec._quantize`` and :func:`model_bin` is ``ModelSpec._serialize`` (both in
python/ctranslate2/specs/model_spec.py); tests/test_weights.py checks them byte for byte against ctranslate2's own.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from workers.weights import read_ct2_file

QUANTIZATIONS = ("float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16")
# numpy has no bfloat16: a bfloat16 array is held as its uint16 bits
_DTYPE_CODES = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "uint16": 5}
# the type each quantization gives the float variables it does not quantize
_FLOAT_OF = {"float32": "float32", "int16": "float32", "int8_float32": "float32", "float16": "float16",
             "int8_float16": "float16", "bfloat16": "bfloat16", "int8_bfloat16": "bfloat16", "int8": None}


def bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float -> bfloat16 rounded as torch does (ctranslate2 converts with torch), as uint16 bits."""
    return torch.from_numpy(np.asarray(array, np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _to_float(array: np.ndarray, dtype: str) -> np.ndarray:
    return bfloat16_bits(array) if dtype == "bfloat16" else array.astype(dtype)


def quantize(variables: dict[str, np.ndarray], quantization: str) -> dict[str, np.ndarray]:
    """ctranslate2's quantization of float variables. Every ``.../weight`` (in Whisper's spec each one has a
    ``weight_scale`` slot) becomes int8 with one scale per row (a conv weight's row is all its inputs and taps),
    int16 with one scale, or the float type; other float variables take the float type (plain int8 keeps theirs)."""
    out = {}
    for name, value in variables.items():
        if value.ndim == 0 or value.dtype.kind != "f":
            out[name] = value
        elif name.endswith("/weight") and quantization == "int16":
            value = value.astype(np.float32)
            scale = np.float32(2**10 / np.amax(np.absolute(value)))
            out[name] = np.clip(np.rint(value * scale), -(2**15), 2**15 - 1).astype(np.int16)
            out[f"{name}_scale"] = np.asarray(scale)
        elif name.endswith("/weight") and quantization.startswith("int8"):
            rows = value.astype(np.float32).reshape(len(value), -1)
            amax = np.amax(np.absolute(rows), axis=1)
            amax[amax == 0] = 127.0
            amax = np.maximum(amax, np.float32(127) / np.finfo(np.float32).max)
            scale = 127.0 / amax
            out[name] = np.rint(rows * scale[:, None]).astype(np.int8).reshape(value.shape)
            out[f"{name}_scale"] = scale
        elif name.endswith("/weight"):
            out[name] = _to_float(value, quantization)
        else:
            out[name] = value if _FLOAT_OF[quantization] is None else _to_float(value, _FLOAT_OF[quantization])
    return out


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<H", len(data) + 1) + data + b"\0"


def model_bin(variables: dict[str, np.ndarray], aliases: dict[str, str], *, version: int = 6,
              spec: str = "WhisperSpec", revision: int = 3) -> bytes:
    """The bytes of a ``model.bin``: variables in name order, then the aliases (alias -> variable name)."""
    out = [struct.pack("<I", version), _string(spec), struct.pack("<II", revision, len(variables))]
    for name, value in sorted(variables.items()):
        out += [_string(name), struct.pack(f"<B{value.ndim}I", value.ndim, *value.shape),
                struct.pack("<BI", _DTYPE_CODES[value.dtype.name], value.nbytes), value.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in sorted(aliases.items()):
        out += [_string(alias), _string(target)]
    return b"".join(out)


WHISPER_ALIASES = {"decoder/projection/weight": "decoder/embeddings/weight"}  # Whisper ties its output projection
_ENGLISH_EOT = 50256  # English-only vocabularies have one text token fewer: the multilingual ones' eot is 50257


def multilingual_model_dir(source: Path, path: Path) -> Path:
    """A multilingual CTranslate2 Whisper made of an English-only one (tiny.en): its vocabulary gets the one more text
    token a multilingual vocabulary has (the empty string, which ctranslate2 reads as the mark of a multilingual
    model), as a zero row of the embeddings at 50256, and every special token moves up by one; the language and task
    tokens an English-only vocabulary already holds take their multilingual places. It transcribes English about as
    the source model does, but the source was never trained on languages or tasks: what it detects is arbitrary
    and its "translation" is a transcript. Mechanics to test, not quality to measure."""
    sot = _ENGLISH_EOT + 2  # after the added text token and end-of-text
    languages, tasks = range(sot + 1, sot + 1 + 99), [sot + 100, sot + 101]  # tiny's 99, <|en|> to <|su|>; translate, transcribe
    _, variables = read_ct2_file(source / "model.bin")
    variables = {name: value for name, value in variables.items() if name not in WHISPER_ALIASES}
    embeddings = variables["decoder/embeddings/weight"]
    embeddings = np.insert(embeddings, _ENGLISH_EOT, np.zeros(embeddings.shape[1], embeddings.dtype), axis=0).astype(np.float32)
    # tiny.en never saw a language or task token, and after untrained ones it writes nothing: each is made
    # start-of-transcript's embedding, which it knows, plus a little seeded noise that tells the languages apart
    noise = np.random.default_rng(0).standard_normal((len(languages) + len(tasks), embeddings.shape[1]), np.float32)
    embeddings[[*languages, *tasks]] = embeddings[sot] + 0.1 * embeddings.std() * noise
    variables["decoder/embeddings/weight"] = embeddings.astype(variables["decoder/embeddings/weight"].dtype)
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.bin").write_bytes(model_bin(variables, WHISPER_ALIASES))

    shifted = lambda token: token + 1 if token >= _ENGLISH_EOT else token  # noqa: E731
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    vocab = {token: shifted(i) for token, i in tokenizer["model"]["vocab"].items()}
    tokenizer["model"]["vocab"] = {**vocab, "": _ENGLISH_EOT}
    for added in tokenizer["added_tokens"]:
        added["id"] = shifted(added["id"])
    for template in (tokenizer.get("post_processor") or {}).get("special_tokens", {}).values():
        template["ids"] = [shifted(i) for i in template["ids"]]
    (path / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))

    lines = (source / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    (path / "vocabulary.txt").write_text("\n".join([*lines[:_ENGLISH_EOT], "", *lines[_ENGLISH_EOT:]]), encoding="utf-8")

    config = json.loads((source / "config.json").read_text())
    config["suppress_ids"] = sorted({shifted(i) for i in config["suppress_ids"]} | {_ENGLISH_EOT})
    config["suppress_ids_begin"] = [shifted(i) for i in config["suppress_ids_begin"]]
    config["lang_ids"] = list(languages)
    (path / "config.json").write_text(json.dumps(config))
    return path
