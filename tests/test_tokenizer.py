"""model/tokenizer.py: the embedded BPE (tokenizer.json), tokenizer.json (Qwen) and sentencepiece backends,
ChatML, check_vocab, and the errors for unreadable tokenizer files."""
import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.config import PRESETS
from model.tokenizer import QWEN25_DEFAULT_SYSTEM, SPECIAL_TOKENS, check_vocab, load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]

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
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}\n"
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
def tok(tmp_path_factory):
    """The embedded default: a BPE trained by train_tokenizer."""
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("bpe"), vocab_size=320)


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


# ---------------------------------------------------------------- the embedded tokenizer (train_tokenizer)

@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_digits_one_per_token(tok):
    ids = tok.encode("12+7 = <<12+7=19>>19 and 40596")
    pieces = [tok.decode([i]) for i in ids]
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces), pieces
    assert [tok.decode([i]) for i in tok.encode("40596")] == list("40596")


def test_specials_are_single_ids(tok):
    specials = tok.special_tokens
    assert set(specials) == set(QWEN_SPECIALS) and len(set(specials.values())) == 3
    for token, i in specials.items():
        assert tok.encode(token) == [i]
        assert i in tok.encode(f"text{token}text")
    assert tok.eos_id == tok.pad_id == specials["<|endoftext|>"]
    assert tok.stop_ids == sorted([specials["<|endoftext|>"], specials["<|im_end|>"]])
    assert tok.encode("Mia")[0] not in specials.values()  # no BOS
    mixed = "<|im_start|>user\nMia<|im_end|>\n"
    assert tok.decode(tok.encode(mixed), skip_special_tokens=True) == "user\nMia\n"


def test_vocab_and_reload(tok):
    assert tok.vocab_size <= 320
    assert max(max(tok.encode(t), default=0) for t in ROUND_TRIP) < tok.vocab_size
    again = load_tokenizer(tok.source)
    assert again.encode(ROUND_TRIP[0]) == tok.encode(ROUND_TRIP[0])


def test_training_is_deterministic(tok, tmp_path):
    """Same texts, same files, also in another process (other hash seeds, other thread timing)."""
    code = ("import sys; from tests.test_tokenizer import CORPUS; from model.tokenizer import train_tokenizer; "
            "train_tokenizer(CORPUS, sys.argv[1], vocab_size=320)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, check=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (Path(tok.source) / name).read_bytes(), name


def test_chat_template_literal(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
                {"role": "assistant", "content": "2+3 = 5\n#### 5"}, {"role": "user", "content": "And 4+4?"}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n"
                "<|im_start|>user\n2+3?<|im_end|>\n"
                "<|im_start|>assistant\n2+3 = 5\n#### 5<|im_end|>\n"
                "<|im_start|>user\nAnd 4+4?<|im_end|>\n")
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == expected + "<|im_start|>assistant\n"
    # The embedded tokenizer has no default system prompt.
    assert tok.apply_chat_template(messages[1:2], add_generation_prompt=True) == (
        "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_rejects_bad_messages(tok):
    with pytest.raises(ValueError, match=r"messages\[1\]: field 'content'"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user"}], True)
    with pytest.raises(ValueError, match=r"messages\[0\]: field 'role'.*'robot'"):
        tok.apply_chat_template([{"role": "robot", "content": "a"}], True)


def test_load_tokenizer_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_check_vocab(tok):
    check_vocab(tok, replace(PRESETS["tiny-student"], vocab_size=tok.vocab_size), "ckpt")
    check_vocab(tok, replace(PRESETS["tiny-student"], vocab_size=tok.vocab_size + 64), "ckpt")  # padded head
    small = replace(PRESETS["tiny-student"], vocab_size=tok.vocab_size - 1)
    with pytest.raises(ValueError, match=rf"ckpt/dir.*{tok.vocab_size} ids.*vocab_size is {tok.vocab_size - 1}"):
        check_vocab(tok, small, "ckpt/dir")


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


# ---------------------------------------------------------------- the embedded tokenizer in transformers

def test_newline_is_always_one_token(tok):
    ids = tok.encode("a.\n\n\nb  \n    return x\n")
    assert [tok.decode([i]) for i in ids].count("\n") == 5
    assert all("\n" not in tok.decode([i]) or tok.decode([i]) == "\n" for i in ids)


def test_framing_words_are_single_tokens(tmp_path):
    """Trained on corpus_texts (the study's corpus), the chat framing costs one token per word."""
    from data.synthetic import corpus_texts, make_splits
    from data.templates import INSTRUCTIONS
    rows = make_splits(seed=0, n_train=200, n_test=1, n_harder=1)["train"]
    embedded = train_tokenizer(corpus_texts(rows), tmp_path, vocab_size=1000)
    for word in ("user", "assistant", "Solve", " step", "Question", "Answer"):
        assert len(embedded.encode(word)) == 1, word
    prompt = embedded.apply_chat_template([{"role": "user", "content": f"{rows[0]['question']}\n"
                                            f"{INSTRUCTIONS['synthetic']}"}], add_generation_prompt=True)
    framing = prompt.replace(rows[0]["question"], "")
    assert len(embedded.encode(framing)) <= 16, [embedded.decode([i]) for i in embedded.encode(framing)]


def chat_and_digit_strings(rows: list[dict]) -> list[str]:
    """Chat-rendered prompts and conversations of synthetic rows, numbers, and the round-trip texts."""
    from data.templates import INSTRUCTIONS
    texts = [*ROUND_TRIP, "0123456789", "12345 + 6789 = 19134", "-3.25e10, 1,000,000 and 007"]
    for row in rows:
        user = {"role": "user", "content": f"{row['question']}\n{INSTRUCTIONS['synthetic']}"}
        texts.append(f"<|im_start|>user\n{user['content']}<|im_end|>\n<|im_start|>assistant\n")
        texts.append(f"<|im_start|>user\n{user['content']}<|im_end|>\n<|im_start|>assistant\n{row['answer']}"
                     "<|im_end|>\n")
        texts.append(f"Question: {row['question']}\nAnswer: {row['answer']}<|endoftext|>")
    return texts


def test_embedded_tokenizer_loads_in_transformers_with_our_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    from data.synthetic import corpus_texts, make_splits
    splits = make_splits(seed=0, n_train=200, n_test=40, n_harder=10)
    ours = train_tokenizer(corpus_texts(splits["train"]), tmp_path, vocab_size=1000)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = chat_and_digit_strings(splits["test"] + splits["harder"])
    assert len(texts) > 150
    for text in texts:
        ids = ours.encode(text)
        assert theirs.encode(text) == ids and theirs.encode(text, add_special_tokens=False) == ids, text
        assert theirs.decode(ids) == ours.decode(ids) == text
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)
    assert (theirs.eos_token_id, theirs.pad_token_id) == (ours.eos_id, ours.pad_id)
    assert {t: theirs.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS} == ours.special_tokens
    for generation_prompt in (False, True):
        messages = [{"role": "user", "content": splits["test"][0]["question"]},
                    {"role": "assistant", "content": splits["test"][0]["answer"]}, {"role": "user", "content": "2+3?"}]
        text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert text == ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)


def test_final_dir_of_a_run_is_a_transformers_model_with_our_tokenizer(tmp_path, one_thread):
    """train.py's final/ of a tiny run: AutoTokenizer + AutoModelForCausalLM give our ids and our logits."""
    transformers = pytest.importorskip("transformers")
    import train
    from conftest import synthetic_workspace
    from model.checkpoint import load_pretrained
    ours = synthetic_workspace(tmp_path, n_train=8, n_test=4)
    out = tmp_path / "run"
    assert train.main(["--model", "tiny-student", "--tokenizer", str(tmp_path / "tok"), "--data",
                       str(tmp_path / "train.jsonl"), "--out", str(out), "--max-steps", "1",
                       "--set", "data.max_len=256", "--set", "data.micro_batch_size=2"]) == 0
    final = out / "final"
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    model = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    prompt = ours.apply_chat_template([{"role": "user", "content": "Mia has 12 apples. How many?"}], True)
    ids = ours.encode(prompt)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Mia has 12 apples. How many?"}],
                                         tokenize=False, add_generation_prompt=True) == prompt
    assert tokenizer.encode(prompt) == ids and load_tokenizer(final).encode(prompt) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, load_pretrained(final)(x), rtol=0, atol=1e-4)


# ---------------------------------------------------------------- sentencepiece (tokenizer.model of earlier runs)

def train_sentencepiece(texts: list[str], out: Path) -> Path:
    """A tokenizer.model as train_tokenizer wrote it before it moved to tokenizer.json."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=320, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=[*SPECIAL_TOKENS, "\n"], unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    return out


def test_sentencepiece_model_of_an_earlier_run_loads(tmp_path):
    sp = load_tokenizer(train_sentencepiece(CORPUS, tmp_path))
    assert isinstance(sp.backend, spm.SentencePieceProcessor)
    for text in ROUND_TRIP:
        assert sp.decode(sp.encode(text)) == text
    assert [sp.decode([i]) for i in sp.encode("40596")] == list("40596")
    assert sp.eos_id == sp.pad_id == sp.special_tokens["<|endoftext|>"] and sp.encode("<|im_end|>") == [3]


# ---------------------------------------------------------------- unreadable tokenizer files

def test_missing_directory_is_reported_as_such(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^tokenizer directory {tmp_path / 'nope'} not found$"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"tokenizer directory {tmp_path / 'file'} is a file"):
        load_tokenizer(tmp_path / "file")


@pytest.mark.parametrize("name, content, cause", [
    ("tokenizer.json", b'{"version": "1.0", "model": 42}', "unreadable tokenizer.json"),
    ("tokenizer.json", b"\x00\xff garbage", "unreadable tokenizer.json"),
    ("tokenizer.model", b"\x00\xff garbage, not a ModelProto", "unreadable sentencepiece model"),
])
def test_garbage_tokenizer_file_names_file_and_cause(tmp_path, name, content, cause):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / name}: {cause} (") and "\n" not in message, message


def test_tokenizer_config_not_utf8_names_file(tok, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((Path(tok.source) / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_bytes(b'{"eos_token": "caf\xe9"}')
    with pytest.raises(ValueError, match=f"{tmp_path / 'tokenizer_config.json'}: not valid UTF-8"):
        load_tokenizer(tmp_path)
