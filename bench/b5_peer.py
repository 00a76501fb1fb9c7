"""B5 peer client: the same job as llmap's, written the usual way with a peer library.

Run by ``bench/b5_overhead.py`` in the peers' own venv (``bench/.venv-peers``),
never in llmap's: it imports ``openai`` or ``litellm``, not llmap.

    python bench/b5_peer.py openai  --base-url URL --csv rows.csv --out out.jsonl
    python bench/b5_peer.py litellm --base-url URL --csv rows.csv --out out.jsonl

Reads the CSV (columns id, text), sends one chat completion per row with the
same system/user messages and ``response_format`` json_schema as llmap's job,
``asyncio.Semaphore(concurrency)`` around each request, parses each answer with
``json.loads``, writes one JSON line per row to ``--out`` and prints one JSON
summary line. Connections to anything but loopback are refused and counted.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import ipaddress
import json
import os
import socket
import sys
import time

# Before importing litellm: no logging, no telemetry, no remote model cost map.
os.environ.setdefault("LITELLM_LOG", "ERROR")
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("LITELLM_TELEMETRY", "False")

SYSTEM = "You label short customer comments."
SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "score": {"type": "number", "description": "0 to 1"},
    },
    "required": ["label", "score"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}

BLOCKED: list[str] = []
_connect = socket.socket.connect


def _loopback_only(self: socket.socket, address) -> None:  # type: ignore[no-untyped-def]
    """Refuse (and count) any connection that is not to loopback or a Unix socket."""
    if self.family in (socket.AF_INET, socket.AF_INET6):
        try:
            ok = ipaddress.ip_address(address[0]).is_loopback
        except ValueError:
            ok = address[0] == "localhost"
        if not ok:
            BLOCKED.append(str(address[0]))
            raise OSError(f"b5: connection to {address[0]} refused (benchmark is loopback only)")
    return _connect(self, address)


_getaddrinfo = socket.getaddrinfo


def _resolve_local_only(host, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Refuse (and count) name lookups other than loopback, so nothing asks DNS."""
    name = host.decode() if isinstance(host, bytes) else host
    if name not in (None, "localhost", "127.0.0.1", "::1"):
        try:
            local = ipaddress.ip_address(name).is_loopback
        except ValueError:
            local = False
        if not local:
            BLOCKED.append(str(name))
            raise socket.gaierror(socket.EAI_NONAME, f"b5: lookup of {name} refused (benchmark is loopback only)")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _loopback_only  # type: ignore[method-assign]
socket.getaddrinfo = _resolve_local_only


def messages(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Comment: {text}"}]


async def run(client_name: str, base_url: str, rows: list[dict[str, str]], concurrency: int):
    sem = asyncio.Semaphore(concurrency)
    if client_name == "openai":
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)

        async def ask(row: dict[str, str]) -> dict:
            async with sem:
                resp = await client.chat.completions.create(
                    model="sim", messages=messages(row["text"]), response_format=RESPONSE_FORMAT,
                    temperature=0, max_tokens=256,
                )
            return json.loads(resp.choices[0].message.content)

        close = client.close
    else:
        import litellm
        from litellm import Router

        litellm.telemetry = False
        litellm.suppress_debug_info = True
        router = Router(
            model_list=[{
                "model_name": "sim",
                "litellm_params": {"model": "openai/sim", "api_base": base_url, "api_key": "x"},
            }],
            num_retries=0,
        )

        async def ask(row: dict[str, str]) -> dict:
            async with sem:
                resp = await router.acompletion(
                    model="sim", messages=messages(row["text"]), response_format=RESPONSE_FORMAT,
                    temperature=0, max_tokens=256,
                )
            return json.loads(resp.choices[0].message.content)

        async def close() -> None:
            return None

    results = await asyncio.gather(*(ask(r) for r in rows), return_exceptions=True)
    await close()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("client", choices=["openai", "litellm"])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    t0 = time.perf_counter()
    results = asyncio.run(run(args.client, args.base_url, rows, args.concurrency))
    ok = failed = 0
    first_error = None
    with open(args.out, "w") as out:
        for row, res in zip(rows, results, strict=True):
            if isinstance(res, BaseException):
                failed += 1
                first_error = first_error or f"{type(res).__name__}: {res}"[:300]
                out.write(json.dumps({"id": row["id"], "_status": "failed", "_error": str(res)[:300]}) + "\n")
            else:
                ok += 1
                out.write(json.dumps({"id": row["id"], **res, "_status": "done"}) + "\n")
    if args.client == "openai":
        import openai as lib
    else:
        import litellm as lib
    print(json.dumps({
        "client": args.client, "version": getattr(lib, "__version__", None) or _dist_version(args.client),
        "rows": len(rows), "done": ok, "failed": failed, "first_error": first_error,
        "request_phase_s": round(time.perf_counter() - t0, 3), "blocked_connections": BLOCKED,
    }))
    return 0 if failed == 0 and not BLOCKED else 1


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
