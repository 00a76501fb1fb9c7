"""Batched greedy decoding: several rows' sequences in one ``llama_decode`` per step.

On a CPU, decoding a 270M model is bound by reading its weights: one token of
one row reads them all. Decoding the next token of 8 rows in one batch reads
them once. This module does what llama-server's ``--parallel`` slots do, for
llmap's rows (measured in ``bench/b16_local.py``):

* **Continuous batching.** Up to ``sequences`` rows are in flight, each with a
  llama.cpp sequence id of its own (1, 2, ...). Every :meth:`BatchDecoder.step`
  puts the next token of every decoding row, and chunks of the prompts of rows
  just admitted, into one ``llama_batch``; a row that ends frees its slot for
  the next request at once.
* **The shared prefix is evaluated once.** Sequence 0 holds the prompt
  tokens the last rows had in common (system prompt, few-shot turns). A new
  row keeps the longest common prefix of its prompt with sequence 0
  (``llama_memory_seq_cp``: in a unified cache the cells are shared, nothing
  is copied) and evaluates only the rest. When sequence 0 is empty or was just
  cut back, the next row's prompt tokens are also tagged with sequence 0 as
  they are evaluated, so the row after it finds its prefix there.
* **Each row has its own grammar** (:class:`~llmap.providers.local.model.GrammarChoice`),
  and the greedy choice checks the argmax first.
* **Prompt-lookup drafts** (:mod:`llmap.providers.local.drafting`) while few
  rows are in flight. Each drafted token costs a row of the 262k-wide output
  layer, whose cost batching does not share, so drafts pay only when the batch
  is small (the last rows of a run, or one request at a time).

llama.cpp's CPU kernels are not batch-invariant: a token evaluated among 8
others can get slightly different logits than alone, so a greedy answer can
change where two tokens are nearly tied. ``bench/b16_local.py`` counts the
rows whose answer differs from one-at-a-time decoding.
"""

from __future__ import annotations

import codecs
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from llmap.providers.local.drafting import DRAFT_MAX, draft
from llmap.providers.local.model import GrammarChoice

__all__ = ["DRAFT_ROWS", "HOLD_FOR", "BatchDecoder", "Finished", "Job", "JsonEnd"]

#: Drafts are proposed only while at most this many rows are decoding.
DRAFT_ROWS = 2
#: A row waits for the prefix the row in front of it is evaluating when it would share this many more tokens.
HOLD_FOR = 16


@dataclass(eq=False)
class Job:
    """One greedy generation.

    Attributes:
        rid: the caller's id for it (replies carry it back).
        prompt: prompt token ids.
        grammar: the row's grammar choice (:class:`GrammarChoice`, with or without a grammar).
        max_tokens: most completion tokens.
        stop: stop strings; the answer is cut before the first one.
        stopping: called with (token ids so far, logits) before each token; True ends the answer.
        logprobs: also report each token's log-probability under the grammar.
        jump: write the text the grammar fixes (keys, separators) without asking the model
            (see :meth:`BatchDecoder._jump`); only for grammars whose forced text
            :meth:`GrammarChoice.forced` can find.
        json_end: the answer is one JSON object or array (the grammar says so): it ends where
            its outermost bracket closes, without asking the model for an end-of-text token
            (which a small model often ranks below whitespace the grammar forbids, so the grammar
            would have to check the whole vocabulary to find it).
    """

    rid: Hashable
    prompt: list[int]
    grammar: GrammarChoice
    max_tokens: int
    stop: tuple[bytes, ...] = ()
    stopping: Callable[[Any, Any], bool] | None = None
    logprobs: bool = False
    json_end: bool = False
    jump: bool = False
    # -- state while decoding
    seq: int = -1
    tokens: list[int] = field(default_factory=list)
    n_past: int = 0
    reused: int = 0
    out: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)
    extends: bool = False
    need: int = 0
    scan: JsonEnd = field(default_factory=lambda: JsonEnd())


@dataclass(frozen=True, slots=True)
class Finished:
    """A generation that ended.

    Attributes:
        rid: the job's id.
        text: the completion (UTF-8; stop strings cut off).
        tokens: the completion's tokens, each ``(text, logprob)``; the texts concatenate to ``text``;
            logprob is None unless the job asked for it.
        prompt_tokens, completion_tokens: token counts.
        finish: ``"stop"`` (end of answer), ``"length"`` (``max_tokens`` reached) or ``"cancelled"``.
        error: why llama.cpp could not decode it (then the rest is empty), or None.
    """

    rid: Hashable
    text: str
    tokens: tuple[tuple[str, float | None], ...]
    prompt_tokens: int
    completion_tokens: int
    finish: str
    error: str | None = None


class BatchDecoder:
    """Greedy decoding of up to ``sequences`` jobs at once over one llama.cpp context.

    Args:
        llm: a model from :func:`~llmap.providers.local.model.load_model` with at
            least ``sequences + 1`` sequences and ``kv_cells`` cells.
        sequences: rows decoded together (1 = one at a time).
        kv_cells: cells of the unified KV cache (tokens).
        n_batch: most tokens per ``llama_decode`` call.
        n_outputs: most tokens with logits per call (the context's ``n_outputs_max``; llama.cpp
            aborts the process beyond it).
        prefix_reuse: share the prompt prefix rows have in common (sequence 0);
            False evaluates every prompt whole (the reference path).
        draft_max: most tokens per prompt-lookup draft (0: none).
        draft_rows: drafts only while at most this many rows decode.
    """

    def __init__(self, llm: Any, *, sequences: int, kv_cells: int, n_batch: int, n_outputs: int,
                 prefix_reuse: bool = True, draft_max: int = DRAFT_MAX, draft_rows: int = DRAFT_ROWS) -> None:
        self.llm = llm
        self.ctx = llm._ctx.ctx
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llm._model.vocab
        self.n_vocab = llm.n_vocab()
        self.sequences = sequences
        self.kv_cells = kv_cells
        self.n_batch = n_batch
        self.n_outputs = n_outputs
        self.prefix_reuse = prefix_reuse
        self.draft_max = draft_max
        self.draft_rows = draft_rows
        self.pending: deque[Job] = deque()
        self.active: list[Job] = []
        self.free_seqs = list(range(sequences, 0, -1))
        self.prefix: list[int] = []  # tokens whose KV state sequence 0 holds, at positions 0..
        self.extender: Job | None = None
        #: True: admit no new job (the worker drains the batch to run a request on its own)
        self.hold = False
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 2)
        self._apart_memo: dict[tuple[int, str], bool] = {}
        #: counters for the benchmark
        self.counters = {"prompt_eval": 0, "prompt_reused": 0, "steps": 0, "step_tokens": 0, "outputs": 0,
                         "drafted": 0, "draft_kept": 0, "forced": 0, "full_checks": 0}
        #: seconds in llama_decode, and in choosing tokens (grammar, log-probabilities)
        self.timers = {"decode_s": 0.0, "choice_s": 0.0}

    # -- queue ----------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """Nothing to do: no job decoding, and none queued that may be admitted."""
        return not self.active and (self.hold or not self.pending)

    def submit(self, job: Job) -> None:
        """Queue a job; it is admitted at the next :meth:`step` with a free slot and room in the cache."""
        job.tokens = list(job.prompt)
        self.pending.append(job)

    def cancel(self, rid: Hashable) -> Finished | None:
        """Stop the job ``rid`` now; returns its ``cancelled`` result, or None if it is not here."""
        for job in list(self.pending):
            if job.rid == rid:
                self.pending.remove(job)
                job.grammar.close()
                return self._result(job, "cancelled")
        for job in self.active:
            if job.rid == rid:
                return self._finish(job, "cancelled")
        return None

    def abort(self, why: str) -> list[Finished]:
        """End every decoding job with the error ``why`` and clear the cache (after an unexpected failure)."""
        out = [self._finish(job, "error", error=why) for job in list(self.active)]
        self.reset()
        return out

    def reset(self) -> None:
        """Forget the shared prefix and clear the cache (no job may be active)."""
        assert not self.active
        self.prefix = []
        self.extender = None
        llama_cpp.llama_memory_clear(self.mem, True)

    def close(self) -> None:
        for job in [*self.pending, *self.active]:
            job.grammar.close()
        self.pending.clear()
        self.active.clear()
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None

    # -- admission ------------------------------------------------------------
    def _used(self) -> int:
        return len(self.prefix) + sum(j.need for j in self.active)

    def _admit(self) -> None:
        while self.pending and self.free_seqs and not self.hold:
            job = self.pending[0]
            keep = 0
            if self.prefix_reuse and self.prefix:
                keep = _common_prefix(self.prefix, job.prompt)
                keep = min(keep, len(job.prompt) - 1)
            ext = self.extender
            if ext is not None and _common_prefix(ext.prompt, job.prompt) > keep + HOLD_FOR:
                return  # the row in front is making the prefix this one needs: admit it after that step
            job.need = len(job.prompt) - keep + job.max_tokens + self.draft_max + 1
            if self._used() - len(self.prefix) + keep + job.need > self.kv_cells:
                if self.active:
                    return  # wait for a row to end
                self.reset()  # alone it fits (max_tokens is capped at n_ctx): drop the prefix
                keep = 0
                job.need = len(job.prompt) + job.max_tokens + self.draft_max + 1
            self.pending.popleft()
            if keep < len(self.prefix):
                llama_cpp.llama_memory_seq_rm(self.mem, 0, keep, -1)
                self.prefix = self.prefix[:keep]
                if self.extender is not None:
                    self.extender.extends = False
                    self.extender = None
            job.seq = self.free_seqs.pop()
            llama_cpp.llama_memory_seq_rm(self.mem, job.seq, -1, -1)
            if keep:
                llama_cpp.llama_memory_seq_cp(self.mem, 0, job.seq, 0, keep)
            job.n_past = job.reused = keep
            self.counters["prompt_reused"] += keep
            self.counters["prompt_eval"] += len(job.prompt) - keep
            if self.prefix_reuse and self.extender is None and keep == len(self.prefix):
                job.extends = True  # its prompt becomes the prefix the next row is compared with
                self.extender = job
            self.active.append(job)

    # -- one step -------------------------------------------------------------
    def step(self) -> list[Finished]:
        """Admit what fits, decode one batch, choose each row's next token(s); returns the jobs that ended."""
        self._admit()
        if not self.active:
            return []
        b = self.batch
        n = 0
        plan: list[tuple[Job, int, int]] = []  # job, first batch index, tokens it put in
        # what each row puts in: rows with a token to choose first (each needs one output), then prompt chunks
        order = sorted(self.active, key=lambda j: j.n_past < len(j.prompt))
        room, outputs = self.n_batch, self.n_outputs
        chunks: list[tuple[Job, list[int], bool]] = []
        for job in order:
            todo = job.tokens[job.n_past:]
            chunk = todo[:room]
            last = len(chunk) == len(todo)  # the last known token is in: its logits choose the next
            if last and outputs == 0:
                chunk, last = chunk[:-1], False  # no output left in this step: the rest goes next step
            if not chunk:
                continue
            chunks.append((job, chunk, last))
            room -= len(chunk)
            outputs -= last
            if room <= 0:
                break
        choosing = sum(last for _, _, last in chunks)
        for job, chunk, last in chunks:
            job.drafts = []
            if last and self.draft_max and choosing <= self.draft_rows and room > 0 and outputs > 0:
                job.drafts = draft(job.tokens, max_tokens=min(self.draft_max, room, outputs,
                                                              job.max_tokens - len(job.out) - 1))
                room -= len(job.drafts)
                outputs -= len(job.drafts)
            start = n
            for i, tok in enumerate([*chunk, *job.drafts]):
                pos = job.n_past + i
                b.token[n] = tok
                b.pos[n] = pos
                b.seq_id[n][0] = job.seq
                if job.extends and pos < len(job.prompt):
                    b.seq_id[n][1] = 0
                    b.n_seq_id[n] = 2
                else:
                    b.n_seq_id[n] = 1
                b.logits[n] = 1 if last and i >= len(chunk) - 1 else 0
                n += 1
            plan.append((job, start, len(chunk)))
        b.n_tokens = n
        t0 = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, b)
        self.timers["decode_s"] += time.perf_counter() - t0
        self.counters["steps"] += 1
        self.counters["step_tokens"] += n
        if rc != 0:  # (1: no room in the KV cache) the rows of this step fail; their cells go
            failed = [self._finish(job, "error", error=f"llama_decode returned {rc}") for job, _, _ in plan]
            llama_cpp.llama_memory_seq_rm(self.mem, 0, len(self.prefix), -1)  # a half-made extension too
            return failed
        done: list[Finished] = []
        t0 = time.perf_counter()
        for job, start, fed in plan:
            ended = self._advance(job, start, fed)
            if ended is not None:
                done.append(self._finish(job, ended))
        self.timers["choice_s"] += time.perf_counter() - t0
        return done

    def _advance(self, job: Job, start: int, fed: int) -> str | None:
        """Take the step's logits for ``job``; returns why it ended, or None while it goes on."""
        end = job.n_past + fed
        if job.extends:
            self.prefix = job.tokens[:min(end, len(job.prompt))]
            if end >= len(job.prompt):
                job.extends = False
                self.extender = None
        if end < len(job.tokens):  # a prompt chunk: no logits yet
            job.n_past = end
            return None
        job.n_past = end  # every known token is in the cache
        self.counters["drafted"] += len(job.drafts)
        why = self._choose(job, start + fed - 1)
        if why is None and job.n_past < end + len(job.drafts):  # the rejected drafts' cells go
            llama_cpp.llama_memory_seq_rm(self.mem, job.seq, job.n_past, -1)
        return why

    def _choose(self, job: Job, first: int) -> str | None:
        """Choose tokens from the logits at batch index ``first`` on (the last known token, then each
        draft) while the choice equals the draft, then write the text the grammar fixes after the
        last one; returns why the job ended, or None."""
        drafts = job.drafts
        for k in range(len(drafts) + 1):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, first + k), shape=(self.n_vocab,))
            self.counters["outputs"] += 1
            if job.stopping is not None and job.stopping(np.asarray(job.tokens, dtype=np.intc), logits):
                return "stop"
            tok = job.grammar.pick(logits)
            if tok is None or llama_cpp.llama_vocab_is_eog(self.vocab, tok):
                return "stop"
            why = self._accept(job, tok, job.grammar.logprob(logits, tok) if job.logprobs else None)
            if why is not None:
                return why
            if k < len(drafts) and tok == drafts[k]:
                job.n_past += 1  # the draft token's KV state is the right one: keep it
                self.counters["draft_kept"] += 1
                continue
            break
        return self._jump(job)

    def _accept(self, job: Job, tok: int, lp: float | None) -> str | None:
        """Append ``tok`` to the answer; returns why the job ended with it, or None."""
        job.grammar.accept(tok)
        job.tokens.append(tok)
        job.out.append(tok)
        if job.logprobs:
            job.lps.append(0.0 if lp is None else lp)
        if job.stop and self._cut_at_stop(job):
            return "stop"
        if job.json_end and job.scan.feed(self.llm.detokenize([tok])):
            return "stop"
        if len(job.out) >= job.max_tokens:
            return "length"
        return None

    def _jump(self, job: Job) -> str | None:
        """Append the tokens of the text the grammar now fixes (``{"kind": "``, ``", "confidence": ``);
        no logits are computed for them, and their log-probability is reported as 0. The last one is
        left to the model when it could merge with what the model writes next (see :meth:`_fixed`).
        Returns why the job ended, or None."""
        if not job.jump:
            return None
        for tok in self._fixed(job)[:max(0, job.max_tokens - len(job.out) - 1)]:
            self.counters["forced"] += 1
            why = self._accept(job, tok, None)
            if why is not None:
                return why
        return None

    def _fixed(self, job: Job) -> list[int]:
        """The tokens of the text the grammar fixes from here: the text's own tokenization, without its last
        token unless no character the grammar allows next would merge with it (``"kind": "`` then ``city``:
        no token starts with `` "c``, so `` "`` is fixed too; ``": `` then ``-``: `` -`` is one token, so the
        model writes the space, or the space and the sign together)."""
        text, after = job.grammar.forced()
        if not text:
            return []
        toks = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if self.llm.detokenize(toks).decode("utf-8", "replace") != text:
            return []
        if after is None or not all(self._apart(toks[-1], c) for c in after):
            toks = toks[:-1]
        return toks

    def _apart(self, tok: int, char: str) -> bool:
        """True when ``char`` written after ``tok`` is tokenized apart from it (``tok`` stays a token)."""
        known = self._apart_memo.get((tok, char))
        if known is None:
            piece = self.llm.detokenize([tok]) + char.encode("utf-8")
            known = self.llm.tokenize(piece, add_bos=False, special=False)[:1] == [tok]
            self._apart_memo[(tok, char)] = known
        return known

    def _cut_at_stop(self, job: Job) -> bool:
        text = self.llm.detokenize(job.out)
        return any(s in text for s in job.stop)

    # -- results --------------------------------------------------------------
    def _finish(self, job: Job, why: str, *, error: str | None = None) -> Finished:
        self.active.remove(job)
        if job is self.extender:
            self.extender = None
        llama_cpp.llama_memory_seq_rm(self.mem, job.seq, -1, -1)
        self.free_seqs.append(job.seq)
        job.grammar.close()
        self.counters["full_checks"] += job.grammar.full_checks
        return self._result(job, why, error=error)

    def _result(self, job: Job, why: str, *, error: str | None = None) -> Finished:
        pieces = [self.llm.detokenize([t]) for t in job.out]
        if job.stop:  # cut before the first stop string, as llama-cpp-python does
            whole = b"".join(pieces)
            cut = min((whole.index(s) for s in job.stop if s in whole), default=len(whole))
            kept, size = [], 0
            for p in pieces:
                if size >= cut:
                    break
                kept.append(p[:cut - size])
                size += len(p)
            pieces = kept
        dec = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        texts = [dec.decode(p) for p in pieces]
        if texts:
            texts[-1] += dec.decode(b"", final=True)
        lps: list[float | None] = list(job.lps[:len(texts)]) if job.logprobs else [None] * len(texts)
        return Finished(job.rid, "".join(texts), tuple(zip(texts, lps, strict=True)), len(job.prompt),
                        len(job.out), why, error)


class JsonEnd:
    """Finds where a JSON value that starts with ``{`` or ``[`` ends, fed its text a piece at a time."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def feed(self, piece: bytes) -> bool:
        """Scan ``piece``; True once the outermost bracket has closed."""
        for c in piece:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == 0x5C:  # backslash
                    self.escaped = True
                elif c == 0x22:  # quote
                    self.in_string = False
            elif c == 0x22:
                self.in_string = True
            elif c in (0x7B, 0x5B):  # { [
                self.depth += 1
            elif c in (0x7D, 0x5D):  # } ]
                self.depth -= 1
                if self.depth == 0:
                    return True
        return False


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x)
    return int(diff[0]) if len(diff) else n
