"""The real demo model: our GGUF load vs transformers' GGUF load of the same file."""

import pytest
import torch

from decesc.core.generate import generate

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    [{"role": "user", "content": "I failed my driving test again and I feel stupid."}],
    [{"role": "system", "content": "You are a kind listener."},
     {"role": "user", "content": "Hi, can we talk?"},
     {"role": "assistant", "content": "Of course. What's on your mind?"},
     {"role": "user", "content": "Work is crushing me — 60-hour weeks, no thanks. 😞"}],
]


def test_logits_match_transformers_gguf(smollm2, hf_smollm2):
    model, tok = smollm2
    hf_model, _ = hf_smollm2
    ids = torch.tensor([tok.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True)])
    with torch.no_grad():
        ours, ref = model(ids), hf_model(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_ids_match_apply_chat_template(smollm2, hf_smollm2, conv, add_generation_prompt):
    _, tok = smollm2
    _, hf_tok = hf_smollm2
    ref = hf_tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt) == list(ref)


def test_greedy_decoding_matches_transformers(smollm2, hf_smollm2):
    model, tok = smollm2
    hf_model, _ = hf_smollm2
    prompt = tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
    ours = generate(model, [prompt], max_new_tokens=24, stop_token_ids=tok.stop_token_ids)[0]
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                eos_token_id=tok.stop_token_ids, pad_token_id=tok.pad_token_id)
    theirs = [t for t in out[0, len(prompt):].tolist() if t not in tok.stop_token_ids]
    assert len(ours) > 5
    assert ours == theirs


def test_cached_greedy_equals_uncached_on_smollm2(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
    cached = generate(model, [prompt], max_new_tokens=12)[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert cached == ids[len(prompt):]
