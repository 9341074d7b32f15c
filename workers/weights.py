"""Read a CTranslate2 Whisper ``model.bin`` and map it onto :mod:`workers.model`.

The file layout (binary version 6, little-endian) is: ``u32`` version, a string (spec name),
``u32`` spec revision, ``u32`` variable count; each variable is a string (name), ``u8`` rank,
``rank`` x ``u32`` dims, ``u8`` dtype, ``u32`` byte count, raw data; then ``u32`` alias count and
pairs of strings (alias, target). A string is a ``u16`` byte length whose last byte is a NUL.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch

from workers.model import ModelDimensions, Whisper

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BFLOAT16 = 5


class ModelFormatError(ValueError):
    """The model directory is not a CTranslate2 Whisper model this service can map."""


def read_ct2_variables(path: Path) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 ``model.bin``, aliases resolved, as numpy arrays."""
    data = path.read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        values = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return values

    def take_string() -> str:
        nonlocal offset
        (length,) = take("H")
        raw = data[offset : offset + length]
        offset += length
        return raw.rstrip(b"\0").decode("utf-8")

    try:
        (version,) = take("I")
        if version < 6:
            raise ModelFormatError(f"{path}: CTranslate2 binary version {version} is too old (need 6 or newer)")
        spec = take_string()
        if spec != "WhisperSpec":
            raise ModelFormatError(f"{path}: spec is {spec!r}, not 'WhisperSpec': only Whisper models are served")
        take("I")  # spec revision: the variable names below are what is checked
        (count,) = take("I")
        variables: dict[str, np.ndarray] = {}
        for _ in range(count):
            name = take_string()
            (rank,) = take("B")
            dims = take(f"{rank}I") if rank else ()
            (dtype,) = take("B")
            (nbytes,) = take("I")
            raw = data[offset : offset + nbytes]
            offset += nbytes
            if dtype == _BFLOAT16:
                array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif dtype in _DTYPES:
                array = np.frombuffer(raw, _DTYPES[dtype])
            else:
                raise ModelFormatError(f"{path}: variable {name!r} has unknown dtype code {dtype}")
            variables[name] = array.reshape(dims)
        (aliases,) = take("I")
        for _ in range(aliases):
            alias, target = take_string(), take_string()
            variables[alias] = variables[target]
    except struct.error as exc:
        raise ModelFormatError(f"{path}: file ends early or is not a CTranslate2 model ({exc})") from exc
    return variables


def _scalar(variables: dict[str, np.ndarray], name: str) -> int:
    return int(variables[name].reshape(()).item())


def dims_from_variables(variables: dict[str, np.ndarray]) -> ModelDimensions:
    def count_layers(prefix: str) -> int:
        return len({n.split("/")[1] for n in variables if re.match(rf"{prefix}/layer_\d+/", n)})

    n_audio_state = variables["encoder/conv1/weight"].shape[0]
    n_text_state = variables["decoder/embeddings/weight"].shape[1]
    return ModelDimensions(
        n_mels=variables["encoder/conv1/weight"].shape[1],
        n_audio_ctx=variables["encoder/position_encodings/encodings"].shape[0],
        n_audio_state=n_audio_state,
        n_audio_head=_scalar(variables, "encoder/num_heads"),
        n_audio_layer=count_layers("encoder"),
        n_vocab=variables["decoder/embeddings/weight"].shape[0],
        n_text_ctx=variables["decoder/position_encodings/encodings"].shape[0],
        n_text_state=n_text_state,
        n_text_head=_scalar(variables, "decoder/num_heads"),
        n_text_layer=count_layers("decoder"),
    )


def _state_dict(variables: dict[str, np.ndarray], dims: ModelDimensions) -> dict[str, np.ndarray]:
    """CTranslate2 names -> :class:`workers.model.Whisper` parameter names."""
    out: dict[str, np.ndarray] = {}

    def linear(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = variables[f"{src}/weight"]
        out[f"{dst}.bias"] = variables[f"{src}/bias"]

    def norm(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = variables[f"{src}/gamma"]
        out[f"{dst}.bias"] = variables[f"{src}/beta"]

    for conv in ("conv1", "conv2"):
        linear(f"encoder.{conv}", f"encoder/{conv}")
    out["encoder.positional_embedding"] = variables["encoder/position_encodings/encodings"]
    for i in range(dims.n_audio_layer):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        linear(f"{dst}.attn.qkv", f"{src}/self_attention/linear_0")
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
    norm("encoder.ln_post", "encoder/layer_norm")

    out["decoder.token_embedding.weight"] = variables["decoder/embeddings/weight"]
    out["decoder.positional_embedding"] = variables["decoder/position_encodings/encodings"]
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

    Every tensor's shape is checked against the module, so a file for another architecture fails here
    with the offending name rather than producing garbage later.
    """
    model_file = model_dir / "model.bin"
    if not model_file.is_file():
        raise ModelFormatError(f"{model_dir}: no model.bin; ASR_MODEL_PATH must name a CTranslate2 Whisper directory")
    variables = read_ct2_variables(model_file)
    try:
        dims = dims_from_variables(variables)
        arrays = _state_dict(variables, dims)
    except KeyError as exc:
        raise ModelFormatError(f"{model_file}: missing variable {exc.args[0]!r}; not a Whisper model") from exc

    with torch.device("meta"):
        model = Whisper(dims)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if set(expected) != set(arrays):
        raise ModelFormatError(f"{model_file}: parameters do not match Whisper: {sorted(set(expected) ^ set(arrays))[:5]}")
    state = {}
    for name, array in arrays.items():
        if tuple(array.shape) != expected[name]:
            raise ModelFormatError(f"{model_file}: {name} has shape {array.shape}, the model needs {expected[name]}")
        state[name] = torch.from_numpy(array.astype(np.float32)).to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True)
    model.decoder.freeze()
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return model.eval(), config
