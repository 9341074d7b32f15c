"""Whisper's token ids and text <-> tokens, from the model directory's ``tokenizer.json``."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


class WhisperTokenizer:
    def __init__(self, path: Path, n_vocab: int):
        self._tokenizer = Tokenizer.from_file(str(path))
        self.n_vocab = n_vocab
        # English-only checkpoints have one token fewer: no language/task tokens in the prompt
        self.multilingual = n_vocab >= 51865
        self.eot = self._special("<|endoftext|>")
        self.sot = self._special("<|startoftranscript|>")
        self.sot_prev = self._special("<|startofprev|>")
        self.sot_lm = self._special("<|startoflm|>")
        self.transcribe = self._special("<|transcribe|>")
        self.translate = self._special("<|translate|>")
        self.no_timestamps = self._special("<|notimestamps|>")
        no_speech = self._tokenizer.token_to_id("<|nospeech|>")
        self.no_speech = no_speech if no_speech is not None else self._special("<|nocaptions|>")
        self.timestamp_begin = self.no_timestamps + 1

    def _special(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer.json has no {token}: not a Whisper tokenizer")
        return token_id

    def sot_sequence(self, language: str | None) -> list[int]:
        if not self.multilingual:
            return [self.sot]
        language_token = self._tokenizer.token_to_id(f"<|{language or 'en'}|>")
        if language_token is None:
            raise ValueError(f"the model has no language {language!r}")
        return [self.sot, language_token, self.transcribe]

    @property
    def languages(self) -> list[str]:
        """The language codes the model knows: in Whisper's vocabulary their tokens follow start-of-transcript."""
        if not self.multilingual:
            return ["en"]
        return [self._tokenizer.id_to_token(i)[2:-2] for i in range(self.sot + 1, self.translate)]

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, tokens: list[int]) -> str:
        """Text of the tokens, special and timestamp tokens left out."""
        return self._tokenizer.decode([t for t in tokens if t < self.eot])

    def decode_with_specials(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=False)

    @property
    def special_non_timestamps(self) -> list[int]:
        """Special tokens a transcript never contains (the task, start and no-speech markers)."""
        return [self.transcribe, self.translate, self.sot, self.sot_prev, self.sot_lm, self.no_speech]
