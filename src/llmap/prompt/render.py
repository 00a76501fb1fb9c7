"""Prompt templates: Jinja2 with StrictUndefined, rendered into chat messages.

A row's columns are the template variables. Few-shot examples become prior
chat turns: the example's input rendered through the user template, then the
example's output as the assistant's JSON answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jinja2
from jinja2 import meta

from llmap.errors import RenderError, SpecError
from llmap.prompt.parts import IMAGES_KEY, with_images

__all__ = ["Renderer"]

_ENV = jinja2.Environment(
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=False,
    # A missing value (SQL NULL) renders as an empty string, not "None".
    finalize=lambda v: "" if v is None else v,
)


def _compile(src: str, what: str, source: str) -> tuple[jinja2.Template, frozenset[str]]:
    try:
        ast = _ENV.parse(src)
        template = _ENV.from_string(src)
    except jinja2.TemplateSyntaxError as exc:
        raise SpecError(
            f"{source}: [prompt] {what}: template syntax error on line {exc.lineno}: {exc.message}; "
            "fix the template (Jinja2 syntax: {{ column }})"
        ) from None
    return template, frozenset(meta.find_undeclared_variables(ast))


@dataclass(frozen=True)
class Renderer:
    """Compiled ``system`` and ``user`` templates plus few-shot examples.

    Attributes:
        variables: every name the templates read; these are the input columns
            the job needs (sorted).
    """

    system: jinja2.Template | None
    user: jinja2.Template
    examples: tuple[tuple[Mapping[str, Any], Mapping[str, Any]], ...]
    variables: tuple[str, ...]
    user_source: str = ""
    max_chars: Mapping[str, int] = field(default_factory=dict)
    system_variables: frozenset[str] = frozenset()

    def shared_prefix(self, messages: list[dict[str, str]]) -> int:
        """How many leading messages of a row's (or a pack's) rendered ``messages`` every request shares.

        The system prompt and the few-shot turns are the same for every row
        when the system template reads no column; the last message is the
        row's own. A system prompt that reads a column makes every request
        different from its first message on: 0.
        """
        if self.system_variables:
            return 0
        return max(0, len(messages) - 1)

    @classmethod
    def from_spec(cls, prompt: Any, *, source: str = "job", max_chars: Mapping[str, int] | None = None) -> Renderer:
        """Compile a :class:`~llmap.spec.PromptSpec`.

        An example whose input lacks a variable the user template reads is
        found by :meth:`check_examples`, called once the input's columns are
        known: a misspelt variable is the template's fault, not the examples'.

        Raises:
            SpecError: a template has a syntax error.
        """
        user, user_vars = _compile(prompt.user, "user", source)
        system, system_vars = (None, frozenset())
        if prompt.system:
            system, system_vars = _compile(prompt.system, "system", source)
        examples = tuple((ex.input, ex.output) for ex in prompt.examples)
        return cls(system, user, examples, tuple(sorted(user_vars | system_vars)), prompt.user, dict(max_chars or {}),
                   frozenset(system_vars))

    @property
    def user_variables(self) -> frozenset[str]:
        """The names the user template reads (each few-shot example's input must hold them)."""
        return frozenset(meta.find_undeclared_variables(_ENV.parse(self.user_source)))

    def check_examples(self, *, source: str = "job") -> None:
        """Check that every few-shot example's input holds the variables the user template reads.

        Call it after checking the template's variables against the input's
        columns, so that a misspelt variable is reported at the template.

        Raises:
            SpecError: naming the first example and the variable it lacks.
        """
        needed = self.user_variables
        for i, (ex_in, _out) in enumerate(self.examples, 1):
            missing = sorted(needed - set(ex_in))
            if missing:
                raise SpecError(
                    f"{source}: [prompt] examples #{i}: input lacks {missing[0]!r}, which the user template reads; "
                    "add it to the example's input"
                )

    def truncated_columns(self, row: Mapping[str, Any]) -> list[str]:
        """The columns of ``row`` longer than their ``max_chars`` (they will be cut when rendered)."""
        return [c for c, n in self.max_chars.items() if isinstance(row.get(c), str) and len(row[c]) > n]

    def cut(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        """``row`` with string columns over ``max_chars`` cut, ending with a visible marker."""
        cut = self.truncated_columns(row) if self.max_chars else ()
        if not cut:
            return row
        out = dict(row)
        for c in cut:
            n = self.max_chars[c]
            out[c] = f"{row[c][:n]}… [truncated {len(row[c]) - n} chars]"
        return out

    def messages(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        """Render one row into OpenAI-style chat messages.

        Args:
            row: column name -> value; must hold every name in ``variables``.

        Returns:
            ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``:
            the system prompt, one user/assistant pair per example, then the
            row's user prompt. String columns longer than ``max_chars`` are
            cut, ending with a visible ``… [truncated N chars]`` marker. A row
            carrying images (``[input.documents]`` sent as images, see
            :mod:`llmap.prompt.parts`) gets a user message whose content is a
            list of text and ``image_url`` parts.

        Raises:
            RenderError: a template failed on this row's values, e.g.
                ``{{ name.upper() }}`` where ``name`` is NULL; the message names
                the template, the error and the row's NULL columns.
        """
        row = self.cut(row)
        out: list[dict[str, str]] = []
        if self.system is not None:
            out.append({"role": "system", "content": self._render(self.system, "system", row)})
        for ex_in, ex_out in self.examples:
            out.append({"role": "user", "content": self.user.render(ex_in)})
            out.append({"role": "assistant", "content": json.dumps(ex_out, ensure_ascii=False)})
        content = self._render(self.user, "user", row)
        images = row.get(IMAGES_KEY)
        out.append({"role": "user", "content": with_images(content, images) if images else content})
        return out

    def _render(self, template: jinja2.Template, which: str, row: Mapping[str, Any]) -> str:
        try:
            return template.render(row)
        except Exception as exc:  # Jinja2 raises whatever the template's expressions raise
            nulls = tuple(v for v in self.variables if row.get(v) is None)
            why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, jinja2.TemplateError) else str(exc)
            hint = (f" (NULL in this row: {', '.join(nulls)}; guard it, e.g. {{{{ {nulls[0]} or '' }}}})"
                    if nulls else "")
            raise RenderError(f"[prompt] {which} template failed on this row: {why}{hint}", template=which,
                              null_columns=nulls) from exc
