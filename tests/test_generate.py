"""KV-cache generation: cached == uncached, padded batch == alone, seeded sampling, stops."""

import pytest
import torch
from conftest import tiny_hf_config

from decesc.core.generate import generate, sample_next, truncate_at_stop
from decesc.core.config import ModelConfig
from decesc.core.model import CausalLM


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf(tiny_hf_config("llama", vocab_size=64))).init_weights(std=0.3, seed=0)
    return model.eval()


def greedy_uncached(model, prompt, n):
    """Reference: re-run the whole sequence for every new token, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 64, (n,), generator=g).tolist() for n in (7, 3, 12)]


def test_cached_greedy_equals_uncached(tiny):
    for p in prompts():
        assert generate(tiny, [p], max_new_tokens=20) == [greedy_uncached(tiny, p, 20)]


def test_left_padded_batch_equals_each_prompt_alone(tiny):
    ps = prompts()
    batched = generate(tiny, ps, max_new_tokens=15)
    alone = [generate(tiny, [p], max_new_tokens=15)[0] for p in ps]
    assert batched == alone


def test_seeded_sampling_is_reproducible(tiny):
    ps = prompts()
    a = generate(tiny, ps, max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    b = generate(tiny, ps, max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    c = generate(tiny, ps, max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=8)
    assert a == b and a != c


def test_stop_token_and_stop_string(tiny):
    p = prompts()[0]
    free = generate(tiny, [p], max_new_tokens=10)[0]
    stop = free[4]
    cut = generate(tiny, [p], max_new_tokens=10, stop_token_ids=[stop])[0]
    assert cut == free[:free.index(stop)]  # stops before the first occurrence, stop id excluded
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    s = f"<{free[2]}><{free[3]}>"
    out = generate(tiny, [p], max_new_tokens=10, stop_strings=[s], decode=decode)[0]
    assert out == free[:4]
    assert truncate_at_stop(decode(out), [s]) == decode(free[:2])


def test_top_k_and_top_p_filtering():
    """Hand-worked: logits log([0.5, 0.3, 0.15, 0.05]).

    top_k=2 keeps tokens 0 and 1 only. top_p=0.7: token 0 (mass before it 0) and token 1 (mass
    before it 0.5 < 0.7) stay; token 2 has 0.8 before it and is dropped, and so is token 3.
    top_p=0.5: only token 0 (token 1 has exactly 0.5 before it, which reaches top_p).
    """
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    for kwargs, allowed in [({"top_k": 2}, {0, 1}), ({"top_p": 0.7}, {0, 1}), ({"top_p": 0.5}, {0})]:
        seen = set(sample_next(logits, 1.0, generator=g, **kwargs).tolist())
        assert seen == allowed, kwargs
    assert sample_next(logits[:1], 0.0).item() == 0


def test_empty_prompt_rejected(tiny):
    with pytest.raises(ValueError, match="no prompt may be empty"):
        generate(tiny, [[]], max_new_tokens=2)
