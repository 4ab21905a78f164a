"""Chat formatting: same ids as transformers' apply_chat_template; training labels mask."""

import json

import pytest

from decesc.core.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]
# Our own Jinja templates in the two layouts (the real ones add tool-calling branches we don't use).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA31_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] | trim %}"
    "{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n"
    "Today Date: 26 Jul 2024\\n\\n' + sys + '<|eot_id|>' }}"
    "{% for m in rest %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
    "(m['content'] | trim) + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a patient helper.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "I can't sleep before my exam."}],
    [{"role": "system", "content": "Be kind. "},
     {"role": "user", "content": "Hello there!"},
     {"role": "assistant", "content": " It's good to hear from you."},
     {"role": "user", "content": "My cat is sick\nand I'm scared."}],
]


def write_tokenizer(path, specials, template, bos, eos):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] for c in CONVERSATIONS for m in c] + ["system user assistant"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "chat_template": template,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


@pytest.mark.parametrize("name", ["llama3", "llama3.1", "chatml"])
@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_ids_match_transformers(tmp_path, name, conv, add_generation_prompt):
    if name == "chatml":
        specials, template, bos, eos = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE, None, "<|im_end|>"
    else:
        template = LLAMA3_TEMPLATE if name == "llama3" else LLAMA31_TEMPLATE
        specials, bos, eos = LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>"
    path = write_tokenizer(tmp_path / name, specials, template, bos, eos)
    ours = Tokenizer.from_dir(path)
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    expected = ref.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours.render_chat(conv, add_generation_prompt) == expected
    ids = ref.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ours.apply_chat_template(conv, add_generation_prompt) == list(ids)


def test_prompt_target_labels_mask_the_prompt(tmp_path):
    path = write_tokenizer(tmp_path / "t", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                           CHATML_TEMPLATE, None, "<|im_end|>")
    tok = Tokenizer.from_dir(path)
    conv = CONVERSATIONS[0]
    ids, labels = tok.encode_prompt_target(conv, "Question")
    prompt = tok.apply_chat_template(conv, add_generation_prompt=True)
    target = tok.encode("Question") + [tok.token_to_id("<|im_end|>")]
    assert ids == prompt + target
    assert labels == [-100] * len(prompt) + target
    assert tok.end_of_turn_id == tok.token_to_id("<|im_end|>") in tok.stop_token_ids


def test_no_chat_template_is_a_clear_error(tmp_path):
    path = write_tokenizer(tmp_path / "t", ["<s>"], None, "<s>", "<s>")
    with pytest.raises(ValueError, match="no ChatML or Llama-3 chat template"):
        Tokenizer.from_dir(path).render_chat(CONVERSATIONS[0])
