"""model/tokenizer.py: sentencepiece (embedded) and tokenizer.json (Qwen) backends, ChatML, check_vocab."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.config import PRESETS
from model.tokenizer import QWEN25_DEFAULT_SYSTEM, check_vocab, load_tokenizer, train_tokenizer

CORPUS = [
    "Mia has 12 apples. She buys 7 more apples. How many apples does Mia have now?",
    "After buying 7 more apples, Mia has 12+7 = <<12+7=19>>19 apples.\n#### 19",
    "def add_3(x: int) -> int:\n    \"\"\"Return x plus 3.\"\"\"\n    return x + 3\n",
] * 30

ROUND_TRIP = [
    "Mia has 12+7 = <<12+7=19>>19 apples.\nShe gives 4 away.\n#### 15",
    "  leading spaces,\ttabs, trailing spaces  \n\n\nthree newlines",
    "    return [x for x in xs if x > 0]\n",
    "unseen letters Zq and unicode: é, 漢字, 🙂",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "",
]

# Non-tool branch of Qwen2.5-Instruct's chat template (tokenizer_config.json), verbatim.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) "
    "or (message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("sp"), vocab_size=320)


def build_hf_dir(path, with_default_system=True):
    """A Qwen-shaped checkpoint dir: byte-level BPE tokenizer.json + Qwen specials + configs."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(QWEN_SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    template = QWEN25_TEMPLATE if with_default_system else QWEN25_TEMPLATE.replace(QWEN25_DEFAULT_SYSTEM, "")
    config = {"eos_token": "<|im_end|>", "pad_token": {"content": "<|endoftext|>"}, "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_hf_dir(tmp_path_factory.mktemp("hf"))


# ---------------------------------------------------------------- sentencepiece backend

@pytest.mark.parametrize("text", ROUND_TRIP)
def test_sentencepiece_round_trip(sp_tok, text):
    assert sp_tok.decode(sp_tok.encode(text)) == text


def test_digits_one_per_token(sp_tok):
    ids = sp_tok.encode("12+7 = <<12+7=19>>19 and 40596")
    pieces = [sp_tok.decode([i]) for i in ids]
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces), pieces
    assert [sp_tok.decode([i]) for i in sp_tok.encode("40596")] == list("40596")


def test_specials_are_single_ids(sp_tok):
    specials = sp_tok.special_tokens
    assert set(specials) == set(QWEN_SPECIALS) and len(set(specials.values())) == 3
    for token, i in specials.items():
        assert sp_tok.encode(token) == [i]
        assert i in sp_tok.encode(f"text{token}text")
    assert sp_tok.eos_id == sp_tok.pad_id == specials["<|endoftext|>"]
    assert sp_tok.stop_ids == sorted([specials["<|endoftext|>"], specials["<|im_end|>"]])
    assert sp_tok.encode("Mia")[0] not in specials.values()  # no BOS
    mixed = "<|im_start|>user\nMia<|im_end|>\n"
    assert sp_tok.decode(sp_tok.encode(mixed), skip_special_tokens=True) == "user\nMia\n"


def test_sentencepiece_vocab_and_reload(sp_tok):
    assert sp_tok.vocab_size <= 320
    assert max(max(sp_tok.encode(t), default=0) for t in ROUND_TRIP) < sp_tok.vocab_size
    again = load_tokenizer(sp_tok.source)
    assert again.encode(ROUND_TRIP[0]) == sp_tok.encode(ROUND_TRIP[0])


def test_training_is_deterministic(sp_tok, tmp_path):
    train_tokenizer(CORPUS, tmp_path, vocab_size=320)
    assert (tmp_path / "tokenizer.model").read_bytes() == (Path(sp_tok.source) / "tokenizer.model").read_bytes()


def test_chat_template_literal(sp_tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
                {"role": "assistant", "content": "2+3 = 5\n#### 5"}, {"role": "user", "content": "And 4+4?"}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n"
                "<|im_start|>user\n2+3?<|im_end|>\n"
                "<|im_start|>assistant\n2+3 = 5\n#### 5<|im_end|>\n"
                "<|im_start|>user\nAnd 4+4?<|im_end|>\n")
    assert sp_tok.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert sp_tok.apply_chat_template(messages, add_generation_prompt=True) == expected + "<|im_start|>assistant\n"
    # The embedded tokenizer has no default system prompt.
    assert sp_tok.apply_chat_template(messages[1:2], add_generation_prompt=True) == (
        "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_rejects_bad_messages(sp_tok):
    with pytest.raises(ValueError, match=r"messages\[1\]: field 'content'"):
        sp_tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user"}], True)
    with pytest.raises(ValueError, match=r"messages\[0\]: field 'role'.*'robot'"):
        sp_tok.apply_chat_template([{"role": "robot", "content": "a"}], True)


def test_load_tokenizer_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_check_vocab(sp_tok):
    check_vocab(sp_tok, replace(PRESETS["tiny-student"], vocab_size=sp_tok.vocab_size), "ckpt")
    check_vocab(sp_tok, replace(PRESETS["tiny-student"], vocab_size=sp_tok.vocab_size + 64), "ckpt")  # padded head
    small = replace(PRESETS["tiny-student"], vocab_size=sp_tok.vocab_size - 1)
    with pytest.raises(ValueError, match=rf"ckpt/dir.*{sp_tok.vocab_size} ids.*vocab_size is {sp_tok.vocab_size - 1}"):
        check_vocab(sp_tok, small, "ckpt/dir")


# ---------------------------------------------------------------- tokenizer.json backend

def test_hf_backend_ids_and_specials(hf_dir):
    tok = load_tokenizer(hf_dir)
    reference = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ids = {t: reference.token_to_id(t) for t in QWEN_SPECIALS}
    assert tok.special_tokens == ids
    assert tok.eos_id == ids["<|im_end|>"] and tok.pad_id == ids["<|endoftext|>"]
    assert tok.stop_ids == sorted([ids["<|im_end|>"], ids["<|endoftext|>"]])
    assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    assert tok.default_system_prompt == QWEN25_DEFAULT_SYSTEM
    for text in ROUND_TRIP:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>") == [ids["<|im_start|>"]]
    assert tok.decode(tok.encode("<|im_start|>user\nHi<|im_end|>"), skip_special_tokens=True) == "user\nHi"


def test_hf_backend_without_default_system(tmp_path):
    tok = load_tokenizer(build_hf_dir(tmp_path, with_default_system=False))
    assert tok.default_system_prompt is None


def test_hf_bad_config_names_file_and_field(hf_dir, tmp_path):
    for name in ("tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: field 'eos_token' names '<\|nope\|>'"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": \n oops}')
    with pytest.raises(ValueError, match=r"tokenizer_config.json: line 2"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(hf_dir, with_system, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    reference.chat_template = QWEN25_TEMPLATE
    messages = [{"role": "user", "content": "Mia has 12 apples."},
                {"role": "assistant", "content": "12+7 = <<12+7=19>>19\n#### 19"},
                {"role": "user", "content": "And now?"}]
    if with_system:
        messages = [{"role": "system", "content": "Answer with a number."}, *messages]
    tok = load_tokenizer(hf_dir)
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert tok.encode(ours) == reference.encode(theirs, add_special_tokens=False)
