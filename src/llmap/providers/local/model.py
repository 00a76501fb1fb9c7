"""The embedded model as the worker process runs it: llama-cpp-python, made fast for llmap's rows.

Runs only inside :mod:`llmap.providers.local.worker` (never in llmap's own
process). Three things make a row cost only its own tokens, measured on the
Wyoming job (``bench/b16_local.py``):

* **Prefix reuse on a fixed block grid.** Every row of a job starts with the
  same system prompt and few-shot turns (about 250 tokens). The prompt is
  evaluated in blocks of :data:`BLOCK` tokens at fixed positions (0-15,
  16-31, ...), with logits only for the last token. The KV cache keeps the
  complete blocks of the previous prompt; the next prompt skips the blocks it
  shares with them. llama.cpp's CPU kernels are not batch-invariant (the same
  token evaluated in a batch of 18 or of 245 can get different logits, and a
  greedy answer can change), so the no-reuse path evaluates the same blocks:
  answers are identical with and without reuse, by construction.
  Gemma 3's sliding-window layers get a full-size cache (``swa_full``), so no
  cell of the prefix is evicted; a cache that lost its start anyway is
  rebuilt from position 0.
* **Greedy decoding under the grammar, argmax first.** With 262,144 tokens in
  Gemma's vocabulary, llama.cpp's grammar sampler costs tens of ms per token
  when it checks every token. At temperature 0 the answer is the argmax of the
  logits the grammar allows, so the argmax is checked alone first, and the
  whole vocabulary only when the grammar rejects it (as llama.cpp's own
  ``common_sampler`` does). Same token, by construction.
* **Prompt-lookup drafts.** Answers repeat text from the few-shot turns
  (``{"kind": "county", "confidence": 0.9}``): the tokens that followed the
  latest earlier occurrence of the last :data:`NGRAM` tokens are proposed and
  verified in one batch, and kept as far as they equal the greedy choice.

Other sampling settings (temperature above 0, penalties) go through
llama-cpp-python's own ``generate`` unchanged.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama, LlamaGrammar

from llmap.providers.local.drafting import DRAFT_MAX, NGRAM, draft

__all__ = ["BLOCK", "TOP_K", "FastLlama"]

#: Prompt block size in tokens: the grid on which KV state is reused.
BLOCK = 16
#: Candidates checked against the grammar before the whole vocabulary is.
TOP_K = 64

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class _GreedyGrammar:
    """Greedy choice under a GBNF grammar: the argmax if the grammar allows it, else the best allowed token."""

    def __init__(self, llm: Llama, grammar: LlamaGrammar | None) -> None:
        self.n_vocab = llm.n_vocab()
        self.smpl = None
        if grammar is not None:
            self.smpl = llama_cpp.llama_sampler_init_grammar(
                llm._model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8"))
            self.some = np.zeros(TOP_K, dtype=_TOKEN_DATA)
            self.full = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)
            self.full["id"] = np.arange(self.n_vocab, dtype=np.int32)
            self._some = llama_cpp.llama_token_data_array(
                self.some.ctypes.data_as(llama_cpp.llama_token_data_p), TOP_K, -1, False)
            self._full = llama_cpp.llama_token_data_array(
                self.full.ctypes.data_as(llama_cpp.llama_token_data_p), self.n_vocab, -1, False)

    def _allowed(self, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """The grammar's verdict on ``ids``: their logits, with -inf where it rejects the token."""
        n = len(ids)
        self.some["id"][:n] = ids
        self.some["logit"][:n] = logits
        self._some.size, self._some.selected, self._some.sorted = n, -1, False
        llama_cpp.llama_sampler_apply(self.smpl, ctypes.byref(self._some))
        return self.some["logit"][:n]

    def pick(self, logits: np.ndarray) -> int | None:
        """The greedy token for these logits, or None when the grammar allows no token.

        Exactly llama.cpp's grammar-then-greedy choice (the highest logit the
        grammar allows; the lowest id among ties), checked in three widening
        steps: the argmax alone, then the :data:`TOP_K` best tokens in order,
        then the whole vocabulary.
        """
        tok = int(logits.argmax())
        if self.smpl is None:
            return tok
        if self._allowed(np.array([tok]), logits[tok:tok + 1])[0] != -np.inf:
            return tok
        top = np.argpartition(-logits, TOP_K)[:TOP_K]
        top = top[np.lexsort((top, -logits[top]))]  # best first; ties by lowest id, as llama.cpp's greedy
        vals = logits[top]
        ok = np.flatnonzero(self._allowed(top, vals) != -np.inf)
        if len(ok) and vals[ok[0]] > vals[-1]:  # nothing outside the top K can reach or tie it
            return int(top[ok[0]])
        self.full["logit"] = logits
        self._full.size, self._full.selected, self._full.sorted = self.n_vocab, -1, False
        llama_cpp.llama_sampler_apply(self.smpl, ctypes.byref(self._full))
        best = int(self.full["logit"].argmax())
        if self.full["logit"][best] == -np.inf:
            return None  # a dead end: end the answer; validation and re-ask handle it
        return int(self.full["id"][best])

    def accept(self, tok: int) -> None:
        if self.smpl is not None:
            llama_cpp.llama_sampler_accept(self.smpl, tok)

    def close(self) -> None:
        if self.smpl is not None:
            llama_cpp.llama_sampler_free(self.smpl)
            self.smpl = None


class FastLlama(Llama):
    """``llama_cpp.Llama`` whose ``generate`` reuses the prompt's KV blocks and decodes greedily fast.

    Args:
        prefix_reuse: keep the previous prompt's complete blocks in the KV cache
            and skip the ones the next prompt shares (default True). False
            evaluates every block of every prompt: the reference path; the
            answers are the same.
        draft_max: most tokens per prompt-lookup draft (0 turns drafting off).
        cancelled: polled once per token; True ends the generation early.
        **kwargs: passed to ``llama_cpp.Llama`` (``swa_full`` defaults to True).
    """

    def __init__(self, *args: Any, prefix_reuse: bool = True, draft_max: int = DRAFT_MAX,
                 cancelled: Callable[[], bool] = lambda: False, **kwargs: Any) -> None:
        kwargs.setdefault("swa_full", True)
        super().__init__(*args, **kwargs)
        if BLOCK + draft_max > self.n_batch:
            raise ValueError(f"n_batch {self.n_batch} is below a block and a draft ({BLOCK} + {draft_max} tokens)")
        self.prefix_reuse = prefix_reuse
        self.draft_max = draft_max
        self.cancelled = cancelled
        self._grid = 0  # leading positions in the KV cache evaluated as complete prompt blocks
        #: counters for the benchmark: prompt tokens evaluated and skipped, decode calls, drafted and kept tokens
        self.counters = {"prompt_eval": 0, "prompt_reused": 0, "decodes": 0, "drafted": 0, "draft_kept": 0}
        #: seconds spent evaluating prompts, decoding answer tokens, and choosing tokens (grammar)
        self.timers = {"prompt_s": 0.0, "decode_s": 0.0, "sample_s": 0.0}

    # -- prompt ---------------------------------------------------------------
    def _decode(self, tokens: Sequence[int], pos: int, first_logit: int | None) -> None:
        """Decode ``tokens`` at positions ``pos``, ``pos + 1``, ...; logits for batch rows from ``first_logit`` on."""
        self._batch.set_batch(batch=tokens, n_past=pos, logits_all=False)
        flags = self._batch.batch.logits
        for i in range(len(tokens)):
            flags[i] = first_logit is not None and i >= first_logit
        self._ctx.decode(self._batch)
        self.input_ids[pos:pos + len(tokens)] = tokens
        self.n_tokens = pos + len(tokens)
        self.counters["decodes"] += 1

    def _prefill(self, tokens: Sequence[int], proposal: Sequence[int]) -> int:
        """Make the KV cache hold ``tokens`` then ``proposal``; return the batch row of the last prompt token.

        Blocks of :data:`BLOCK` tokens at fixed positions; the block holding the
        last prompt token is decoded together with ``proposal`` (draft tokens to
        verify), with logits from the last prompt token on. Complete blocks before
        it are kept for the next prompt (``prefix_reuse``).
        """
        keep = 0
        if self.prefix_reuse and self._grid:
            cached = self.input_ids[:self._grid]
            head = np.asarray(tokens[:self._grid], dtype=cached.dtype)
            diff = np.flatnonzero(cached[:len(head)] != head)
            lcp = int(diff[0]) if len(diff) else len(head)
            keep = (min(lcp, len(tokens) - 1) // BLOCK) * BLOCK
        if keep:
            self._ctx.kv_cache_seq_rm(-1, keep, -1)
            mem = llama_cpp.llama_get_memory(self._ctx.ctx)
            if llama_cpp.llama_memory_seq_pos_min(mem, 0) != 0:
                keep = 0  # the cache lost its first cells (sliding window): start over
        if not keep:
            self._ctx.kv_cache_clear()
        self.counters["prompt_reused"] += keep
        self.counters["prompt_eval"] += len(tokens) - keep
        self._grid = 0
        last = ((len(tokens) - 1) // BLOCK) * BLOCK  # start of the block holding the last prompt token
        t0 = time.perf_counter()
        for start in range(keep, last, BLOCK):
            self._decode(tokens[start:start + BLOCK], start, None)
        self._decode([*tokens[last:], *proposal], last, len(tokens) - 1 - last)
        self.timers["prompt_s"] += time.perf_counter() - t0
        self._grid = last  # the last block went with logits and drafts: never reused
        self._requires_eval = False
        return len(tokens) - 1 - last

    # -- generation -----------------------------------------------------------
    def generate(self, tokens: Sequence[int], *args: Any, **kw: Any) -> Iterator[int]:
        """Yield completion tokens for the prompt ``tokens`` (see ``llama_cpp.Llama.generate``).

        At temperature 0 with no penalties or logits processors, this is
        prefix-reusing greedy decoding (see the module docstring); otherwise
        llama-cpp-python's own loop, after which no block is reused. A
        ``stopping_criteria`` (chat templates bring one) is asked before each
        token with the tokens so far and the logits, as llama-cpp-python does.
        """
        fast = (
            not args and kw.get("temp") == 0.0 and kw.get("logits_processor") is None
            and kw.get("repeat_penalty", 1.0) == 1.0
            and not kw.get("frequency_penalty") and not kw.get("presence_penalty")
            and not kw.get("mirostat_mode") and self.draft_model is None
        )
        if not fast:
            self._grid = 0
            yield from super().generate(tokens, *args, **kw)
            return
        history = list(tokens)
        proposal = self._propose(history) or self._propose_across_boundary(history)
        row = self._prefill(history, proposal)
        greedy = _GreedyGrammar(self, kw.get("grammar"))
        try:
            yield from self._greedy(history, greedy, row, proposal, kw.get("stopping_criteria"))
        finally:
            greedy.close()

    def _propose(self, history: list[int]) -> list[int]:
        room = self.n_ctx() - len(history) - 2
        if not self.draft_max or room <= 0:
            return []
        return draft(history, max_tokens=min(self.draft_max, room))

    def _propose_across_boundary(self, history: list[int]) -> list[int]:
        """A draft for the first answer token, when the prompt's last token is the start of a longer one.

        A prompt ends where the answer begins, a boundary earlier turns do not
        have: in ``... [/INST]{"kind"...`` the examples hold the token ``]{"``
        where the prompt ends in ``]``. Find the latest earlier ``ngram - 1``
        tokens equal to the prompt's, followed by a token whose text extends the
        prompt's last token; propose the rest of that token's text, re-tokenized,
        then what followed it.
        """
        n = len(history)
        room = self.n_ctx() - n - 2
        if not self.draft_max or n <= NGRAM or room <= 0:
            return []
        lead, last = history[n - NGRAM:n - 1], history[n - 1]
        last_text = self.detokenize([last])
        for start in range(n - NGRAM - 1, -1, -1):
            if history[start:start + NGRAM - 1] != lead:
                continue
            cand = history[start + NGRAM - 1]
            text = self.detokenize([cand])
            if cand != last and len(text) > len(last_text) and text.startswith(last_text):
                rest = self.tokenize(text[len(last_text):], add_bos=False, special=False)
                out = [*rest, *history[start + NGRAM:start + NGRAM + self.draft_max]]
                return out[:min(self.draft_max, room)]
        return []

    def _greedy(self, history: list[int], greedy: _GreedyGrammar, row: int, pending: list[int],
                stop: Callable[[Any, Any], bool] | None) -> Iterator[int]:
        """Greedy tokens; ``row`` is the batch row predicting the next token, ``pending`` the drafts after it."""
        timers, counters = self.timers, self.counters
        n_vocab = self.n_vocab()
        while True:
            start = len(history)  # position of pending[0]
            counters["drafted"] += len(pending)
            k = 0
            while True:
                if self.cancelled():
                    return
                t0 = time.perf_counter()
                logits = np.ctypeslib.as_array(self._ctx.get_logits_ith(row + k), shape=(n_vocab,))
                tok = greedy.pick(logits)
                timers["sample_s"] += time.perf_counter() - t0
                if tok is None or (stop is not None and stop(np.asarray(history, dtype=np.intc), logits)):
                    return
                greedy.accept(tok)
                history.append(tok)
                if k < len(pending) and tok == pending[k]:
                    k += 1
                    counters["draft_kept"] += 1
                    yield tok
                    continue
                break
            # tok is new: drop the rejected drafts from the cache, then decode tok with a fresh draft
            if k < len(pending):
                self._ctx.kv_cache_seq_rm(-1, start + k, -1)
            self.n_tokens = start + k
            yield tok
            if self.n_tokens + 1 >= self.n_ctx():
                return
            pending = self._propose(history)
            t0 = time.perf_counter()
            self._decode([tok, *pending], self.n_tokens, 0)
            timers["decode_s"] += time.perf_counter() - t0
            row = 0
