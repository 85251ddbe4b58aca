"""A bounded soak of the server: many requests with distinct pictures, some dropped mid-stream; memory stays flat."""
import base64
import concurrent.futures
import gc
import io
import os
import time

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from qwenvl.engine import LLMEngine  # noqa: E402
from qwenvl.engine.sequence import Sequence  # noqa: E402
from qwenvl.serve.bench import LocalServer  # noqa: E402
from qwenvl.serve.openai_api import ServerSettings, build_app  # noqa: E402

WARMUP, REQUESTS = 40, 200
MAX_GROWTH = 48 << 20  # one leaked picture is 2.4 MB of pixels (+ its 256 x 128 features): 160 leaks = 390 MB


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def picture(i: int) -> str:
    """A distinct 64x48 PNG per request, as a data URI: every request misses the feature cache."""
    pixels = np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory is read from /proc")
def test_memory_stays_flat_over_many_requests(model, tokenizer):
    engine = LLMEngine(model, max_num_seqs=8, kv_cache_tokens=8 * 400, image_cache_size=4, max_queue=64)
    server = LocalServer(build_app(engine, tokenizer, ServerSettings(served_model_name="golden")))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def one(i: int) -> None:
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture(i)}},
                                                  {"type": "text", "text": f"Question {i}: what is it?"}]}]
        if i % 5 == 0:  # a client that goes away after the first chunk: its request is cancelled
            with client.chat.completions.create(model="golden", messages=messages, stream=True, max_tokens=16,
                                                temperature=0) as stream:
                next(iter(stream))
        else:
            reply = client.chat.completions.create(model="golden", messages=messages, max_tokens=3, temperature=0)
            assert reply.usage.completion_tokens == 3

    def run(numbers) -> None:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for future in [pool.submit(one, i) for i in numbers]:
                future.result(timeout=300)

    def settled() -> int:
        deadline = time.monotonic() + 30  # cancelled sequences leave at the engine's next step
        while (engine.num_running or engine.num_waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        gc.collect()
        return resident_bytes()

    try:
        run(range(WARMUP))
        before = settled()
        run(range(WARMUP, REQUESTS))
        after = settled()
        assert engine.num_running == engine.num_waiting == 0
        answered = sum(1 for i in range(REQUESTS) if i % 5)  # a dropped stream may go before its picture is encoded
        assert len(engine.runner.features) <= 4 and engine.runner.image_misses >= answered
        alive = [o for o in gc.get_objects() if type(o) is Sequence]
        assert not alive, f"{len(alive)} finished sequences are still referenced"
        assert after - before < MAX_GROWTH, f"resident memory grew by {(after - before) / 2**20:.1f} MiB over " \
                                            f"{REQUESTS - WARMUP} requests"
    finally:
        server.stop()
