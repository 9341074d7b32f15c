"""Read a CTranslate2 Whisper ``model.bin`` and map it onto :mod:`workers.model`.

The file layout (binary version 6, little-endian) is: ``u32`` version, a string (spec name),
``u32`` spec revision, ``u32`` variable count; each variable is a string (name), ``u8`` rank,
``rank`` x ``u32`` dims, ``u8`` dtype, ``u32`` byte count, raw data; then ``u32`` alias count and
pairs of strings (alias, target). A string is a ``u16`` byte length whose last byte is a NUL.

Quantized files (ctranslate2's ``--quantization`` int8*, int16) store each ``.../weight`` of a linear, embedding
or (since ctranslate2 4.2) conv layer as integers plus a float32 ``.../weight_scale``, ``int = round(float * scale)``:
int8 has one scale per output row, ``127 / max|row|``; int16 one per tensor, ``2**10 / max|weight|``. The other
float variables are float32, float16 or bfloat16 as the quantization names (plain int8 keeps the checkpoint's).
An alias of a quantized weight shares its scale.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import torch

from workers.model import ModelDimensions, Whisper

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BFLOAT16 = 5
_BINARY_VERSION = 6  # written since before ctranslate2 could convert Whisper
_NEWEST_REVISION = 3  # WhisperSpec's revision since ctranslate2 3.5

# Decoder switches ctranslate2 reads, as (its default when the file has none, the value workers.model hard-codes):
# a file whose switch differs describes another network.
_DECODER_SWITCHES = {"pre_norm": (1, 1), "scale_embeddings": (1, 0), "alibi": (0, 0), "start_from_zero_embedding": (0, 0)}
# Revision 3 renumbered the activations: before it, code 1 was ctranslate2's only GELU; it now means GELUTanh.
# workers.model runs the exact GELU Whisper was trained with either way.
_GELU, _GELU_BEFORE_REVISION_3 = 3, 1
# Not read here: the alignment heads come from config.json (as ctranslate2 reads them for word alignment); ALiBi is off by the switch above.
_UNUSED_METADATA = {"decoder/alignment_heads", "decoder/alignment_layer", "decoder/alibi_use_positive_positions",
                    "decoder/scale_alibi"}


class ModelFormatError(ValueError):
    """The model directory is not a CTranslate2 Whisper model this service can map."""


def read_ct2_file(path: Path) -> tuple[int, dict[str, np.ndarray]]:
    """The spec revision and every variable of a CTranslate2 ``model.bin``, aliases resolved, as numpy arrays."""
    data = path.read_bytes()
    offset = 0

    def take_bytes(n: int) -> bytes:
        nonlocal offset
        if offset + n > len(data):
            raise ModelFormatError(f"{path}: file ends early or is not a CTranslate2 model "
                                   f"(needs at least {offset + n} bytes, has {len(data)}): truncated?")
        offset += n
        return data[offset - n : offset]

    def take(fmt: str):
        return struct.unpack("<" + fmt, take_bytes(struct.calcsize("<" + fmt)))

    def take_string() -> str:
        (length,) = take("H")
        return take_bytes(length).rstrip(b"\0").decode("utf-8")

    (version,) = take("I")
    if version != _BINARY_VERSION:
        age = "too old" if version < _BINARY_VERSION else "newer than this loader reads"
        raise ModelFormatError(f"{path}: CTranslate2 binary version {version} is {age} (need {_BINARY_VERSION}); "
                               "is it a CTranslate2 model?")
    spec = take_string()
    if spec != "WhisperSpec":
        raise ModelFormatError(f"{path}: spec is {spec!r}, not 'WhisperSpec': only Whisper models are served")
    (revision,) = take("I")
    if revision > _NEWEST_REVISION:
        raise ModelFormatError(f"{path}: WhisperSpec revision {revision} is newer than this loader knows ({_NEWEST_REVISION})")
    (count,) = take("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = take_string()
        (rank,) = take("B")
        dims = take(f"{rank}I")
        (dtype,) = take("B")
        (nbytes,) = take("I")
        if dtype != _BFLOAT16 and dtype not in _DTYPES:
            raise ModelFormatError(f"{path}: variable {name!r} has unknown dtype code {dtype}")
        itemsize = 2 if dtype == _BFLOAT16 else np.dtype(_DTYPES[dtype]).itemsize
        if nbytes != math.prod(dims) * itemsize:
            raise ModelFormatError(f"{path}: variable {name!r} of shape {dims} has {nbytes} bytes, not {math.prod(dims) * itemsize}")
        raw = take_bytes(nbytes)
        if dtype == _BFLOAT16:
            array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, _DTYPES[dtype])
        variables[name] = array.reshape(dims)
    (aliases,) = take("I")
    for _ in range(aliases):
        alias, target = take_string(), take_string()
        if target not in variables:
            raise ModelFormatError(f"{path}: alias {alias!r} names {target!r}, which the file does not have")
        variables[alias] = variables[target]
        # a quantized variable's alias shares its scale, as ctranslate2's loader aliases it
        if f"{target}_scale" in variables:
            variables[f"{alias}_scale"] = variables[f"{target}_scale"]
    return revision, variables


class _Variables:
    """A file's variables by name, remembering which ones the mapping asked for."""

    def __init__(self, arrays: dict[str, np.ndarray], path: Path):
        self.arrays, self.path, self.used = arrays, path, set()

    def raw(self, name: str) -> np.ndarray:
        self.used.add(name)
        return self.arrays[name]

    def scalar(self, name: str) -> int:
        return int(self.raw(name).reshape(()).item())

    def float32(self, name: str) -> np.ndarray:
        """The variable as float32. Quantized weights are dequantized as ctranslate2 does (its Dequantize op):
        ``float = int * (1 / scale)``, one scale per row for int8 (per output channel), one per tensor for int16."""
        array = self.raw(name)
        if array.dtype.kind == "f":
            return array.astype(np.float32)
        if array.dtype not in (np.int8, np.int16):
            raise ModelFormatError(f"{self.path}: {name} is {array.dtype}, neither float nor an int8/int16 quantized weight")
        if f"{name}_scale" not in self.arrays:
            raise ModelFormatError(f"{self.path}: {name} is {array.dtype} but there is no {name}_scale to dequantize it with")
        scale = self.raw(f"{name}_scale").astype(np.float32)
        rows = array.shape[0] if array.dtype == np.int8 else 1
        if scale.size != rows:
            raise ModelFormatError(f"{self.path}: {name}_scale has {scale.size} values; "
                                   f"{array.dtype} {name} {array.shape} needs {rows}")
        return (array.reshape(rows, -1) * (1 / scale.reshape(rows, 1))).reshape(array.shape)


def _dims_from_variables(variables: _Variables) -> ModelDimensions:
    def count_layers(prefix: str) -> int:
        return len({n.split("/")[1] for n in variables.arrays if re.match(rf"{prefix}/layer_\d+/", n)})

    conv1 = variables.raw("encoder/conv1/weight").shape
    embeddings = variables.raw("decoder/embeddings/weight").shape
    return ModelDimensions(
        n_mels=conv1[1],
        n_audio_ctx=variables.raw("encoder/position_encodings/encodings").shape[0],
        n_audio_state=conv1[0],
        n_audio_head=variables.scalar("encoder/num_heads"),
        n_audio_layer=count_layers("encoder"),
        n_vocab=embeddings[0],
        n_text_ctx=variables.raw("decoder/position_encodings/encodings").shape[0],
        n_text_state=embeddings[1],
        n_text_head=variables.scalar("decoder/num_heads"),
        n_text_layer=count_layers("decoder"),
    )


def _check_decoder_switches(variables: _Variables, revision: int) -> None:
    gelu = _GELU if revision >= 3 else _GELU_BEFORE_REVISION_3
    for switch, (default, ours) in {**_DECODER_SWITCHES, "activation": (None, gelu)}.items():
        name = f"decoder/{switch}"
        value = variables.scalar(name) if name in variables.arrays else default
        if value != ours:
            found = "absent" if value is None else value
            raise ModelFormatError(f"{variables.path}: {name} is {found} where Whisper's is {ours}: "
                                   "a model of another architecture?")


def _state_dict(variables: _Variables, dims: ModelDimensions) -> dict[str, np.ndarray]:
    """CTranslate2 names -> :class:`workers.model.Whisper` parameter names."""
    out: dict[str, np.ndarray] = {}

    def linear(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = variables.float32(f"{src}/weight")
        out[f"{dst}.bias"] = variables.float32(f"{src}/bias")

    def norm(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = variables.float32(f"{src}/gamma")
        out[f"{dst}.bias"] = variables.float32(f"{src}/beta")

    for conv in ("conv1", "conv2"):
        linear(f"encoder.{conv}", f"encoder/{conv}")
    out["encoder.positional_embedding"] = variables.float32("encoder/position_encodings/encodings")
    for i in range(dims.n_audio_layer):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        linear(f"{dst}.attn.qkv", f"{src}/self_attention/linear_0")
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
    norm("encoder.ln_post", "encoder/layer_norm")

    embeddings = out["decoder.token_embedding.weight"] = variables.float32("decoder/embeddings/weight")
    if not np.array_equal(variables.float32("decoder/projection/weight"), embeddings):
        raise ModelFormatError(f"{variables.path}: decoder/projection/weight is not decoder/embeddings/weight; "
                               "workers.model ties the output projection to the token embedding, as Whisper does")
    out["decoder.positional_embedding"] = variables.float32("decoder/position_encodings/encodings")
    for i in range(dims.n_text_layer):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        linear(f"{dst}.attn.qkv", f"{src}/self_attention/linear_0")
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.cross_attn.q", f"{src}/attention/linear_0")
        linear(f"{dst}.cross_attn.kv", f"{src}/attention/linear_1")
        linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
        norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
    norm("decoder.ln", "decoder/layer_norm")
    return out


def load_whisper(model_dir: Path, device: torch.device, dtype: torch.dtype) -> tuple[Whisper, dict]:
    """Build :class:`Whisper` from a CTranslate2 model directory; returns it and its ``config.json``.

    Quantized weights (int8, int16) are dequantized to float here. Every variable of the file must be used or
    known metadata, every decoder switch must be Whisper's, and every tensor's shape must be the module's, so a
    file for another architecture fails here with the offending name rather than producing garbage later.
    """
    model_file = model_dir / "model.bin"
    if not model_file.is_file():
        raise ModelFormatError(f"{model_dir}: no model.bin; ASR_MODEL_PATH must name a CTranslate2 Whisper directory")
    revision, stored = read_ct2_file(model_file)
    variables = _Variables(stored, model_file)
    try:
        dims = _dims_from_variables(variables)
        arrays = _state_dict(variables, dims)
    except KeyError as exc:
        raise ModelFormatError(f"{model_file}: missing variable {exc.args[0]!r}; not a Whisper model") from exc
    _check_decoder_switches(variables, revision)
    if unknown := sorted(set(variables.arrays) - variables.used - _UNUSED_METADATA):
        raise ModelFormatError(f"{model_file}: {len(unknown)} variables are not part of Whisper as this service runs it, "
                               f"e.g. {unknown[:5]}: a model of another architecture?")

    with torch.device("meta"):
        model = Whisper(dims)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if set(expected) != set(arrays):
        raise ModelFormatError(f"{model_file}: parameters do not match Whisper: {sorted(set(expected) ^ set(arrays))[:5]}")
    state = {}
    for name, array in arrays.items():
        if tuple(array.shape) != expected[name]:
            raise ModelFormatError(f"{model_file}: {name} has shape {array.shape}, the model needs {expected[name]}")
        state[name] = torch.from_numpy(array).to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True)
    model.decoder.freeze()
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return model.eval(), config
