"""The training forward: loss only at supervised positions, any padding side, packed samples isolated."""
import pytest
import torch
import torch.nn.functional as F

from conftest import make_checkpoint

import qwenvl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3)
    model = qwenvl.AutoModelForCausalLM.from_pretrained(folder, fp32=True, device_map="cpu")
    return model.train()


def sample(seed: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 150000, (length,), generator=g)
    labels = ids.clone()
    labels[: length // 3] = -100  # a masked prompt, then supervised tokens
    return ids, labels


def reference_loss(model, ids, labels, reduction="mean"):
    logits = model(ids[None]).logits[0]
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction=reduction)


def test_loss_equals_cross_entropy_over_full_logits(tiny):
    ids, labels = sample(0, 40)
    out = tiny(ids[None], labels=labels[None])
    assert out.logits is None and out.num_tokens == int((labels[1:] != -100).sum())
    torch.testing.assert_close(out.loss, reference_loss(tiny, ids, labels), atol=1e-5, rtol=1e-5)
    summed = tiny(ids[None], labels=labels[None], reduction="sum").loss
    torch.testing.assert_close(summed, reference_loss(tiny, ids, labels, "sum"), atol=1e-4, rtol=1e-5)


def test_right_padded_batch_equals_separate_rows(tiny):
    (a, la), (b, lb) = sample(1, 30), sample(2, 18)
    ids = torch.full((2, 30), 151643)
    labels = torch.full((2, 30), -100)
    mask = torch.zeros(2, 30, dtype=torch.long)
    ids[0], labels[0], mask[0] = a, la, 1
    ids[1, :18], labels[1, :18], mask[1, :18] = b, lb, 1
    batch = tiny(ids, attention_mask=mask, labels=labels, reduction="sum").loss
    alone = reference_loss(tiny, a, la, "sum") + reference_loss(tiny, b, lb, "sum")
    torch.testing.assert_close(batch, alone, atol=1e-3, rtol=1e-5)


def test_packed_samples_are_isolated(tiny):
    (a, la), (b, lb) = sample(3, 25), sample(4, 15)
    ids = torch.cat([a, b, torch.full((4,), 151643)])[None]
    labels = torch.cat([la, lb, torch.full((4,), -100)])[None]
    positions = torch.cat([torch.arange(25), torch.arange(15), torch.zeros(4, dtype=torch.long)])[None]
    segments = torch.cat([torch.ones(25), torch.full((15,), 2), torch.zeros(4)]).long()[None]
    mask = (segments > 0).long()
    packed = tiny(ids, attention_mask=mask, labels=labels, position_ids=positions, segment_ids=segments,
                  reduction="sum")
    alone = reference_loss(tiny, a, la, "sum") + reference_loss(tiny, b, lb, "sum")
    torch.testing.assert_close(packed.loss, alone, atol=1e-3, rtol=1e-5)
    # the boundary target (b's first token, predicted from a's last) is not counted
    assert packed.num_tokens == int((la[1:] != -100).sum() + (lb[1:] != -100).sum())
    logits = tiny(ids, attention_mask=mask, position_ids=positions, segment_ids=segments).logits[0]
    torch.testing.assert_close(logits[25:40], tiny(b[None]).logits[0], atol=1e-4, rtol=1e-4)


def test_no_supervised_token_gives_zero_loss_with_a_graph(tiny):
    ids, _ = sample(5, 12)
    out = tiny(ids[None], labels=torch.full((1, 12), -100))
    assert out.num_tokens == 0 and float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in tiny.parameters())
    tiny.zero_grad(set_to_none=True)
