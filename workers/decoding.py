"""Batched decoding with iteration-level batching: greedy, beam search, and sampling with temperature fallback.

:class:`BatchDecoder` keeps one running batch of windows (:class:`DecodeRow`). Each window owns one audio slot
of the cache (its cross-attention keys and values, computed once when it joins) and one or more hypothesis
slots (self-attention keys and values): one when greedy, ``beam_size`` in beam search, ``best_of`` when
sampling. All of a window's hypotheses attend to its one audio slot, so a beam costs no copy of the audio.
``add`` brings windows in between tokens (their prompts fed in one padded forward pass); ``step`` extends
every hypothesis by one token and hands back the windows that finished, so short windows leave early and
new ones need not wait for the longest.

The search follows faster-whisper (CTranslate2): a beam keeps the ``beam_size`` best of ``2 * beam_size``
candidates, a candidate ending in end-of-text is finished, and the search stops once ``beam_size * patience``
are; the best finished one by ``sum_logprob / length ** length_penalty`` wins. A window whose result fails
Whisper's quality rules (it compresses too well: a loop; or its average log-probability is too low) is
decoded again at the next temperature of its schedule, sampling ``best_of`` times from a generator seeded
per window, as openai-whisper's ``transcribe`` does; its audio slot and prompt stay where they are.

A multilingual model given no language detects it per window: the row's prompt stops at start-of-transcript,
the likeliest language token there is chosen, and the language and task tokens are fed in the next steps of the
running batch (no forward pass of its own).

The token policy is a list of small logit filters, as in openai/whisper: blank suppression, suppressed
tokens, and the timestamp rules.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.model import AudioGroups, DecoderCache, DecoderState, Whisper
from workers.timing import TokenAlignment, token_alignment
from workers.tokenizer import WhisperTokenizer

SECONDS_PER_TIMESTAMP = 0.02
INITIAL_CACHE = (8, 64)  # hypothesis slots, positions: a decoder's cache starts this small and doubles as its batch needs


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def temperature_schedule(start: float, increment: float) -> tuple[float, ...]:
    """openai-whisper's fallback temperatures: ``start``, then up by ``increment`` to 1.0; no increment, no fallback."""
    if increment <= 0:
        return (start,)
    steps = math.floor((1.0 - start) / increment + 1e-6)
    return tuple(round(start + i * increment, 4) for i in range(steps + 1))


@dataclass(frozen=True)
class DecodingOptions:
    """The decoder's rules, the same for every window."""

    sample_len: int = 224  # most tokens sampled for one window (half the text context, as openai/whisper)
    max_initial_timestamp_s: float = 1.0  # the first segment may not start later than this
    suppress_blank: bool = True  # no blank or end-of-text as the first sampled token
    max_prompt_tokens: int = 223  # previous-text prompt is cut to its last tokens to leave room to sample
    # Whisper's quality rules: a result that fails them is decoded again at the next temperature
    compression_ratio_threshold: float = 2.4  # text that gzip compresses better than this is a loop
    logprob_threshold: float = -1.0  # an average log-probability below this is a poor guess ...
    no_speech_threshold: float = 0.6  # ... unless the window is silence (no-speech probability above this)


@dataclass(frozen=True)
class SearchOptions:
    """How one window is searched: chosen per request (see ``Engine.options``)."""

    beam_size: int = 1  # 1: greedy
    patience: float = 1.0  # beam search stops once beam_size * patience hypotheses are finished
    length_penalty: float = 1.0  # a finished hypothesis scores sum_logprob / length ** length_penalty
    temperatures: tuple[float, ...] = (0.0,)  # tried in turn while the result fails the quality rules
    best_of: int = 5  # samples drawn at a temperature above 0; the best scoring one is kept
    seed: int = 0  # of each window's sampling generator: a window's result does not depend on its batch mates


@dataclass(eq=False)
class Hypothesis:
    """One candidate transcript of a window, in one hypothesis slot of the cache."""

    row: DecodeRow
    tokens: list[int]
    sum_logprob: float
    feed: int  # the token fed at the next step (its last, or the prompt's last when it starts over)
    slot: int = -1
    # decided but not yet fed, one a step, before it chooses again: after a detected language, the language and
    # task tokens, then the forced prefix
    pending: list[int] = field(default_factory=list)


@dataclass
class Attempt:
    """A window's result at one temperature, and what the quality rules measured of it."""

    tokens: list[int]
    sum_logprob: float
    temperature: float
    compression_ratio: float
    avg_logprob: float


@dataclass(eq=False)
class DecodeRow:
    """One window being decoded: its prompt and search in, its chosen tokens and scores out."""

    prompt: list[int]
    owner: Any = None  # what the stage attaches (the job); the decoder never looks at it
    max_tokens: int = 224  # a window's budget; a short window gets a small one (see token_budget)
    last_timestamp: int = 1500  # in encoder frames (20 ms): its window's end; decoding stops there
    forced: tuple[int, ...] = ()  # what its transcript must begin with (a stream's committed words): fed, not sampled
    search: SearchOptions = SearchOptions()
    task: str = "transcribe"  # or translate (into English); fed after the language a multilingual model detects
    word_timestamps: bool = False  # align its transcript's words on its audio once it is decoded
    frames: int = 1500  # encoder frames (20 ms) of its own audio: what its words are aligned on
    tokens: list[int] = field(default_factory=list)
    sum_logprob: float = 0.0
    no_speech_prob: float = math.nan
    # detected when its prompt leaves the language out (a multilingual model given none): the prompt then ends at
    # start-of-transcript, and the likeliest language token there (openai-whisper's detect_language) is chosen
    language: str | None = None
    language_probability: float = math.nan
    temperature: float = 0.0  # the last temperature tried (a later window's context is dropped after a high one)
    attempts: list[Attempt] = field(default_factory=list)  # one per temperature tried
    alignment: TokenAlignment | None = None  # with word_timestamps: where each text token is in its audio
    finished: bool = False
    # the decoder's own state
    live: list[Hypothesis] = field(default_factory=list, repr=False)
    candidates: list[Hypothesis] = field(default_factory=list, repr=False)  # finished at the current temperature
    audio_slot: int = -1
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / (len(self.tokens) - len(self.forced) + 1)

    @property
    def current_temperature(self) -> float:
        return self.search.temperatures[len(self.attempts)]

    def score(self, hypothesis: Hypothesis) -> float:
        length = max(len(hypothesis.tokens) - len(self.forced), 1)
        return hypothesis.sum_logprob / length ** self.search.length_penalty


def audio_frames(duration_s: float) -> int:
    """Encoder frames (20 ms) that hold a window's own audio."""
    return max(1, math.ceil(duration_s / SECONDS_PER_TIMESTAMP))


def token_budget(duration_s: float) -> int:
    """Most tokens a window of this length can need: fast speech is about 5 tokens a second, plus its
    timestamps. A decoder caught in a repetition loop on a short window stops here instead of at 224,
    which bounds the time the loop can cost (a 1 s window: 36 steps instead of 224)."""
    return 24 + math.ceil(12 * duration_s)


class TimestampRules:
    """openai/whisper's ApplyTimestampRules: the first token is a timestamp no later than the initial
    limit; timestamps come in pairs (except right before end-of-text) and never go backwards. And a row's
    timestamps stop at its window's end, after which only end-of-text may follow (what a packed window's
    row sees past its end is the encoding of silence, not of its own padding)."""

    def __init__(self, tokenizer: WhisperTokenizer, max_initial_timestamp_s: float):
        self.begin = tokenizer.timestamp_begin
        self.eot = tokenizer.eot
        self.no_timestamps = tokenizer.no_timestamps
        self.max_initial = round(max_initial_timestamp_s / SECONDS_PER_TIMESTAMP)

    def apply(self, logits: Tensor, hypotheses: list[Hypothesis]) -> None:
        logits[:, self.no_timestamps] = -math.inf
        for k, hypothesis in enumerate(hypotheses):
            last = self.begin + hypothesis.row.last_timestamp
            logits[k, last + 1 :] = -math.inf
            seq = hypothesis.tokens
            if not seq:
                logits[k, : self.begin] = -math.inf
                logits[k, self.begin + self.max_initial + 1 :] = -math.inf
                continue
            last_was_timestamp = seq[-1] >= self.begin
            penultimate_was_timestamp = len(seq) < 2 or seq[-2] >= self.begin
            if last_was_timestamp:
                if penultimate_was_timestamp:
                    logits[k, self.begin :] = -math.inf
                else:
                    logits[k, : self.eot] = -math.inf
            last_timestamp = next(t for t in reversed(seq) if t >= self.begin)
            if last_timestamp >= last:  # the window's end: nothing can follow
                logits[k, : self.eot] = -math.inf
                logits[k, self.eot + 1 :] = -math.inf
                continue
            # a segment must have non-zero length, or decoding could loop on empty segments
            floor = last_timestamp if (last_was_timestamp and not penultimate_was_timestamp) else last_timestamp + 1
            logits[k, self.begin : floor] = -math.inf
        # when timestamps together are likelier than any single text token, sample a timestamp
        logprobs = F.log_softmax(logits.float(), dim=-1)
        timestamp_wins = logprobs[:, self.begin :].logsumexp(-1) > logprobs[:, : self.begin].max(-1).values
        logits[timestamp_wins, : self.begin] = -math.inf


class BatchDecoder:
    def __init__(self, model: Whisper, tokenizer: WhisperTokenizer, options: DecodingOptions,
                 suppress_tokens: list[int], suppress_at_begin: list[int], alignment_heads: list[tuple[int, int]]):
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.alignment_heads = alignment_heads  # (layer, head) of the cross-attention heads that follow the speech
        device = model.decoder.token_embedding.weight.device
        self.suppress = torch.tensor(sorted(set(suppress_tokens)), dtype=torch.long, device=device)
        self.suppress_at_begin = torch.tensor(suppress_at_begin, dtype=torch.long, device=device)
        self.timestamp_rules = TimestampRules(tokenizer, options.max_initial_timestamp_s)
        self.rows: list[DecodeRow] = []  # rows[a] owns audio slot a
        self.slots: list[Hypothesis | None] = []  # slots[i] lives in hypothesis slot i; None: freed, until _retire
        self.cache = self._new_cache()

    def _new_cache(self) -> DecoderCache:
        rows, length = INITIAL_CACHE
        return DecoderCache(self.model.decoder, rows=rows, length=length, audio_rows=rows, audio_ctx=self.model.dims.n_audio_ctx)

    @property
    def running(self) -> int:
        return len(self.rows)

    @torch.inference_mode()  # retiring moves slots within the cache, whose tensors are inference tensors once it grew
    def remove(self, rows: list[DecodeRow]) -> None:
        """Drop ``rows`` from the running batch (their callers have gone) without finishing them."""
        for row in rows:
            self._free(row.live)
            row.live = []
            row.finished = True
        self._retire()

    def release_memory(self) -> None:
        """With no row running: give back the cache a large batch grew (it would otherwise stay at its peak)."""
        rows, length = INITIAL_CACHE
        if not self.rows and self.cache.capacity > (rows, length, rows):
            self.cache = self._new_cache()

    @torch.inference_mode()
    def add(self, rows: list[DecodeRow], audio_features: Tensor) -> list[DecodeRow]:
        """Join ``rows`` (encoder output ``audio_features`` [len(rows), 1500, D]) to the running batch:
        feed their prompts and choose their first tokens. Returns rows that already finished. A row whose
        language is to be detected is fed its prompt only (to start-of-transcript), and its language, task and
        forced prefix in the steps that follow."""
        decoder, device = self.model.decoder, audio_features.device
        start, stop = len(self.slots), len(self.slots) + len(rows)
        audio_start, audio_stop = len(self.rows), len(self.rows) + len(rows)
        detecting = [self.tokenizer.multilingual and row.prompt[-1] == self.tokenizer.sot for row in rows]
        feeds = [row.prompt if detect else [*row.prompt, *row.forced] for row, detect in zip(rows, detecting)]
        width = max(map(len, feeds))
        self._reserve(stop, width, audio_stop)
        state = self.cache.state((start, stop), (audio_start, audio_stop))
        state.lengths.zero_()
        decoder.project_audio(audio_features, state)
        tokens = torch.full((len(rows), width), self.tokenizer.eot, dtype=torch.long)
        for i, (row, fed) in enumerate(zip(rows, feeds)):
            tokens[i, : len(fed)] = torch.tensor(fed)
            row.audio_slot = audio_start + i
            row.live = [Hypothesis(row, list(row.forced), 0.0, feed=fed[-1], slot=start + i)]
            self.slots.append(row.live[0])
        counts = torch.tensor(list(map(len, feeds)), device=device)
        hidden = decoder(tokens.to(device), counts, state)
        self.rows.extend(rows)
        index = torch.arange(len(rows), device=device)
        # no-speech probability is read at the start-of-transcript token (openai/whisper)
        sot_at = torch.tensor([r.prompt.index(self.tokenizer.sot) for r in rows], device=device)
        no_speech = decoder.logits(hidden[index, sot_at]).float().softmax(-1)[:, self.tokenizer.no_speech]
        for row, p in zip(rows, no_speech.tolist()):
            row.no_speech_prob = p
        logits = decoder.logits(hidden[index, counts - 1])
        if any(detecting):
            self._detect_language([row for row, detect in zip(rows, detecting) if detect], logits[torch.tensor(detecting, device=device)])
        return self._advance(logits, [row.live[0] for row in rows])

    def _detect_language(self, rows: list[DecodeRow], logits: Tensor) -> None:
        """Each row's language: the likeliest language token at start-of-transcript (``logits``, one per row),
        its probability a softmax over the language tokens alone (openai-whisper's and CTranslate2's
        ``detect_language``). The language and task tokens join the row's prompt, to be fed in the next steps."""
        languages = self.tokenizer.language_tokens
        probs = logits[:, languages.start : languages.stop].float().softmax(-1)
        best, chosen = probs.max(-1)
        for row, p, k in zip(rows, best.tolist(), chosen.tolist()):
            language, task = languages[k], self.tokenizer.task_token(row.task)
            row.language, row.language_probability = self.tokenizer.language_code(language), p
            row.prompt = [*row.prompt, language, task]
            row.live[0].pending = [language, task, *row.forced]

    @torch.inference_mode()
    def step(self) -> list[DecodeRow]:
        """Extend every running hypothesis by one token; returns the rows that finished."""
        if not self.slots:
            return []
        self._reserve(len(self.slots), 1, len(self.rows))
        state = self.cache.state((0, len(self.slots)), (0, len(self.rows)), self._groups())
        device = state.lengths.device
        tokens = torch.tensor([[h.feed] for h in self.slots], device=device)
        hidden = self.model.decoder(tokens, torch.ones(len(self.slots), dtype=torch.long, device=device), state)
        return self._advance(self.model.decoder.logits(hidden[:, 0]), list(self.slots))

    def _groups(self) -> AudioGroups | None:
        """None while every row has one hypothesis in the slot of its audio (greedy: the plain batch)."""
        if len(self.slots) == len(self.rows) and all(row.live[0].slot == row.audio_slot for row in self.rows):
            return None
        n = max(len(row.live) for row in self.rows)
        rows, at = [], [0] * len(self.slots)
        for a, row in enumerate(self.rows):
            slots = [h.slot for h in row.live]
            rows.append(slots + [slots[0]] * (n - len(slots)))
            for j, slot in enumerate(slots):
                at[slot] = a * n + j
        device = self.cache.lengths.device
        return AudioGroups(torch.tensor(rows, device=device), torch.tensor(at, device=device))

    def _reserve(self, slots: int, width: int, audio_rows: int) -> None:
        live = len(self.slots)
        longest = int(self.cache.lengths[:live].max()) if live else 0
        self.cache.reserve(slots, min(longest + width, self.model.decoder.n_ctx), audio_rows)

    def _filter(self, logits: Tensor, hypotheses: list[Hypothesis]) -> None:
        logits[:, self.suppress] = -math.inf
        if self.options.suppress_blank:  # at the first sampled token only, as CTranslate2 and openai-whisper
            for k, h in enumerate(hypotheses):
                if len(h.tokens) == len(h.row.forced):
                    logits[k, self.suppress_at_begin] = -math.inf
        self.timestamp_rules.apply(logits, hypotheses)

    def _advance(self, logits: Tensor, hypotheses: list[Hypothesis]) -> list[DecodeRow]:
        """Choose each row's next hypotheses from ``logits`` (one per hypothesis of ``hypotheses``, grouped by
        row), move them into their slots, and retire the rows that finished."""
        logits = logits.float()
        self._filter(logits, hypotheses)
        logprobs = F.log_softmax(logits, dim=-1)
        greedy = logits.argmax(-1).tolist()
        at: dict[int, list[int]] = {}  # id(row) -> its hypotheses' rows of logits
        for k, h in enumerate(hypotheses):
            at.setdefault(id(h.row), []).append(k)
        copies: tuple[list[int], list[int]] = ([], [])
        finished = []
        for ks in at.values():
            row = hypotheses[ks[0]].row
            if (waiting := hypotheses[ks[0]]).pending:  # its next token is decided: these logits are not looked at
                waiting.feed = waiting.pending.pop(0)
                continue
            temperature = row.current_temperature
            if temperature > 0:
                children = self._sample(row, [hypotheses[k] for k in ks], logits[ks], logprobs[ks], temperature)
            elif row.search.beam_size > 1:
                children = self._beam(row, [hypotheses[k] for k in ks], logprobs[ks])
            else:
                children = [(hypotheses[k], greedy[k], float(logprobs[k, greedy[k]])) for k in ks]
            kept = self._extend(row, children)
            if not kept and not self._conclude(row):
                kept = self._start_over(row)
            self._place(row, kept, copies)
            if not kept:
                finished.append(row)
        if copies[0]:
            self.cache.copy(*copies)
        if aligned := [row for row in finished if row.word_timestamps]:
            self._align(aligned)  # while their audio is still in its slots
        self._retire()
        return finished

    def _align(self, rows: list[DecodeRow]) -> None:
        """Feed each row's transcript again (start-of-transcript sequence, no-timestamps, its text tokens,
        end-of-text), in one batch, and align its tokens on its frames from the alignment heads' attention."""
        decoder, eot = self.model.decoder, self.tokenizer.eot
        texts = [[t for t in row.tokens if t < eot] for row in rows]
        starts = [row.prompt[row.prompt.index(self.tokenizer.sot) :] for row in rows]
        fed = [[*start, self.tokenizer.no_timestamps, *text, eot] for start, text in zip(starts, texts)]
        width = max(map(len, fed))
        weight = decoder.token_embedding.weight
        scratch = lambda: [weight.new_zeros(len(rows), width, weight.shape[1]) for _ in decoder.blocks]  # noqa: E731
        audio = torch.tensor([row.audio_slot for row in rows], device=weight.device)
        state = DecoderState(scratch(), scratch(), [(k[audio], v[audio]) for k, v in self.cache.cross],
                             torch.zeros(len(rows), dtype=torch.long, device=weight.device))
        tokens = torch.full((len(rows), width), eot, dtype=torch.long)
        for i, ids in enumerate(fed):
            tokens[i, : len(ids)] = torch.tensor(ids)
        scores: list[Tensor] = []
        hidden = decoder(tokens.to(weight.device), torch.tensor([len(ids) for ids in fed], device=weight.device), state, scores)
        for i, (row, start, text, ids) in enumerate(zip(rows, starts, texts, fed)):
            if not text:
                row.alignment = TokenAlignment([], [0.0], [])
                continue
            heads = torch.stack([scores[layer][i, head, : len(ids), : row.frames] for layer, head in self.alignment_heads])
            at = len(start)  # no-timestamps: from here each position predicts the next text token
            probs = decoder.logits(hidden[i, at : at + len(text)]).float()[:, :eot].softmax(-1)
            chosen = probs[torch.arange(len(text)), torch.tensor(text, device=probs.device)]
            row.alignment = token_alignment(heads, at, text, chosen.tolist())

    def _sample(self, row: DecodeRow, parents: list[Hypothesis], logits: Tensor, logprobs: Tensor,
                temperature: float) -> list[tuple[Hypothesis, int, float]]:
        """Draw each hypothesis's next token at ``temperature``; a fresh attempt draws ``best_of`` first tokens."""
        if row.generator is None:
            row.generator = torch.Generator(logits.device)
        if len(parents) == 1 and len(parents[0].tokens) == len(row.forced):
            row.generator.manual_seed(row.search.seed + len(row.attempts))  # each attempt its own seeded draw
            draws = [0] * row.search.best_of
        else:
            draws = list(range(len(parents)))
        probs = (logits / temperature).softmax(-1)
        tokens = [int(torch.multinomial(probs[k], 1, generator=row.generator)) for k in draws]
        return [(parents[k], t, float(logprobs[k, t])) for k, t in zip(draws, tokens)]

    def _beam(self, row: DecodeRow, parents: list[Hypothesis], logprobs: Tensor) -> list[tuple[Hypothesis, int, float]]:
        """CTranslate2's beam step: the best ``2 * beam`` continuations of all beams; each of the first ``beam``
        that ends in end-of-text is finished, and its place goes to the next candidate that does not end."""
        beam, eot = row.search.beam_size, self.tokenizer.eot
        sums = torch.tensor([h.sum_logprob for h in parents], device=logprobs.device)
        totals, flat = (logprobs + sums[:, None]).flatten().topk(min(2 * beam, logprobs.numel()))
        vocabulary = logprobs.shape[1]
        candidates = [(parents[i // vocabulary], i % vocabulary, total)
                      for i, total in zip(flat.tolist(), totals.tolist()) if total > -math.inf]
        spare = iter([c for c in candidates[beam:] if c[1] != eot])
        chosen = []
        for candidate in candidates[:beam]:
            chosen.append(candidate)
            if candidate[1] == eot and (replacement := next(spare, None)) is not None:
                chosen.append(replacement)
        return [(parent, token, total - parent.sum_logprob) for parent, token, total in chosen]

    def _extend(self, row: DecodeRow, children: list[tuple[Hypothesis, int, float]]) -> list[tuple[Hypothesis, Hypothesis]]:
        """Each child (parent, token, its log-probability) ends, as a finished candidate, or goes on; returns
        the (parent, hypothesis) pairs that go on."""
        limit = min(self.options.sample_len, row.max_tokens)
        max_length = self.model.decoder.n_ctx - 1
        going_on = []
        for parent, token, logprob in children:
            total = parent.sum_logprob + logprob
            if token == self.tokenizer.eot:
                row.candidates.append(Hypothesis(row, parent.tokens, total, feed=token))
                continue
            child = Hypothesis(row, [*parent.tokens, token], total, feed=token)
            if len(child.tokens) >= limit or len(row.prompt) + len(child.tokens) >= max_length:
                row.candidates.append(child)  # out of room: finished as it is
            else:
                going_on.append((parent, child))
        if row.current_temperature == 0 and row.search.beam_size > 1:
            enough = math.floor(row.search.beam_size * row.search.patience + 0.5)
            if len(row.candidates) >= enough:
                return []
        return going_on

    def _conclude(self, row: DecodeRow) -> bool:
        """The row's result at its current temperature; True if it is final, False if the quality rules send it
        to the next temperature. When every temperature fails, the best of its attempts is kept (faster-whisper)."""
        o = self.options
        best = max(row.candidates, key=row.score, default=Hypothesis(row, list(row.forced), 0.0, feed=self.tokenizer.eot))
        generated = len(best.tokens) - len(row.forced)
        attempt = Attempt(best.tokens, best.sum_logprob, row.current_temperature,
                          compression_ratio(self.tokenizer.decode(best.tokens).strip()), best.sum_logprob / (generated + 1))
        row.attempts.append(attempt)
        row.candidates = []
        fails = attempt.compression_ratio > o.compression_ratio_threshold or attempt.avg_logprob < o.logprob_threshold
        if row.no_speech_prob > o.no_speech_threshold and attempt.avg_logprob < o.logprob_threshold:
            fails = False  # silence: the post stage gives it no text
        if fails and len(row.attempts) < len(row.search.temperatures):
            return False
        if fails:
            readable = [a for a in row.attempts if a.compression_ratio <= o.compression_ratio_threshold]
            chosen = max(readable or row.attempts, key=lambda a: a.avg_logprob)
        else:
            chosen = attempt
        row.tokens, row.sum_logprob, row.temperature = chosen.tokens, chosen.sum_logprob, attempt.temperature
        row.finished = True
        return True

    def _start_over(self, row: DecodeRow) -> list[tuple[Hypothesis, Hypothesis]]:
        """The row begins again at its next temperature in one of its slots, whose prompt is still in the cache:
        from the prompt's last token, which is fed again."""
        keep = row.live[0]
        fed = len(row.prompt) + len(row.forced)
        self.cache.lengths[keep.slot] = fed - 1
        return [(keep, Hypothesis(row, list(row.forced), 0.0, feed=[*row.prompt, *row.forced][-1]))]

    def _place(self, row: DecodeRow, going_on: list[tuple[Hypothesis, Hypothesis]], copies: tuple[list[int], list[int]]) -> None:
        """Put the row's new hypotheses in slots: a child stays in its parent's slot when it is the first to
        claim it, else it takes a free slot of the row, or a new one, and its parent's keys and values are copied
        there (into ``copies``: they are made once every row is placed, before any slot is freed)."""
        old = [h.slot for h in row.live]
        claimed: set[int] = set()
        for parent, child in going_on:
            if parent.slot not in claimed:
                child.slot = parent.slot
                claimed.add(parent.slot)
        free = [slot for slot in old if slot not in claimed]
        for parent, child in going_on:
            if child.slot < 0:
                if free:
                    child.slot = free.pop(0)
                else:
                    child.slot = len(self.slots)
                    self.slots.append(child)
                    _, length, audio = self.cache.capacity
                    self.cache.reserve(len(self.slots), length, audio)
                copies[0].append(parent.slot)
                copies[1].append(child.slot)
            self.slots[child.slot] = child
        for slot in free:
            self.slots[slot] = None
        row.live = [child for _, child in going_on]

    def _free(self, hypotheses: list[Hypothesis]) -> None:
        for h in hypotheses:
            self.slots[h.slot] = None

    def _retire(self) -> None:
        """Fill freed hypothesis slots and the audio slots of finished rows with the last live ones."""

        def move_slot(src: int, dst: int) -> None:
            self.cache.move(src, dst)
            self.slots[src].slot = dst

        def move_audio(src: int, dst: int) -> None:
            self.cache.move_audio(src, dst)
            self.rows[src].audio_slot = dst

        _compact(self.slots, lambda h: h is None, move_slot)
        _compact(self.rows, lambda row: row.finished, move_audio)


def _compact(items: list, gone: Callable[[Any], bool], move: Callable[[int, int], None]) -> None:
    """Fill each gone item's place with the last live one (``move(last, place)``), so that live items keep
    places ``0..live-1`` and nothing else moves."""
    i = 0
    while i < len(items):
        if gone(items[i]):
            last = len(items) - 1
            if i != last and not gone(items[last]):
                move(last, i)
                items[i] = items[last]
            items.pop()
        else:
            i += 1
