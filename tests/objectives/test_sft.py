import math

import torch

from revmix.objectives.base import build_objective, per_direction, sequence_logps, token_logps
from tests.objectives.helpers import make_batch, tiny_lm


def test_token_logps_hand_computed():
    # Two-token vocabulary, uniform logits: every response token has log-prob log(1/2).
    logits = torch.zeros(1, 4, 2)
    labels = torch.tensor([[-100, -100, 1, 0]])
    logp, mask = token_logps(logits, labels)
    assert mask.tolist() == [[False, True, True]]
    assert torch.allclose(logp.sum(), torch.tensor(2 * math.log(0.5)))
    assert torch.allclose(sequence_logps(logits, labels, average=True), torch.tensor([math.log(0.5)]))


def test_sft_equals_cross_entropy_on_response_tokens():
    model, batch = tiny_lm(), make_batch()
    out = build_objective({"name": "sft"})(model, batch, None)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert torch.allclose(out.loss, ref, atol=1e-6)
    assert {"nll/forward", "nll/reverse", "loss"} <= set(out.metrics)


def test_per_direction_metrics():
    m = per_direction(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 1, 0]), "x")
    assert m == {"x": 3.0, "x/forward": 3.0, "x/reverse": 3.0}
