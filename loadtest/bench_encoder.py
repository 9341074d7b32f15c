"""What the encoder costs on this machine, and what each CPU trick buys: ms per full 30 s pass (the median of
``--repeats`` timed passes after a warm-up) and, for variants that change the arithmetic, WER over LibriSpeech
rows transcribed with that encoder (packed, as the server runs them).

Variants: fp32 as the server runs it; torch threads 1 and 2; channels-last / oneDNN convolutions (the
convolutions run as mkldnn tensors); int8 (fbgemm dynamic quantisation of the encoder's linear layers);
torch.compile (inductor). The floor: about 30 GFLOP per pass at half of this CPU's ~180 GFLOP/s, 0.17 s.

Run: python -m loadtest.bench_encoder --rows 50
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.mkldnn
from torch import nn

from loadtest.evalset import load_rows, word_error_rate
from loadtest.rest import positive_int
from loadtest.stream import decode_file
from workers.decoding import DecodeRow, DecodingOptions, token_budget
from workers.features import N_SAMPLES, SAMPLE_RATE
from workers.model import AudioEncoder
from workers.packing import PackingMode, PassInput, first_fit
from workers.runner import ModelRunner, embedded_model_path


@dataclass
class Variant:
    name: str
    make: Callable[[AudioEncoder], nn.Module]
    threads: int = 2
    changes_numbers: bool = False  # then its WER is measured


class MkldnnConv(nn.Module):
    """A convolution run on oneDNN (mkldnn) tensors, taking and giving dense ones."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.conv = torch.utils.mkldnn.to_mkldnn(copy.deepcopy(conv))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.to_mkldnn()).to_dense()


def mkldnn_convs(encoder: AudioEncoder) -> nn.Module:
    encoder = copy.deepcopy(encoder)
    encoder.conv1, encoder.conv2 = MkldnnConv(encoder.conv1), MkldnnConv(encoder.conv2)
    return encoder


def int8_linears(encoder: AudioEncoder) -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(encoder), {nn.Linear}, dtype=torch.qint8)


def compiled(encoder: AudioEncoder) -> nn.Module:
    return torch.compile(encoder)


VARIANTS = [
    Variant("fp32, 2 threads (the server's)", lambda e: e),
    Variant("fp32, 1 thread", lambda e: e, threads=1),
    Variant("channels-last / oneDNN convolutions", mkldnn_convs),
    Variant("int8 linears (fbgemm dynamic)", int8_linears, changes_numbers=True),
    Variant("torch.compile (inductor)", compiled),
]


def time_pass(encoder: nn.Module, mel: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        encoder(mel)  # warm-up (compile, kernel choice)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            encoder(mel)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def wer_with(runner: ModelRunner, encoder: nn.Module, rows, audios) -> float:
    """Transcribe the rows packed, as the server does, with ``encoder`` in place of the model's."""
    original = runner.model.encoder
    runner.model.encoder = encoder
    try:
        texts = []
        for start in range(0, len(audios), 3):
            batch = audios[start : start + 3]
            layouts = first_fit([len(a) for a in batch], [""] * len(batch), PackingMode.SHARED)
            windows = runner.encode_windows(layouts, [runner.features(a) for a in batch], [len(a) for a in batch])
            for k, audio in enumerate(batch):
                decoder = runner.new_decoder()
                row = DecodeRow(prompt=list(runner.prompt([], None)), max_tokens=token_budget(len(audio) / SAMPLE_RATE),
                                last_timestamp=windows[k].last_timestamp)
                decoder.add([row], windows[k].audio_features[None])
                while decoder.running:
                    decoder.step()
                texts.append(runner.tokenizer.decode(row.tokens))
    finally:
        runner.model.encoder = original
    return word_error_rate([r.text for r in rows], texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_encoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive_int, default=50, help="LibriSpeech rows for the WER column (default: 50)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed passes per variant (default: 5)")
    args = parser.parse_args(argv)
    runner = ModelRunner(embedded_model_path(), torch.device("cpu"), DecodingOptions())
    rows = load_rows(sets=["librispeech_test_other_resemblyzer"])[: args.rows]
    audios = [decode_file(r.audio) for r in rows]
    mel = PassInput.alone(runner.features(np.random.default_rng(0).standard_normal(N_SAMPLES).astype(np.float32) * 0.01)).mel[None]
    threads = torch.get_num_threads()
    print("| variant | ms per 30 s pass | WER % (packed, greedy) |\n|---|---:|---:|")
    for k, variant in enumerate(VARIANTS, 1):
        print(f"[{k}/{len(VARIANTS)}] {variant.name} ...", file=sys.stderr, flush=True)
        torch.set_num_threads(variant.threads)
        try:
            encoder = variant.make(runner.model.encoder)
            ms = 1000 * time_pass(encoder, mel, args.repeats)
            wer = f"{100 * wer_with(runner, encoder, rows, audios):.2f}" if variant.changes_numbers or k == 1 else "same numbers"
            print(f"| {variant.name} | {ms:.0f} | {wer} |", flush=True)
        except Exception as error:  # noqa: BLE001 - a variant this build cannot run is reported, not fatal
            print(f"| {variant.name} | failed: {type(error).__name__}: {str(error)[:80]} | |", flush=True)
        finally:
            torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
