"""`qwenvl serve` options, and starting the server."""
from __future__ import annotations

import argparse
import threading

from ..errors import OptionsError


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and /tokenize")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder name)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="sequences decoded together (cache slots)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 Too Many Requests")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV cache pool size in tokens, shared by the slots (default max-num-seqs x 2048)")
    p.add_argument("--max-prefill-tokens", type=int, default=512, help="prompt tokens computed per step")
    p.add_argument("--image-cache-size", type=int, default=64, help="pictures whose features are kept")
    p.add_argument("--allowed-local-media-path", default=None,
                   help="folder whose files may be named as images (file:// or path); none by default")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="allow image URLs on loopback, private and link-local addresses")
    p.add_argument("--max-image-bytes", type=int, default=32 << 20)
    p.add_argument("--max-image-pixels", type=int, default=25_000_000)
    p.add_argument("--max-images-per-request", type=int, default=8)
    p.add_argument("--image-fetch-timeout", type=float, default=10.0, help="seconds for one image download")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to finish running requests; then they end with an error (a stream: an "
                        "error event and [DONE]) and the server exits")
    p.add_argument("--ui", action="store_true", help="also serve the chat page at /ui, on the same engine "
                   "(needs the web extra); with --api-key the page asks for the key as its password")


def add_web_options(p: argparse.ArgumentParser) -> None:
    """`qwenvl web`: the page alone; the engine and picture limits as `qwenvl serve` has them."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-num-seqs", type=int, default=8, help="answers decoded together (cache slots)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV cache pool size in tokens, shared by the slots (default max-num-seqs x 2048)")
    p.add_argument("--max-image-bytes", type=int, default=32 << 20)
    p.add_argument("--max-image-pixels", type=int, default=25_000_000)
    p.add_argument("--max-images-per-request", type=int, default=8, help="pictures in one conversation")


def _engine(model, args):
    """The engine of `serve` / `web`; under tensor parallel, rank 0's sends its requests to the other ranks'."""
    from ..engine import LLMEngine

    return LLMEngine(model, max_num_seqs=args.max_num_seqs, kv_cache_tokens=args.kv_cache_tokens,
                     max_prefill_tokens=getattr(args, "max_prefill_tokens", 512),
                     image_cache_size=getattr(args, "image_cache_size", 64), max_queue=getattr(args, "max_queue", 256),
                     replicate=model.tp is not None and model.tp.world > 1)


def follow(model, args) -> int:
    """A tensor-parallel rank other than 0 of `serve` / `web`: run rank 0's engine steps until it stops.
    Ctrl-C reaches every rank of the terminal's process group; only rank 0 acts on it (it shuts down, then
    releases this rank)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _engine(model, args).follow()
    return 0


def _engine_and_media(model, args):
    from .. import images as image_io
    from .media import MediaPolicy

    if not 0 < args.port < 65536:
        raise OptionsError(f"--port must be in 1..65535, got {args.port}")
    engine = _engine(model, args)
    limits = image_io.ImageLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels,
                                  timeout_s=getattr(args, "image_fetch_timeout", 10.0))
    media = MediaPolicy(limits, getattr(args, "allowed_local_media_path", None),
                        getattr(args, "allow_private_urls", False))
    return engine, media


def _model_name(args) -> str:
    return getattr(args, "served_model_name", None) or \
        (args.model.rstrip("/").split("/")[-1] if args.model else "qwen-vl")


def _webui():
    try:
        from . import webui
    except ImportError as e:
        raise OptionsError(f"the web page needs gradio 6 ({e}): pip install 'qwenvl[web]'") from None
    return webui


def build(model, tokenizer, args):
    from .openai_api import ServerSettings, build_app

    webui = _webui() if args.ui else None
    engine, media = _engine_and_media(model, args)
    settings = ServerSettings(served_model_name=_model_name(args), api_key=args.api_key, media=media,
                              max_images_per_request=args.max_images_per_request)
    app = build_app(engine, tokenizer, settings)
    if webui is not None:
        page = webui.WebPage(engine, tokenizer, settings.served_model_name, media, args.max_images_per_request)
        webui.mount(app, page, "/ui", args.api_key)
    return app


def build_web(model, tokenizer, args):
    webui = _webui()
    engine, media = _engine_and_media(model, args)
    return webui.web_app(engine, tokenizer, _model_name(args), media, args.max_images_per_request)


# After --shutdown-timeout the requests still running are ended; these seconds more let their last event out.
END_GRACE_S = 5.0


def serve(model, tokenizer, args, web: bool = False) -> int:
    import uvicorn

    app = build_web(model, tokenizer, args) if web else build(model, tokenizer, args)
    engine, timeout = app.state.engine, getattr(args, "shutdown_timeout", 30.0)
    if not timeout >= 0:
        raise OptionsError(f"--shutdown-timeout must be 0 or more seconds, got {timeout}")
    cutoff = threading.Timer(timeout, engine.abort_all)
    cutoff.daemon = True

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / Ctrl-C: admit nothing more, let running requests finish
            engine.accepting = False
            if not self.should_exit:
                cutoff.start()
            super().handle_exit(sig, frame)
            # uvicorn raises a captured signal again once it has shut down, which kills the process with it:
            # a shutdown that went as asked ends with status 0
            self._captured_signals.clear()

    url = f"http://{args.host}:{args.port}"
    print(f"qwenvl: the chat page on {url}/" if web else f"qwenvl: serving on {url}/v1" +
          (f", the chat page on {url}/ui" if args.ui else ""), flush=True)
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                   timeout_graceful_shutdown=timeout + END_GRACE_S))
    try:
        server.run()
    finally:
        cutoff.cancel()
    return 0


def add_bench_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--random-config", choices=["tiny", "0.5b", "9.6b"], help="random weights of this shape "
                   "(tokenizer: the bundled demo model's) instead of -m")
    p.add_argument("--requests", type=int, default=64, help="requests per run (default 64)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies (default 1,8,32)")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default 32)")
    p.add_argument("--max-prefill-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")


def bench(args) -> int:
    import torch

    from .bench import bench_serve, summary

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        concurrency = [int(c) for c in args.concurrency.split(",") if c]
    except ValueError:
        raise OptionsError(f"--concurrency must be comma-separated integers, got {args.concurrency!r}") from None
    if args.random_config:
        from .. import AutoTokenizer
        from ..bench import random_config, random_model
        from ..demo import DEMO_MODEL
        from ..loading import resolve_device

        if args.model:
            raise OptionsError("give either -m/--model or --random-config, not both")
        dtype = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        model = random_model(random_config(args.random_config), dtype, resolve_device(args.device))
        tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    else:
        model, tokenizer = args.load(args)
    rows = bench_serve(model, tokenizer, args.requests, concurrency, args.max_tokens, args.max_prefill_tokens)
    print(summary(rows))
    return 0
