"""A fast fake SGLang worker for the gateway overhead benchmark (aiohttp, one process).

Speaks SGLang's /generate (streaming: cumulative `data:` events, then `data: [DONE]`; or one JSON),
/health and /abort_request. It generates `--tokens` fixed pieces with `--token-interval` seconds
between them, so the gateway and the direct path see identical upstream timing.

Run: python fast_fake_worker.py --port 31000 [--tokens 16] [--token-interval 0.0]
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web


def make_app(tokens: int, interval: float) -> web.Application:
    pieces = [f"tok{i} " for i in range(tokens)]

    def meta(ids_len: int, n: int, done: bool) -> dict:
        return {
            "prompt_tokens": ids_len,
            "completion_tokens": n,
            "cached_tokens": 0,
            "finish_reason": {"type": "stop", "matched": 1} if done else None,
        }

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        ids_len = len(body.get("input_ids") or [])
        n_max = min(tokens, int((body.get("sampling_params") or {}).get("max_new_tokens", tokens)))
        if not body.get("stream"):
            if interval:
                await asyncio.sleep(interval * n_max)
            return web.json_response(
                {
                    "text": "".join(pieces[:n_max]),
                    "output_ids": list(range(n_max)),
                    "meta_info": meta(ids_len, n_max, True),
                }
            )
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for n in range(1, n_max + 1):
            if interval and n > 1:
                await asyncio.sleep(interval)
            ev = {
                "text": "".join(pieces[:n]),
                "output_ids": list(range(n)),
                "meta_info": meta(ids_len, n, n == n_max),
            }
            await resp.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def ok(_: web.Request) -> web.Response:
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_get("/health", ok)
    app.router.add_post("/abort_request", ok)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--token-interval", type=float, default=0.0)
    a = p.parse_args()
    web.run_app(
        make_app(a.tokens, a.token_interval),
        host="127.0.0.1",
        port=a.port,
        print=None,
        access_log=None,
        backlog=1024,
    )


if __name__ == "__main__":
    main()
