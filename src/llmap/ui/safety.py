"""The page's safety: a token in every URL, an anti-CSRF token on every action, the Host check, strict headers,
and no secret in anything the page receives.

- Every route lives under ``/<token>/``, a random 32-byte token made at start (:func:`new_token`); anything else
  answers 403. The token is the only way in: ``llmap ui`` prints the URL that carries it.
- Actions (label, stop, re-queue, roll back) are POSTs that carry the page's anti-CSRF token in the
  ``X-CSRF-Token`` header, from the page's own origin (``Origin``/``Sec-Fetch-Site`` are checked when sent).
- Unless the page was opened to the network (``--allow-remote``), the ``Host`` header must name the loopback
  address or ``localhost`` with the server's port: a DNS-rebinding page cannot reach it.
- Responses forbid framing, sniffing, referrers and caching, and the Content-Security-Policy lets the page load
  only its own script and style: no inline script runs, whatever a row holds.
- :class:`Redactor` replaces the job's API keys and secret header values (and anything shaped like
  ``Bearer <token>``) by ``***`` in every JSON answer, as llmap's logs do.
"""

from __future__ import annotations

import hmac
import math
import os
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

__all__ = ["SECURITY_HEADERS", "Redactor", "guard_middleware", "new_token", "secrets_of"]

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; base-uri 'self'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def new_token() -> str:
    """A random URL-safe token (32 bytes of ``secrets``)."""
    return secrets.token_urlsafe(32)


def _forbidden(text: str) -> web.Response:
    return web.Response(status=403, text=f"403 Forbidden: {text}\n", headers=SECURITY_HEADERS)


def guard_middleware(token: str, csrf: str, *, port: Callable[[], int], allow_remote: bool) -> Callable:
    """The aiohttp middleware that enforces the module docstring's rules on every request.

    Args:
        token: the URL token (every path starts with ``/<token>/``).
        csrf: the anti-CSRF token POSTs must carry in ``X-CSRF-Token``.
        port: returns the port the server listens on (known once bound).
        allow_remote: skip the Host check (``--host 0.0.0.0 --allow-remote``).
    """
    prefix = f"/{token}"

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        path = request.rel_url.raw_path
        head, _, _rest = path[1:].partition("/")
        if not hmac.compare_digest(f"/{head}".encode(), prefix.encode()):
            return _forbidden("this page needs its URL with the token, as `llmap ui` printed it")
        if not allow_remote:
            host = request.headers.get("Host", "")
            if host not in {f"{h}:{port()}" for h in _LOOPBACK}:
                return _forbidden(f"Host {host!r} is not this computer's loopback address")
        if request.method not in ("GET", "HEAD"):
            sent = request.headers.get("X-CSRF-Token", "")
            if not hmac.compare_digest(sent.encode(), csrf.encode()):
                return _forbidden("an action needs the page's anti-CSRF token (reload the page)")
            origin = request.headers.get("Origin")
            if origin is not None and origin != f"{request.scheme}://{request.host}":
                return _forbidden(f"an action from another origin ({origin!r})")
            if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
                return _forbidden("an action from another site")
        response = await handler(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    return guard


def secrets_of(models: Iterable[Any], environ: dict[str, str] | None = None) -> list[str]:
    """The secrets a job's models send: each model's API key (its ``key_env``, and the usual
    ``OPENAI_API_KEY``/``ANTHROPIC_API_KEY``) and the values of ``${VAR}`` headers, as the environment holds them."""
    env = os.environ if environ is None else environ
    names = {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"}
    for m in models:
        if getattr(m, "key_env", None):
            names.add(m.key_env)
        for value in (getattr(m, "headers", None) or {}).values():
            names.update(re.findall(r"\$\{(\w+)\}", str(value)))
    return sorted({env[n] for n in names if len(env.get(n) or "") >= 4}, key=len, reverse=True)


class Redactor:
    """Replaces secrets by ``***`` in text and in JSON-ready data.

    Args:
        secret_values: exact values to hide (API keys, secret header values).
    """

    _SHAPES = (
        (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}"), r"\1 ***"),
        (re.compile(r"(?i)\b(x-api-key|api[-_]?key|authorization)(\"?\s*[:=]\s*\"?)"
                    r"(?!\*\*\*|bearer\b|basic\b)[^\s\",;]{6,}"), r"\1\2***"),
    )

    def __init__(self, secret_values: Iterable[str] = ()) -> None:
        self.values = [v for v in secret_values if v]

    def text(self, s: str) -> str:
        for v in self.values:
            if v in s:
                s = s.replace(v, "***")
        for pattern, repl in self._SHAPES:
            s = pattern.sub(repl, s)
        return s

    def data(self, obj: Any) -> Any:
        """``obj`` (dicts, lists, strings, numbers) with every string redacted (and NaN or infinity, which JSON
        cannot carry, as text)."""
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, float) and not math.isfinite(obj):
            return str(obj)
        if isinstance(obj, dict):
            return {k: self.data(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self.data(v) for v in obj]
        return obj
