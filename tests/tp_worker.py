"""One tensor-parallel rank for tests/test_parallel.py, started by qwenvl.launch.run_ranks (or called in-process
as the one-process reference): `python tests/tp_worker.py MODE OUT CHECKPOINT...`.

MODE outputs: greedy tokens from generate and from LLMEngine, prefill + decode logits, weight bytes, unseeded
samples and the collectives of one decode step, for each checkpoint, saved to OUT.RANK.pt. MODE die: rank 1
exits at once while rank 0 waits in an all-reduce. MODE stall: rank 1 sleeps while rank 0 waits.
"""
import os
import sys
import time
from pathlib import Path

import torch

import qwenvl
from qwenvl.engine import LLMEngine
from qwenvl.processor import prompt_pixels

IMAGE = Path(__file__).parent / "data" / "golden" / "images" / "shapes_640x480.png"
NEW_TOKENS = 6


def prompt(tokenizer) -> torch.Tensor:
    query = tokenizer.from_list_format([{"image": str(IMAGE)}, {"text": "What is in the picture?"}])
    return torch.tensor([tokenizer(query).input_ids])


def outputs(path: str, tensor_parallel: bool) -> dict:
    model = qwenvl.from_pretrained(path, fp32=True, device_map="cpu", tensor_parallel=tensor_parallel)
    tokenizer = qwenvl.AutoTokenizer.from_pretrained(path)
    ids, images = prompt(tokenizer), [str(IMAGE)]
    out = {"weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    out["generate"] = model.generate(ids, images=images, **greedy)[0, ids.shape[1]:].tolist()
    with torch.inference_mode():
        logits, cache, rows = model.prefill(ids, None, prompt_pixels(model.config, ids), NEW_TOKENS)
        steps = [logits]
        for i in range(NEW_TOKENS - 1):
            before = dict(model.tp.counts) if model.tp else None
            logits = model.decode_step(model.agree(steps[-1].argmax(-1)), cache, rows)
            if model.tp and i == 0:
                out["step_collectives"] = {k: model.tp.counts[k] - before[k] for k in before}
            steps.append(logits)
    out["logits"] = torch.cat(steps)
    engine = LLMEngine(model, max_num_seqs=2, kv_cache_tokens=2 * (ids.shape[1] + NEW_TOKENS))
    out["engine"] = engine.generate([ids[0].tolist()], images=[images], **greedy)[0]
    torch.manual_seed(1000 + int(os.environ.get("RANK", 0)))  # unseeded sampling: a different stream per rank
    sampling = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, eos_token_id=None)
    out["sampled"] = model.generate(ids, images=images, **sampling)[0, ids.shape[1]:].tolist()
    out["engine_sampled"] = engine.generate([ids[0].tolist()], images=[images], **sampling)[0]
    return out


def main(mode: str, out: str, paths: list[str]) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    if mode == "outputs":
        torch.save({p: outputs(p, True) for p in paths}, f"{out}.{rank}.pt")
        return
    from qwenvl.model import parallel
    group = parallel.join(cuda=False)
    if rank == 1:
        if mode == "die":
            os._exit(3)
        time.sleep(120)
    group.all_reduce(torch.ones(4))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
