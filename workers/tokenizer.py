"""Whisper's token ids and text <-> tokens, from the model directory's ``tokenizer.json``."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

TASKS = ("transcribe", "translate")
# openai-whisper's names of the language codes (whisper/tokenizer.py): OpenAI's verbose_json names the language
LANGUAGES = {
    "en": "english",
    "zh": "chinese",
    "de": "german",
    "es": "spanish",
    "ru": "russian",
    "ko": "korean",
    "fr": "french",
    "ja": "japanese",
    "pt": "portuguese",
    "tr": "turkish",
    "pl": "polish",
    "ca": "catalan",
    "nl": "dutch",
    "ar": "arabic",
    "sv": "swedish",
    "it": "italian",
    "id": "indonesian",
    "hi": "hindi",
    "fi": "finnish",
    "vi": "vietnamese",
    "he": "hebrew",
    "uk": "ukrainian",
    "el": "greek",
    "ms": "malay",
    "cs": "czech",
    "ro": "romanian",
    "da": "danish",
    "hu": "hungarian",
    "ta": "tamil",
    "no": "norwegian",
    "th": "thai",
    "ur": "urdu",
    "hr": "croatian",
    "bg": "bulgarian",
    "lt": "lithuanian",
    "la": "latin",
    "mi": "maori",
    "ml": "malayalam",
    "cy": "welsh",
    "sk": "slovak",
    "te": "telugu",
    "fa": "persian",
    "lv": "latvian",
    "bn": "bengali",
    "sr": "serbian",
    "az": "azerbaijani",
    "sl": "slovenian",
    "kn": "kannada",
    "et": "estonian",
    "mk": "macedonian",
    "br": "breton",
    "eu": "basque",
    "is": "icelandic",
    "hy": "armenian",
    "ne": "nepali",
    "mn": "mongolian",
    "bs": "bosnian",
    "kk": "kazakh",
    "sq": "albanian",
    "sw": "swahili",
    "gl": "galician",
    "mr": "marathi",
    "pa": "punjabi",
    "si": "sinhala",
    "km": "khmer",
    "sn": "shona",
    "yo": "yoruba",
    "so": "somali",
    "af": "afrikaans",
    "oc": "occitan",
    "ka": "georgian",
    "be": "belarusian",
    "tg": "tajik",
    "sd": "sindhi",
    "gu": "gujarati",
    "am": "amharic",
    "yi": "yiddish",
    "lo": "lao",
    "uz": "uzbek",
    "fo": "faroese",
    "ht": "haitian creole",
    "ps": "pashto",
    "tk": "turkmen",
    "nn": "nynorsk",
    "mt": "maltese",
    "sa": "sanskrit",
    "lb": "luxembourgish",
    "my": "myanmar",
    "bo": "tibetan",
    "tl": "tagalog",
    "mg": "malagasy",
    "as": "assamese",
    "tt": "tatar",
    "haw": "hawaiian",
    "ln": "lingala",
    "ha": "hausa",
    "ba": "bashkir",
    "jw": "javanese",
    "su": "sundanese",
    "yue": "cantonese",
}

LANGUAGE_CODES = {name: code for code, name in LANGUAGES.items()}


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

    def sot_sequence(self, language: str | None, task: str = "transcribe") -> list[int]:
        """The prompt's start-of-transcript sequence. A multilingual model given no language gets start-of-transcript
        alone: the decoder detects the language there and feeds it, then ``task`` (see BatchDecoder.add)."""
        if not self.multilingual or language is None:
            return [self.sot]
        return [self.sot, self.language_token(language), self.task_token(task)]

    def language_token(self, language: str) -> int:
        token = self._tokenizer.token_to_id(f"<|{language}|>")
        if token is None or not self.sot < token < self.translate:
            raise ValueError(f"the model has no language {language!r}")
        return token

    def task_token(self, task: str) -> int:
        return {"transcribe": self.transcribe, "translate": self.translate}[task]

    @property
    def language_tokens(self) -> range:
        """Token ids of the languages: in Whisper's vocabulary they follow start-of-transcript."""
        return range(self.sot + 1, self.translate)

    @property
    def languages(self) -> list[str]:
        """The language codes the model knows: in Whisper's vocabulary their tokens follow start-of-transcript."""
        if not self.multilingual:
            return ["en"]
        return [self.language_code(token) for token in self.language_tokens]

    def language_code(self, token: int) -> str:
        return self._tokenizer.id_to_token(token)[2:-2]

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
