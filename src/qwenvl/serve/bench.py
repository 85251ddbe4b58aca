"""`qwenvl bench-serve`: N chat requests with a picture at concurrency C, against a batching server and a
one-at-a-time server (`--max-num-seqs 1`) on the same model in the same run, so the figure is a ratio.

Prints output tokens/s, requests/s, time to first token and inter-token latency (p50, p99) per server and
concurrency, then the turn-2 / turn-1 time to first token of a conversation about one picture (the
prefix cache's gain). Both servers run in this process on 127.0.0.1; the client, the openai SDK's wire
format over httpx, streaming, runs in a process of its own (as vLLM's benchmark_serving does), so parsing the
streams does not take the server's interpreter lock.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import multiprocessing
import socket
import statistics
import threading
import time

from ..errors import OptionsError


def _picture_uri(seed: int) -> str:
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (320, 240), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((20 + seed % 100, 30, 140 + seed % 100, 150), fill=(200, 30 + seed % 200, 40))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class LocalServer:
    """The app under uvicorn on a thread, on a free port of 127.0.0.1 (the benchmark's and the tests' server)."""

    def __init__(self, app, start_timeout: float = 60.0):
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on port {self.port}")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=60)


async def _one(client, url: str, body: dict) -> tuple[float, list[float], int]:
    """(time to first token, inter-token gaps, output tokens) of one streamed request."""
    start = time.perf_counter()
    stamps, usage = [], 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise OptionsError(f"the server answered {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    if not stamps:
        return time.perf_counter() - start, [], usage
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])], usage


async def _load(url: str, requests: int, concurrency: int, max_tokens: int, pictures: list[str]) -> dict:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def run(i):
            body = {"model": "bench", "stream": True, "stream_options": {"include_usage": True},
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,  # every answer max_tokens long
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": pictures[i % len(pictures)]}},
                        {"type": "text", "text": f"Describe picture {i} in detail."}]}]}
            async with gate:
                return await _one(client, url, body)

        start = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(requests)))
        wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    gaps = sorted(g for r in results for g in r[1]) or [0.0]
    tokens = sum(r[2] for r in results)
    pct = lambda xs, q: xs[min(int(q * len(xs)), len(xs) - 1)]
    return {"tokens_per_s": tokens / wall, "requests_per_s": requests / wall, "ttft_p50": statistics.median(ttft),
            "ttft_p99": pct(ttft, 0.99), "itl_p50": statistics.median(gaps), "itl_p99": pct(gaps, 0.99)}


async def _turns(url: str, max_tokens: int) -> tuple[float, float]:
    """Time to first token of turn 1 (new picture) and turn 2 of the same conversation."""
    import httpx

    picture = _picture_uri(12345)
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture}},
                                          {"type": "text", "text": "What is in the picture?"}]}]
    async with httpx.AsyncClient(timeout=None) as client:
        t1, _, _ = await _one(client, url, {"model": "bench", "messages": first, "stream": True,
                                            "max_tokens": 1, "temperature": 0})
        reply = (await client.post(url + "/v1/chat/completions", json={
            "model": "bench", "messages": first, "max_tokens": max_tokens, "temperature": 0})).json()
        second = first + [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                          {"role": "user", "content": "And what colour is it?"}]
        t2, _, _ = await _one(client, url, {"model": "bench", "messages": second, "stream": True,
                                            "max_tokens": 1, "temperature": 0})
    return t1, t2


def bench_serve(model, tokenizer, requests: int, concurrency: list[int], max_tokens: int, max_prefill_tokens: int,
                pictures: int | None = None) -> list[dict]:
    if requests < 1 or max_tokens < 1 or not concurrency or min(concurrency) < 1:
        raise OptionsError("--requests, --max-tokens and every --concurrency must be at least 1")
    uris = [_picture_uri(i) for i in range(pictures or requests)]  # distinct: no prefix shared across requests
    rows = []
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        client = lambda *args: pool.submit(_in_client, *args).result()
        for seqs in (max(concurrency), 1):
            rows += _measure(model, tokenizer, seqs, requests, concurrency, max_tokens, max_prefill_tokens, uris, client)
    return rows


def _in_client(load, *args):
    """One of the load coroutines (`_load`, `_turns`) run to its end, in the client process."""
    return asyncio.run(load(*args))


def _measure(model, tokenizer, seqs: int, requests: int, concurrency: list[int], max_tokens: int,
             max_prefill_tokens: int, uris: list[str], client) -> list[dict]:
    """The rows of one server (`--max-num-seqs seqs`); `client(load, *args)` runs a load in the client process."""
    from ..engine import LLMEngine
    from .openai_api import ServerSettings, build_app

    per_seq = 300 + max_tokens + 32  # picture span, question, answer
    engine = LLMEngine(model, max_num_seqs=seqs, kv_cache_tokens=seqs * per_seq,
                       max_prefill_tokens=max_prefill_tokens, max_queue=requests + 8)
    server = LocalServer(build_app(engine, tokenizer, ServerSettings(served_model_name="bench")))
    rows = []
    try:
        client(_load, server.url, min(4, requests), 1, 2, uris)  # warm-up
        for c in concurrency:
            if seqs == 1 and c != max(concurrency) and c != 1:
                continue  # one at a time: the queue decides, the figure does not depend on C
            rows.append({"max_num_seqs": seqs, "concurrency": c,
                         **client(_load, server.url, requests, c, max_tokens, uris)})
            print(_row(rows[-1]), flush=True)
        if seqs == max(concurrency):
            t1, t2 = client(_turns, server.url, max_tokens)
            print(f"conversation: turn 1 first token {t1 * 1000:.0f} ms, turn 2 {t2 * 1000:.0f} ms "
                  f"({t2 / t1:.2f}x)", flush=True)
    finally:
        server.stop()
    return rows


HEADER = "max-num-seqs  concurrency  out tok/s   req/s  TTFT p50  TTFT p99  ITL p50  ITL p99"


def _row(r: dict) -> str:
    if not hasattr(_row, "printed"):
        _row.printed = True
        print(HEADER)
    return (f"{r['max_num_seqs']:>12}  {r['concurrency']:>11}  {r['tokens_per_s']:>9.1f}  {r['requests_per_s']:>6.2f}"
            f"  {r['ttft_p50']:>7.2f}s  {r['ttft_p99']:>7.2f}s  {r['itl_p50'] * 1000:>5.0f}ms  {r['itl_p99'] * 1000:>5.0f}ms")


def summary(rows: list[dict]) -> str:
    solo = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["max_num_seqs"] == 1}
    base = solo.get(max(solo)) if solo else None
    lines = []
    for r in rows:
        if r["max_num_seqs"] != 1 and base:
            lines.append(f"concurrency {r['concurrency']}: {r['tokens_per_s'] / base:.1f}x the one-at-a-time server's "
                         f"output tokens/s")
    return "\n".join(lines)
