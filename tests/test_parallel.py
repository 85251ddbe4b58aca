"""Tensor parallel on CPU: 2 gloo ranks (tests/tp_worker.py, 1 thread each) against 1 process."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qwenvl
from qwenvl import cli, launch
from qwenvl.bench import random_config
from qwenvl.errors import DistributedError, OptionsError
from qwenvl.loading import read_shard
from qwenvl.model import QWenLMHeadModel, parallel

from conftest import CHECKPOINT, make_checkpoint

WORKER = str(Path(__file__).parent / "tp_worker.py")
SRC = str(Path(qwenvl.__file__).parent.parent)
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
# 4 heads, biases, and a vocabulary that 2 ranks split unevenly (the last rank's lm_head row is padding)
FOUR_HEADS = dict(num_attention_heads=4, kv_channels=32, no_bias=False, vocab_size=151939)


def run_worker(mode: str, out: str, paths: list, timeout_s: float = 600) -> None:
    launch.run_ranks([sys.executable, WORKER, mode, out, *map(str, paths)], 2,
                     env={**ENV, parallel.TIMEOUT_ENV: str(timeout_s)})


def test_rank_slices_are_the_right_parts_of_the_full_tensors(tmp_path):
    config = random_config("tiny")
    for key, value in FOUR_HEADS.items():
        setattr(config, key, value)
    with torch.device("meta"):
        names = {n: p.shape for n, p in QWenLMHeadModel(config).state_dict(keep_vars=True).items()
                 if not n.startswith("transformer.visual.") or n.endswith("ln_post.weight")}
    full = {n: torch.randn(shape) for n, shape in names.items()}
    heads, d, inner, vocab = 4, 32, config.intermediate_size // 2, config.vocab_size
    from safetensors.torch import save_file
    save_file({"transformer.h.0.attn.c_attn.weight": full["transformer.h.0.attn.c_attn.weight"]}, tmp_path / "a.safetensors")
    for world in (2, 4):
        parts = [parallel.Shards(config, rank, world) for rank in range(world)]
        for name, tensor in full.items():
            local = [s.take(name, tensor) for s in parts]
            if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
                qkv = tensor.reshape(3, heads, d, -1)
                for rank, t in enumerate(local):  # q, k and v rows of this rank's heads
                    mine = qkv[:, rank * heads // world:(rank + 1) * heads // world]
                    assert torch.equal(t, mine.reshape(t.shape)), name
            elif name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
                assert torch.equal(torch.cat(local, dim=1), tensor), name
            elif ".mlp.w1." in name or ".mlp.w2." in name:
                assert [t.shape[0] for t in local] == [inner // world] * world
                assert torch.equal(torch.cat(local), tensor), name
            elif name in ("transformer.wte.weight", "lm_head.weight"):
                per = -(-vocab // world)
                assert all(t.shape[0] == per for t in local)
                assert torch.equal(torch.cat(local)[:vocab], tensor), name
                assert not torch.cat(local)[vocab:].any()  # padding rows are zero
            else:  # norms, row-parallel biases, the vision tower: replicated
                assert all(torch.equal(t, tensor) for t in local), name
        # a safetensors slice object reads the same part as indexing the full tensor
        name, sliced = next(read_shard(str(tmp_path / "a.safetensors"), slices=True))
        assert torch.equal(parts[1].take(name, sliced), parts[1].take(name, full[name]))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """{checkpoint: (one-process outputs, [rank 0 outputs, rank 1 outputs])}."""
    sys.path.insert(0, str(Path(__file__).parent))
    import tp_worker

    folder = tmp_path_factory.mktemp("tp")
    paths = [str(CHECKPOINT), str(make_checkpoint(folder / "four_heads", seed=3, **FOUR_HEADS))]
    run_worker("outputs", str(folder / "out"), paths)
    ranks = [torch.load(folder / f"out.{r}.pt") for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {p: (tp_worker.outputs(p, False), [r[p] for r in ranks]) for p in paths}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("which", [0, 1], ids=["golden", "four_heads"])
def test_two_ranks_match_one_process(two_ranks, which):
    path = list(two_ranks)[which]
    one, ranks = two_ranks[path]
    config = qwenvl.QWenConfig.from_json(os.path.join(path, "config.json"))
    scale = one["logits"].abs().max()
    for out in ranks:
        assert out["generate"] == one["generate"]
        assert out["engine"] == one["engine"] == one["generate"]
        diff = (out["logits"] - one["logits"]).abs().max()
        assert diff <= 1e-5 * scale, f"max |logit diff| {diff:.3g} with logits up to {scale:.3g}"
        assert 0.49 < out["weight_bytes"] / one["weight_bytes"] < 0.52
        traffic = parallel.decode_traffic(config, 2, 4)
        step = out["step_collectives"]
        assert (step["all_reduce"], step["all_gather"]) == (traffic["all_reduces"], 1)
        sent = step["bytes"] - 8 * step["broadcast"]  # less the agreed token (int64)
        assert sent == traffic["all_reduces"] * traffic["all_reduce_bytes"] + traffic["all_gather_bytes"] // 2
    # seeded differently on each rank: only rank 0's broadcast tokens keep them in step
    assert ranks[0]["sampled"] == ranks[1]["sampled"]
    assert ranks[0]["engine_sampled"] == ranks[1]["engine_sampled"]


def test_dead_rank_stops_the_others(tmp_path):
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"rank 1 of 2 exited with status 3: .*the other ranks were stopped"):
        run_worker("die", str(tmp_path / "out"), [])  # collectives would wait 600 s: the launcher acts
    assert time.monotonic() - start < 60


def test_stalled_rank_times_out(tmp_path):
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"rank 0 of 2 exited with status 1: .*died or stalled"):
        run_worker("stall", str(tmp_path / "out"), [], timeout_s=3)
    assert time.monotonic() - start < 60


def test_cli_generate_with_two_ranks_prints_the_same_answer(capsys):
    args = ["generate", "-m", str(CHECKPOINT), "--dtype", "fp32", "--device", "cpu", "--greedy",
            "--max-new-tokens", "5", "--image", str(CHECKPOINT.parent / "images" / "shapes_640x480.png"),
            "--prompt", "What is this?"]
    assert cli.main(args) == 0
    alone = capsys.readouterr().out
    run = subprocess.run([sys.executable, "-m", "qwenvl.cli", *args, "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, env={**os.environ, **ENV}, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == alone and alone.strip()


def test_refusals(monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(OptionsError, match="torchrun"):
        qwenvl.from_pretrained(CHECKPOINT, fp32=True, device_map="cpu", tensor_parallel=True)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(OptionsError, match="size 4 does not divide the model's 2 attention heads"):
        qwenvl.from_pretrained(CHECKPOINT, fp32=True, device_map="cpu", tensor_parallel=True)
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "soon")
    with pytest.raises(OptionsError, match=parallel.TIMEOUT_ENV):
        parallel.collective_timeout()
    assert cli.main(["generate", "-m", str(CHECKPOINT), "--prompt", "hi", "--tensor-parallel-size", "0"]) == 2
    assert "--tensor-parallel-size must be at least 1" in capsys.readouterr().err


def test_serve_with_two_ranks_answers_as_model_chat_and_stops_on_sigterm(model, tokenizer):
    """`qwenvl serve --tensor-parallel-size 2`: rank 0 serves and sends each step's requests to rank 1;
    concurrent requests (one with a picture, one cancelled mid-stream) answer as solo model.chat does, an idle
    spell longer than the heartbeat keeps the ranks together, and SIGTERM ends every rank with status 0."""
    openai = pytest.importorskip("openai")
    import base64
    import concurrent.futures
    import signal

    import httpx

    shapes = CHECKPOINT.parent / "images" / "shapes_640x480.png"
    port = launch.free_port()
    env = {**os.environ, **ENV, parallel.TIMEOUT_ENV: "15"}  # an idle rank 0 signals every 15 / 4 s
    server = subprocess.Popen([sys.executable, "-m", "qwenvl.cli", "serve", "-m", str(CHECKPOINT), "--dtype", "fp32",
                               "--device", "cpu", "--port", str(port), "--served-model-name", "golden",
                               "--tensor-parallel-size", "2"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, server.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the tensor-parallel server did not start"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        uri = "data:image/png;base64," + base64.b64encode(shapes.read_bytes()).decode()
        picture = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What is it?"}]

        def ask(content, n=5):
            reply = client.chat.completions.create(model="golden", messages=[{"role": "user", "content": content}],
                                                   temperature=0, max_tokens=n)
            return reply.choices[0].message.content.strip()

        def cancelled():  # a stream dropped after its first chunk: rank 0 cancels it, rank 1 must follow
            with client.chat.completions.create(model="golden", stream=True, temperature=0, max_tokens=40,
                                                messages=[{"role": "user", "content": "Count to fifty"}]) as stream:
                next(iter(stream))

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(ask, picture), pool.submit(ask, "Name a colour"), pool.submit(cancelled)]
            answers = [f.result(timeout=300) for f in futures[:2]]
            futures[2].result(timeout=300)
        expected = [model.chat(tokenizer, q, max_new_tokens=6, do_sample=False)[0] for q in (
            tokenizer.from_list_format([{"image": str(shapes)}, {"text": "What is it?"}]), "Name a colour")]
        assert answers == expected
        time.sleep(17)  # idle past the collective timeout: the heartbeats keep the follower from timing out
        assert ask("Name a colour") == expected[1]
        server.send_signal(signal.SIGTERM)  # to the launcher: it passes it on to rank 0
        assert server.wait(timeout=90) == 0, server.communicate()[1]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_replicate_needs_a_tensor_parallel_model(model):
    from qwenvl.engine import LLMEngine

    with pytest.raises(OptionsError, match="replicate=True is for a tensor-parallel model"):
        LLMEngine(model, replicate=True)
    with pytest.raises(OptionsError, match="follow"):
        LLMEngine(model).follow()
