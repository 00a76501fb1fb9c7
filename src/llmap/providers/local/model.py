"""The embedded model as the worker process loads it: llama-cpp-python set up for batched decoding.

Runs only inside :mod:`llmap.providers.local.worker` (never in llmap's own
process). Three pieces, used by :mod:`llmap.providers.local.decoder`:

* :func:`load_model` opens the GGUF file with a *unified* KV cache that
  several sequences share (``n_seq_max`` of them): the prompt prefix rows
  have in common (system prompt, few-shot turns) is held once, in sequence 0,
  and every row's sequence points at the same cells (llama.cpp's
  ``llama_memory_seq_cp`` copies no data in a unified cache). Gemma 3's
  sliding-window layers get a full-size cache (``swa_full``), so no cell of
  the prefix is evicted.
* :class:`GrammarChoice` is one row's grammar state and its greedy choice.
  With 262,144 tokens in Gemma's vocabulary, llama.cpp's grammar sampler
  costs tens of ms per token when it checks every token. At temperature 0 the
  answer is the argmax of the logits the grammar allows, so the argmax is
  checked alone first, and the whole vocabulary only when the grammar rejects
  it (as llama.cpp's own ``common_sampler`` does). Same token, by construction.
* :func:`chat_prompt` turns chat messages into prompt tokens exactly as
  llama-cpp-python's chat handler for the model does (its chat template, BOS,
  stop strings).
"""

from __future__ import annotations

import ctypes
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llama_cpp
import llama_cpp.llama as llama_module
import numpy as np
from llama_cpp import Llama

__all__ = ["FORCED", "LOGPROB_SLACK", "MASKS", "MAX_CANDIDATES", "NEAR", "GrammarChoice", "Grammars", "Prompt",
           "chat_prompt", "forced_text_findable", "load_model"]

#: Candidates checked against the grammar before the whole vocabulary is: the tokens whose logit is within
#: 8, then 16 of the best (a row's first token: the model would start with a space, and ``{`` ranks far down).
NEAR = (8.0, 16.0)
#: Most candidates one check takes (the best ones by logit).
MAX_CANDIDATES = 4096
#: Whole-vocabulary grammar verdicts remembered per process (32 KB each for a 262k vocabulary).
MASKS = 256
#: Fixed texts remembered per process (the oldest goes first).
FORCED = 4096
#: Log-probabilities are exact to this much (natural log): the grammar is checked over the whole
#: vocabulary only when the tokens it was not asked about could hold more probability than that.
LOGPROB_SLACK = 1e-4

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def load_model(model_path: str, *, n_ctx: int, n_threads: int, sequences: int, n_batch: int,
               n_ubatch: int, n_outputs: int) -> Llama:
    """Open a GGUF model for batched decoding.

    Args:
        model_path: the GGUF file.
        n_ctx: cells of the KV cache, shared by all sequences (tokens).
        n_threads: CPU threads for every decode.
        sequences: rows decoded together; the cache gets one sequence more, for the shared prefix.
        n_batch: most tokens in one ``llama_decode`` call.
        n_ubatch: most tokens llama.cpp computes in one pass (a larger call is split).
        n_outputs: most tokens with logits in one pass (262,144 floats each).

    Raises:
        ValueError: the file does not load (llama-cpp-python's error).
    """
    default = llama_module.llama_cpp.llama_context_default_params

    def params() -> Any:
        p = default()
        p.n_seq_max = sequences + 1
        p.kv_unified = True
        p.n_outputs_max = n_outputs
        return p

    # Llama() takes no n_seq_max or kv_unified: hand it default parameters that carry them.
    llama_module.llama_cpp.llama_context_default_params = params
    try:
        return Llama(model_path=model_path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                     n_batch=n_batch, n_ubatch=n_ubatch, swa_full=True, verbose=False)
    finally:
        llama_module.llama_cpp.llama_context_default_params = default


@dataclass(frozen=True, slots=True)
class Prompt:
    """A chat request as the model reads it.

    Attributes:
        tokens: prompt token ids (BOS and chat template included).
        stop: stop strings of the chat format (UTF-8), possibly empty.
        stopping_criteria: the chat format's own criteria, or None; called with
            (token ids so far, logits) and True ends the answer.
    """

    tokens: list[int]
    stop: tuple[bytes, ...]
    stopping_criteria: Callable[[Any, Any], bool] | None


class _Captured(Exception):
    pass


def chat_prompt(llm: Llama, messages: list[dict[str, Any]]) -> Prompt:
    """The prompt llama-cpp-python's chat handler builds for ``messages`` (its template, BOS, stop strings).

    The handler is run up to the point where it would generate; the tokens it
    would generate from are taken from there, so any chat format the model
    has is honoured.
    """
    seen: dict[str, Any] = {}

    def capture(**kw: Any) -> Any:
        seen.update(kw)
        raise _Captured

    llm.create_completion = capture  # type: ignore[method-assign]
    try:
        llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=1)
    except _Captured:
        pass
    finally:
        del llm.create_completion
    stop = seen.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    return Prompt(list(seen["prompt"]), tuple(s.encode("utf-8") for s in stop), seen.get("stopping_criteria"))


class Grammars:
    """Parsed GBNF grammars, one llama.cpp sampler per text, cloned for each row."""

    def __init__(self, llm: Llama) -> None:
        self.vocab = llm._model.vocab
        self._templates: dict[str, Any] = {}

    def sampler(self, gbnf: str) -> Any:
        """A fresh grammar sampler (its own parse state) for ``gbnf``, whose start rule is ``root``.

        Raises:
            ValueError: llama.cpp cannot parse the grammar.
        """
        template = self._templates.get(gbnf)
        if template is None:
            template = llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode("utf-8"), b"root")
            if not template:
                raise ValueError("llama.cpp could not parse the answer's grammar")
            self._templates[gbnf] = template
        return llama_cpp.llama_sampler_clone(template)

    def close(self) -> None:
        for t in self._templates.values():
            llama_cpp.llama_sampler_free(t)
        self._templates.clear()


class _Scratch:
    """Token-data buffers the grammar is applied to (one set per process: rows are chosen one at a time),
    and the probe tokens :meth:`GrammarChoice.forced` asks the grammar about."""

    def __init__(self, llm: Llama) -> None:
        n_vocab = llm.n_vocab()
        self.n_vocab = n_vocab
        self.some = np.zeros(MAX_CANDIDATES, dtype=_TOKEN_DATA)
        self.full = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self._some = llama_cpp.llama_token_data_array(
            self.some.ctypes.data_as(llama_cpp.llama_token_data_p), 0, -1, False)
        self._full = llama_cpp.llama_token_data_array(
            self.full.ctypes.data_as(llama_cpp.llama_token_data_p), n_vocab, -1, False)
        # one token per printable ASCII character (and newline, tab), then the end-of-generation tokens
        chars, ids = [], []
        for c in map(chr, [9, 10, *range(32, 127)]):
            toks = llm.tokenize(c.encode(), add_bos=False, special=False)
            if len(toks) == 1 and llm.detokenize(toks) == c.encode():
                chars.append(c)
                ids.append(toks[0])
        vocab = llm._model.vocab
        eog = {t for t in (llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab)) if t >= 0}
        self.probe_chars = chars
        self.probe_ids = np.array([*ids, *sorted(eog)], dtype=np.int32)
        self.probe_zeros = np.zeros(len(self.probe_ids), dtype=np.float32)
        # a token of one character outside ASCII: a grammar that allows it next allows text the probe cannot list
        wide = llm.tokenize("é".encode(), add_bos=False, special=False)
        self.wide_id = np.array(wide[:1] if len(wide) == 1 else [], dtype=np.int32)
        #: (grammar, answer prefix) -> the grammar's verdict on every token, packed 8 to a byte
        self.masks: OrderedDict[tuple[str, tuple[int, ...]], np.ndarray] = OrderedDict()
        #: (grammar, answer prefix) -> the text the grammar fixes next, and the characters it allows after that
        #: (None: a character outside printable ASCII may come next)
        self.forced: dict[tuple[str, tuple[int, ...]], tuple[str, str | None]] = {}

    def allowed(self, smpl: Any, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """The grammar's verdict on ``ids`` (at most :data:`MAX_CANDIDATES`): their logits, -inf where it rejects
        one."""
        n = len(ids)
        self.some["id"][:n] = ids
        self.some["logit"][:n] = logits
        self._some.size, self._some.selected, self._some.sorted = n, -1, False
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(self._some))
        return self.some["logit"][:n]

    def allowed_all(self, smpl: Any, logits: np.ndarray) -> np.ndarray:
        """The grammar's verdict on the whole vocabulary: the logits, -inf where it rejects the token."""
        self.full["id"] = self.ids
        self.full["logit"] = logits
        self._full.size, self._full.selected, self._full.sorted = self.n_vocab, -1, False
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(self._full))
        return self.full["logit"]


class GrammarChoice:
    """One row's grammar state: the greedy token it allows, and that token's log-probability.

    Args:
        smpl: a llama.cpp grammar sampler of this row's own (see :class:`Grammars`), or None (no grammar).
        scratch: the process's shared buffers (see :meth:`scratch`).
        key: names the grammar (its GBNF text): the tokens it allows over the whole vocabulary
            after a given answer prefix are then remembered for the rows that write the same
            prefix (``{"kind": "`` is the same state in every row). None: nothing remembered.
    """

    def __init__(self, smpl: Any, scratch: _Scratch, key: str | None = None) -> None:
        self.smpl = smpl
        self.scratch = scratch
        self.key = key
        self.history: list[int] = []
        #: whole-vocabulary grammar checks, for the benchmark
        self.full_checks = 0

    @staticmethod
    def scratch(llm: Llama) -> _Scratch:
        """Buffers for ``llm``'s vocabulary, shared by every row of a process."""
        return _Scratch(llm)

    def forced(self, limit: int = 64) -> tuple[str, str | None]:
        """The text the grammar allows and nothing else from here (up to ``limit`` characters), or "", and the
        characters it allows after that text: a string of printable ASCII characters ("" when only the end of
        the answer may come), or None when a character outside printable ASCII may come there (or the limit
        was reached).

        Asks the grammar, one character at a time, which printable ASCII
        character may come next; while it allows exactly one and not the end
        of generation, that character is fixed. Exact for grammars whose
        literals and character classes are ASCII (see :func:`forced_text_findable`).
        Remembered per (grammar, answer prefix) when the choice has a ``key``.
        """
        if self.smpl is None:
            return "", None
        sc = self.scratch
        key = (self.key, tuple(self.history)) if self.key is not None else None
        if key is not None and key in sc.forced:
            return sc.forced[key]
        probe = llama_cpp.llama_sampler_clone(self.smpl)
        out: list[str] = []
        after: str | None = None
        try:
            for _ in range(limit):
                ok = np.flatnonzero(sc.allowed(probe, sc.probe_ids, sc.probe_zeros) != -np.inf)
                if len(ok) != 1 or ok[0] >= len(sc.probe_chars):
                    wide = len(sc.wide_id) == 0 or sc.allowed(probe, sc.wide_id, sc.probe_zeros[:1])[0] != -np.inf
                    if not wide:  # (the end of the answer may come too: no text to merge with)
                        after = "".join(sc.probe_chars[i] for i in ok if i < len(sc.probe_chars))
                    break
                out.append(sc.probe_chars[ok[0]])
                llama_cpp.llama_sampler_accept(probe, int(sc.probe_ids[ok[0]]))
        finally:
            llama_cpp.llama_sampler_free(probe)
        found = ("".join(out), after)
        if key is not None:
            sc.forced[key] = found
            if len(sc.forced) > FORCED:
                sc.forced.pop(next(iter(sc.forced)))
        return found

    def pick(self, logits: np.ndarray) -> int | None:
        """The greedy token for these logits, or None when the grammar allows no token.

        Exactly llama.cpp's grammar-then-greedy choice (the highest logit the
        grammar allows; the lowest id among ties), checked in widening steps:
        the argmax alone, then the tokens near the best (:data:`NEAR`), then
        the whole vocabulary.
        """
        tok = int(logits.argmax())
        if self.smpl is None:
            return tok
        sc = self.scratch
        if sc.allowed(self.smpl, np.array([tok]), logits[tok:tok + 1])[0] != -np.inf:
            return tok
        m = float(logits[tok])
        for near in NEAR:
            cand = _best(logits, m - near)
            vals = logits[cand]
            ok = np.flatnonzero(sc.allowed(self.smpl, cand, vals) != -np.inf)
            # every token left out is below the last candidate: it cannot reach or tie the best allowed one
            if len(ok) and vals[ok[0]] > _floor(logits, cand, m - near):
                return int(cand[ok[0]])
        mask = self._mask(logits)
        if not mask.any():
            return None  # a dead end: end the answer; validation and re-ask handle it
        return int(np.where(mask, logits, -np.inf).argmax())

    def logprob(self, logits: np.ndarray, tok: int) -> float:
        """Natural log of ``tok``'s probability among the tokens the grammar allows here (softmax of the logits,
        renormalised over the allowed tokens; over the whole vocabulary when there is no grammar).

        Exact to :data:`LOGPROB_SLACK`: the grammar is asked first about the tokens
        within e^16 of the best; the whole vocabulary is checked only when the
        rest could hold more than that share of the allowed probability (and
        its verdict is remembered for the next row at the same answer prefix).
        Costs about 0.5 ms of a 262k vocabulary when the shortcut holds.
        """
        m = float(logits.max())
        e = np.exp(logits - m)  # float32; sums are pairwise, each term at most 1
        if self.smpl is None:
            return min(0.0, float(logits[tok]) - m - math.log(float(e.sum())))
        sc = self.scratch
        near = _best(logits, m - NEAR[-1], ordered=False)
        if tok not in near:  # its logit is far below the best: ask about it too (the one it may replace
            near = np.append(near, tok) if len(near) < MAX_CANDIDATES else np.append(near[:-1], tok)  # goes to rest)
        ok = sc.allowed(self.smpl, near, logits[near]) != -np.inf
        allowed = float(e[near[ok]].sum(dtype=np.float64))
        e[near] = 0.0
        rest = float(e.sum())  # the tokens the grammar was not asked about: at most this much is allowed
        if rest > LOGPROB_SLACK * allowed:
            e = np.exp(logits - m)
            allowed = float(e[self._mask(logits)].sum(dtype=np.float64))
        return min(0.0, float(logits[tok]) - m - math.log(allowed))  # (float32 rounding can go a hair above 0)

    def _mask(self, logits: np.ndarray) -> np.ndarray:
        """Which tokens of the whole vocabulary the grammar allows here (remembered by answer prefix)."""
        sc = self.scratch
        key = (self.key, tuple(self.history)) if self.key is not None else None
        packed = sc.masks.get(key) if key is not None else None
        if packed is not None:
            sc.masks.move_to_end(key)
            return np.unpackbits(packed, count=sc.n_vocab).astype(bool)
        self.full_checks += 1
        mask = sc.allowed_all(self.smpl, logits) != -np.inf
        if key is not None:
            sc.masks[key] = np.packbits(mask)
            if len(sc.masks) > MASKS:
                sc.masks.popitem(last=False)
        return mask

    def accept(self, tok: int) -> None:
        """Advance the grammar past ``tok``."""
        if self.smpl is not None:
            llama_cpp.llama_sampler_accept(self.smpl, tok)
            self.history.append(tok)

    def close(self) -> None:
        if self.smpl is not None:
            llama_cpp.llama_sampler_free(self.smpl)
            self.smpl = None


def forced_text_findable(gbnf: str) -> bool:
    """True when :meth:`GrammarChoice.forced` is exact for this grammar: its text is ASCII with no
    ``\\x``/``\\u`` escapes, so no literal or character class allows a character the probe does not ask about
    (a negated class allows many ASCII characters, so nothing it covers is ever taken as fixed)."""
    return gbnf.isascii() and not any(e in gbnf for e in ("\\x", "\\u", "\\U"))


def _best(logits: np.ndarray, floor: float, *, ordered: bool = True) -> np.ndarray:
    """Ids of the tokens with a logit of at least ``floor``, at most :data:`MAX_CANDIDATES` of them (the
    best); ``ordered``: best first (ties: lowest id)."""
    ids = np.flatnonzero(logits >= floor)
    if len(ids) > MAX_CANDIDATES:
        ids = ids[np.argpartition(-logits[ids], MAX_CANDIDATES - 1)[:MAX_CANDIDATES]]
    return ids[np.lexsort((ids, -logits[ids]))] if ordered else ids


def _floor(logits: np.ndarray, cand: np.ndarray, floor: float) -> float:
    """The highest logit a token left out of ``cand`` can have."""
    if len(cand) < MAX_CANDIDATES:
        return np.nextafter(np.float32(floor), np.float32(-np.inf))  # everything left out is below floor
    return float(logits[cand[-1]])
