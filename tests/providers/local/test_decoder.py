"""Pieces of the batched decoder that need no model: where a JSON answer ends, which fixed tokens go in
without asking the model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("llama_cpp", reason="needs llmap[local]")

from llmap.providers.local.decoder import BatchDecoder, JsonEnd  # noqa: E402


def _ends_at(pieces: list[str]) -> int | None:
    scan = JsonEnd()
    for i, p in enumerate(pieces):
        if scan.feed(p.encode()):
            return i
    return None


def test_the_answer_ends_where_its_outermost_bracket_closes():
    assert _ends_at(['{"', 'kind', '": "', 'county', '", "n": ', '3', '}']) == 6
    assert _ends_at(["[", "1, ", "[2]", "]"]) == 3
    assert _ends_at(['{"a": {"b": 1}', ', "c": [1, {"d": 2}]', "}"]) == 2


def test_brackets_inside_strings_and_escaped_quotes_do_not_count():
    assert _ends_at(['{"t": "a } b ] {', '"', "}"]) == 2
    assert _ends_at(['{"t": "say \\"}\\" now"', "}"]) == 1
    assert _ends_at(['{"t": "back\\\\"', "}"]) == 1  # an escaped backslash ends the escape
    assert _ends_at(['{"t": "open']) is None


class _Vocab:
    """A tokenizer over a few pieces, longest match first (as a BPE/SPM vocabulary behaves on these texts)."""

    PIECES = ['"', "kind", '":', ' "', " ", " -", "-", "0", "c", "o", ",", '",']

    def tokenize(self, text: bytes, add_bos: bool = False, special: bool = False) -> list[int]:
        out, s = [], text.decode()
        while s:
            piece = max((p for p in self.PIECES if s.startswith(p)), key=len)
            out.append(self.PIECES.index(piece))
            s = s[len(piece):]
        return out

    def detokenize(self, toks: list[int]) -> bytes:
        return "".join(self.PIECES[t] for t in toks).encode()


def _fixed(text: str, after: str | None) -> list[str]:
    vocab = _Vocab()
    dec = SimpleNamespace(llm=vocab, _apart_memo={})
    dec._apart = lambda tok, c: BatchDecoder._apart(dec, tok, c)
    job = SimpleNamespace(grammar=SimpleNamespace(forced=lambda: (text, after)))
    return [vocab.PIECES[t] for t in BatchDecoder._fixed(dec, job)]


def test_the_last_fixed_token_goes_in_when_nothing_allowed_next_would_merge_with_it():
    # '"kind": "' then an enum value starting with c or o: no token ' "c' or ' "o', so ' "' is fixed too
    assert _fixed('"kind": "', "co") == ['"', "kind", '":', ' "']
    # ': ' then a number that may start with '-': ' -' is one token, so the model writes the space (or ' -')
    assert _fixed('": ', "-0") == ['":']
    assert _fixed('": ', "0") == ['":', " "]
    # only the end of the answer may follow: nothing to merge with
    assert _fixed('",', "") == ['",']
    # a character outside ASCII may follow (a free string): the model writes the last token
    assert _fixed('"kind": "', None) == ['"', "kind", '":']
