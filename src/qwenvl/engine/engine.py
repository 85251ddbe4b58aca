"""The serving engine: continuous batching over one model.

Requests come in at any time (`add_request`, thread-safe); each `step` admits waiting sequences into the
cache pool, runs one decode token for every running sequence plus prefill chunks within a token budget,
samples each sequence with its own rule and generator, and lets finished or aborted sequences leave at once.
`start()` runs the steps on a background thread; without it, `generate` and `chat` drive them.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import torch

from .. import processor
from ..chat import DEFAULT_SYSTEM, _prepare, check_history, reply_ids
from ..errors import OptionsError, QwenVLError, RequestError
from ..generation import SamplingParams, _ends_with_stop, check_positions, greedy, next_tokens
from ..model.language import ntk_alpha
from .cache_pool import CachePool
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Picture, Sequence, Status


MAX_HEARTBEAT_S = 5.0  # an idle tensor-parallel rank 0 tells its followers it is alive this often, at most


class QueueFull(QwenVLError):
    """The engine's waiting queue is at --max-queue: try again later."""


class EngineStopped(QwenVLError):
    """The engine no longer admits requests (it is shutting down)."""


class LLMEngine:
    def __init__(self, model, max_num_seqs: int = 8, kv_cache_tokens: int | None = None,
                 max_prefill_tokens: int = 512, image_cache_size: int = 64, max_queue: int | None = None,
                 replicate: bool = False):
        """`replicate` (tensor parallel, as `qwenvl serve --tensor-parallel-size` runs it): requests come to
        rank 0 only; rank 0 sends each step's new requests and cancellations to the other ranks, whose engines
        (built with the same options) run `follow()`. Without it every rank makes the same calls itself."""
        config = model.config
        if max_num_seqs < 1 or max_prefill_tokens < 1 or image_cache_size < 0:
            raise OptionsError("max_num_seqs and max_prefill_tokens must be >= 1, image_cache_size >= 0")
        if kv_cache_tokens is None:
            kv_cache_tokens = max_num_seqs * min(config.max_position_embeddings, 2048)
        slot_len = min(kv_cache_tokens // max_num_seqs, config.max_position_embeddings)
        if slot_len < 2:
            raise OptionsError(f"kv_cache_tokens={kv_cache_tokens} leaves {slot_len} tokens for each of the "
                               f"{max_num_seqs} sequences: raise it or lower max_num_seqs")
        if len(set(model.transformer.layer_devices or [])) > 1:
            raise OptionsError("the engine runs a model on one device; this one is spread by a device_map "
                               f"({model.hf_device_map}): load it on one device, or use tensor parallel")
        self.model = model
        self.span = config.visual.n_queries
        self.pool = CachePool(config, max_num_seqs, slot_len, model.dtype, model.device, heads=model.local_heads)
        self.scheduler = Scheduler(self.pool, max_num_seqs, max_prefill_tokens, self.span)
        self.runner = ModelRunner(model, self.pool, image_cache_size)
        self.max_queue = max_queue
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "prefix_cache_tokens": 0, "steps": 0}
        self._inbox: list[Sequence] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.accepting = True
        tp = model.tp if model.tp is not None and model.tp.world > 1 else None
        if replicate and tp is None:
            raise OptionsError("replicate=True is for a tensor-parallel model (from_pretrained(tensor_parallel=True))")
        self.tp = tp if replicate else None
        # well inside the collective timeout, so waiting followers never time out
        self._heartbeat_s = min(MAX_HEARTBEAT_S, tp.timeout / 4) if self.tp is not None else None
        self._followers_released = False
        self._copies: dict[int, Sequence] = {}  # on a follower: rank 0's sequence id -> this rank's copy

    @property
    def max_model_len(self) -> int:
        return self.pool.slot_len

    # ---- requests ----------------------------------------------------------------------------------

    def add_request(self, prompt: list[int], params: SamplingParams | None = None, images: list | None = None,
                    listener: Callable[[Sequence, list[int]], None] | None = None, logprobs: int | None = None,
                    **options) -> Sequence:
        """Queue one prompt (token ids; image spans as the tokenizer writes them). `images`: one per span,
        Pictures, pixel tensors [3, S, S] or anything `images.load_image` takes; None loads the references
        written in the spans (the processor step, `processor.prompt_pictures`).
        Options as `generate` takes them (`max_new_tokens`, `do_sample`, `seed`, ...) when `params` is None."""
        if not self.accepting:
            raise EngineStopped("the engine is shutting down and takes no new requests")
        if self.tp is not None and self.tp.rank != 0:
            raise OptionsError("requests go to tensor-parallel rank 0; this rank follows it (follow())")
        seq = self._sequence(prompt, params or SamplingParams.build(self.model.generation_config, **options),
                             images, listener, logprobs)
        with self._lock:
            if self.max_queue is not None and len(self._inbox) + len(self.scheduler.waiting) >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} waiting requests (--max-queue): retry later")
            self._inbox.append(seq)
            self._lock.notify_all()
        return seq

    def _sequence(self, prompt: list[int], params: SamplingParams, images: list | None, listener,
                  logprobs: int | None) -> Sequence:
        prompt = [int(t) for t in prompt]
        check_positions(self.model.config, len(prompt), params.max_new_tokens)
        if min(prompt) < 0 or max(prompt) >= self.model.config.vocab_size:
            raise RequestError(f"the prompt holds ids outside the vocabulary [0, {self.model.config.vocab_size})")
        if len(prompt) + params.max_new_tokens > self.pool.slot_len:
            raise RequestError(f"the prompt's {len(prompt)} tokens plus max_new_tokens={params.max_new_tokens} "
                               f"exceed the engine's {self.pool.slot_len} tokens per sequence: ask for at most "
                               f"{max(self.pool.slot_len - len(prompt), 0)} new tokens or shorten the prompt")
        ids = torch.tensor([prompt])
        spans = [a for _, a in processor.image_spans(self.model.config, ids)]
        pictures = processor.prompt_pictures(self.model.config, ids, images)
        if any(not isinstance(p, Picture) for p in pictures):
            raise RequestError("the engine takes pictures, not image features: give the images themselves")
        seq = Sequence(prompt=prompt, params=params, pictures=pictures, spans=spans, listener=listener,
                       logprobs=logprobs)
        config = self.model.config
        if config.use_dynamic_ntk:
            seq.alpha = ntk_alpha(len(prompt), config.seq_length)
        if params.do_sample and params.seed is not None:
            seq.generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Cancel a request; it leaves, and frees its slot, at the next step."""
        seq.aborted = True
        with self._lock:
            self._lock.notify_all()

    def abort_all(self) -> None:
        """Cancel every queued and running request (a server's shutdown past its timeout)."""
        with self._lock:
            for seq in list(self._inbox) + list(self.scheduler.waiting) + list(self.scheduler.running):
                seq.aborted = True
            self._lock.notify_all()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    def has_work(self) -> bool:
        return bool(self._inbox or self.scheduler.waiting or self.scheduler.running)

    # ---- the step ----------------------------------------------------------------------------------

    def step(self) -> None:
        scheduler = self.scheduler
        with self._lock:
            new, self._inbox = self._inbox, []
        # one snapshot of the cancellations: a flag set while the step runs counts at the next one, on every rank
        aborted = [s for s in [*scheduler.waiting, *scheduler.running, *new] if s.aborted]
        if self.tp is not None:
            self.tp.broadcast_object(("step", [self._wire(s) for s in new], [s.id for s in aborted]))
        self._step(new, aborted)

    def _step(self, new: list[Sequence], aborted: list[Sequence]) -> None:
        scheduler = self.scheduler
        scheduler.waiting.extend(new)
        changed: dict[int, tuple[Sequence, list[int]]] = {}
        for seq in aborted:
            if not seq.finished:
                scheduler.finish(seq, "abort")
                changed[seq.id] = (seq, [])
        admitted = scheduler.admit()
        for seq in admitted:
            self.stats["prompt_tokens"] += len(seq.prompt)
            self.stats["prefix_cache_tokens"] += seq.reused
        chunks = scheduler.plan()
        # pictures of the sequences prefilled this step, together; later ones wait for their turn, so a
        # crowd of new pictures does not stall the running streams
        self._encode([c.seq for c in chunks if c.seq.pictures and c.seq.features is None], changed)
        logits = self._run(chunks, changed)
        chunks = [c for c in chunks if not c.seq.finished]
        self.stats["steps"] += 1
        now = time.monotonic()
        argmax = greedy(logits).tolist() if logits is not None and any(  # one call for every plain greedy row
            c.sample and self._plain_greedy(c.seq) for c in chunks) else None
        sampling = []
        for c in chunks:
            c.seq.computed = c.start + c.length
            if c.sample:
                c.seq.features = None  # the prompt is in the cache now
                sampling.append(c.seq)
        tokens, errors = [], {}
        for row, seq in enumerate(sampling):
            try:
                tokens.append(argmax[row] if argmax is not None and self._plain_greedy(seq) else
                              self._sample(seq, logits[row:row + 1]))
            except Exception as e:  # e.g. a sampling rule that breaks on these logits: this request only
                errors[row] = e
                tokens.append(-1)
        if self.model.tp is not None and tokens:  # every rank continues with rank 0's tokens
            tokens = self.model.agree(torch.tensor(tokens, device=self.model.device)).tolist()
        for row, (seq, token) in enumerate(zip(sampling, tokens)):
            try:
                if token < 0:
                    raise errors.get(row) or RuntimeError("sampling failed on tensor-parallel rank 0")
                if seq.logprobs is not None:
                    self._logprobs(seq, logits[row], token)
            except Exception as e:
                self._fail(seq, e, changed)
                continue
            seq.output.append(token)
            self.stats["generation_tokens"] += 1
            seq.first_token_at = seq.first_token_at or now
            seq.last_token_at = now
            changed[seq.id] = (seq, [token])
            reason = self._stop_reason(seq, token)
            if reason:
                scheduler.finish(seq, reason)
        self._notify(changed)

    def _fail(self, seq: Sequence, error: BaseException, changed: dict) -> None:
        seq.error = error
        self.scheduler.finish(seq, "error")
        changed[seq.id] = (seq, [])

    def _encode(self, seqs: list[Sequence], changed: dict) -> None:
        """Pictures of these sequences in one batch; if that fails, each alone, failing only the culprits."""
        if not seqs:
            return
        try:
            self.runner.encode(seqs)
        except Exception:
            for seq in seqs:
                try:
                    self.runner.encode([seq])
                except Exception as e:
                    self._fail(seq, e, changed)

    def _run(self, chunks: list, changed: dict) -> torch.Tensor | None:
        """The step's logits; if the batch fails, each sequence runs alone and only the failing ones leave
        (a rerun rewrites the same cache columns, so the others lose nothing)."""
        if not chunks:
            return None
        try:
            return self.runner.run(chunks)
        except Exception:
            pieces = []
            for c in chunks:
                try:
                    pieces.append(self.runner.run([c]))
                except Exception as e:
                    self._fail(c.seq, e, changed)
            return torch.cat(pieces) if pieces else None

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        params = seq.params
        seen = torch.tensor([seq.tokens], device=logits.device) if params.repetition_penalty != 1.0 else None
        return int(next_tokens(logits, seen, params, seq.generator, len(seq.output))[0])

    @staticmethod
    def _plain_greedy(seq: Sequence) -> bool:
        params = seq.params
        return not params.do_sample and params.repetition_penalty == 1.0 and \
            (len(seq.output) >= params.min_new_tokens or not params.eos_token_id)

    @staticmethod
    def _logprobs(seq: Sequence, logits: torch.Tensor, token: int) -> None:
        logprobs = logits.float().log_softmax(-1)
        top = logprobs.topk(seq.logprobs) if seq.logprobs else None
        seq.token_logprobs.append((float(logprobs[token]), [] if top is None else
                                   list(zip(top.indices.tolist(), top.values.tolist()))))

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if token in params.eos_token_id or (params.stop_words_ids and _ends_with_stop(seq.output, params.stop_words_ids)):
            return "stop"
        if len(seq.output) >= params.max_new_tokens or seq.computed + 1 >= self.pool.slot_len:
            return "length"
        return None

    def _notify(self, changed: dict) -> None:
        for seq, tokens in changed.values():
            if seq.listener is not None:
                try:
                    seq.listener(seq, tokens)
                except Exception:  # a broken consumer cancels its own request only
                    seq.aborted = True

    # ---- background loop ---------------------------------------------------------------------------

    def start(self) -> "LLMEngine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="qwenvl-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self._release_followers()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._stopping and not self.has_work():  # followers hear from an idle rank 0 this often
                    self._lock.wait(self._heartbeat_s)
                stopping, busy = self._stopping, self.has_work()
            if stopping:
                self._release_followers()
                return
            if busy:
                self.step()
            elif self.tp is not None:
                self.tp.broadcast_object(("idle",))

    def _release_followers(self) -> None:
        if self.tp is not None and not self._followers_released:
            self._followers_released = True
            self.tp.broadcast_object(("stop",))

    # ---- tensor-parallel followers -----------------------------------------------------------------

    @staticmethod
    def _wire(seq: Sequence) -> tuple:
        """What a follower needs to run `seq` as rank 0 does (the pictures as pixels, with their hashes)."""
        return (seq.id, seq.prompt, seq.params, [(p.pixels, p.digest) for p in seq.pictures], seq.logprobs)

    def follow(self) -> None:
        """On tensor-parallel ranks other than 0 (an engine built with replicate=True and rank 0's options):
        run rank 0's steps, with its requests and cancellations, until rank 0's engine stops."""
        if self.tp is None or self.tp.rank == 0:
            raise OptionsError("follow() runs on tensor-parallel ranks other than 0 of a replicate=True engine")
        size = self.model.config.visual.image_size
        while True:
            message = self.tp.broadcast_object()
            if message[0] == "stop":
                return
            if message[0] != "step":
                continue
            _, wired, aborted_ids = message
            new = []
            for leader_id, prompt, params, pictures, logprobs in wired:
                seq = self._sequence(prompt, params, [Picture(px, size, digest) for px, digest in pictures], None,
                                     logprobs)
                self._copies[leader_id] = seq
                new.append(seq)
            self._step(new, [self._copies[i] for i in aborted_ids if i in self._copies])
            for leader_id in [i for i, s in self._copies.items() if s.finished]:
                del self._copies[leader_id]

    # ---- convenience surfaces ----------------------------------------------------------------------

    def wait(self, seqs: list[Sequence]) -> None:
        """Until every one of `seqs` has finished: by driving the steps, or, with the loop running, by waiting."""
        while not all(s.finished for s in seqs):
            if self._thread is None:
                self.step()
            else:
                time.sleep(0.002)

    def generate(self, prompts: list[list[int]], images: list | None = None, **options) -> list[list[int]]:
        """New tokens of each prompt (eos / stop tokens included, as `model.generate` yields them)."""
        seqs = [self.add_request(p, images=None if images is None else images[i], **options)
                for i, p in enumerate(prompts)]
        self.wait(seqs)
        for s in seqs:
            if s.error is not None:
                raise s.error
        return [s.output for s in seqs]

    def chat(self, tokenizer, query, history=None, system: str = DEFAULT_SYSTEM, **options) -> tuple[str, list]:
        """`model.chat` on the engine: the same prompt, stop rule and reply cut."""
        history = check_history(history)
        query, input_ids, params, chat_format = _prepare(self.model, tokenizer, query, history, system, options)
        seq = self.add_request(input_ids[0].tolist(), params)
        self.wait([seq])
        if seq.error is not None:
            raise seq.error
        response = tokenizer.decode(reply_ids(seq.output, tokenizer, drop_last_if_cut=chat_format == "chatml"),
                                    errors="replace").strip()
        history.append((query, response))
        return response, history
