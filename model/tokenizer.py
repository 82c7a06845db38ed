"""Tokenizers: one small interface over two backends.

- `tokenizer.json` (byte-level BPE, run by the `tokenizers` library) plus `tokenizer_config.json` /
  `generation_config.json` for the special tokens: a real Qwen checkpoint directory, and the
  embedded default, which `train_tokenizer` trains on the synthetic task (data/synthetic.py) with
  digits split one per token so that arithmetic is learnable digit by digit. transformers'
  `AutoTokenizer` loads either directory and gives the same ids;
- a sentencepiece `tokenizer.model`: what `train_tokenizer` wrote before it moved to `tokenizer.json`,
  so that tokenizer directories of earlier runs still load.

Both speak ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`), rendered here in plain Python rather
than by a jinja chat template, so the exact prompt string is visible in one function.
Neither adds a BOS token: Qwen has none.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.checkpoint import require_directory

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
CHAT_ROLES = ("system", "user", "assistant")
# Qwen2.5's chat template inserts this system message when the conversation has none.
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# chatml_segments as a jinja template (no default system message), for transformers' apply_chat_template.
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def chatml_segments(messages: list[dict], default_system_prompt: str | None = None,
                    add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """ChatML as (text, is_assistant_reply) pieces; joined, they are the chat string.

    A message renders as `<|im_start|>{role}\\n` + content + `<|im_end|>` + `\\n`. The flag marks
    what an assistant turn must learn to produce (its content and its `<|im_end|>`), which is
    what data/templates.py puts the loss on.
    """
    for i, message in enumerate(messages):
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                raise ValueError(f"messages[{i}]: field {field!r} must be a string, got {message.get(field)!r}")
        if message["role"] not in CHAT_ROLES:
            raise ValueError(f"messages[{i}]: field 'role' must be one of {CHAT_ROLES}, got {message['role']!r}")
    if default_system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": default_system_prompt}, *messages]
    segments = []
    for message in messages:
        reply = message["role"] == "assistant"
        segments += [(f"{IM_START}{message['role']}\n", False), (message["content"], reply),
                     (IM_END, reply), ("\n", False)]
    if add_generation_prompt:
        segments.append((f"{IM_START}assistant\n", False))
    return segments


@dataclass
class Tokenizer:
    """A backend plus the ids the rest of srlm needs.

    vocab_size: number of ids including special tokens (max id + 1); the model's embedding may
    have more rows (Qwen2.5 pads 151,665 ids to 151,936 rows). stop_ids: ids that end a generation.
    """
    backend: tokenizers.Tokenizer | spm.SentencePieceProcessor
    vocab_size: int
    special_tokens: dict[str, int]  # token string -> id
    eos_id: int
    pad_id: int
    stop_ids: list[int]
    default_system_prompt: str | None
    source: str  # the directory it was loaded from, for error messages

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, no BOS; special-token strings such as "<|im_start|>" become their ids."""
        if isinstance(self.backend, spm.SentencePieceProcessor):
            return self.backend.encode(text, out_type=int)
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            special = set(self.special_tokens.values())
            ids = [i for i in ids if i not in special]
        if isinstance(self.backend, spm.SentencePieceProcessor):
            return self.backend.decode(list(ids))
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """ChatML string; a default system message is inserted when the checkpoint's template does."""
        segments = chatml_segments(messages, self.default_system_prompt, add_generation_prompt)
        return "".join(text for text, _ in segments)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load `tokenizer.json` (HF, preferred when both exist) or `tokenizer.model` (sentencepiece).

    A missing directory is a FileNotFoundError "tokenizer directory X not found"; an unreadable file
    a ValueError naming the file and the cause.
    """
    path = require_directory(path, "tokenizer")
    if (path / "tokenizer.json").exists():
        return _load_hf(path)
    if (path / "tokenizer.model").exists():
        return _load_sentencepiece(path)
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not valid UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def _read_json(file: Path) -> dict:
    if not file.exists():
        return {}
    try:
        config = json.loads(_read_text(file))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: line {e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _token_string(value, file: Path, field: str) -> str | None:
    """tokenizer_config.json spells a token as a string or as {"content": string, ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{file}: field {field!r} must be a token string or {{'content': ...}}, got {value!r}")


def _token_id(special: dict[str, int], token: str, file: Path, field: str) -> int:
    if token not in special:
        raise ValueError(f"{file}: field {field!r} names {token!r}, which is not a special token of the tokenizer")
    return special[token]


def _stop_ids(special: dict[str, int], eos_id: int, extra: Iterable[int] = ()) -> list[int]:
    """<|endoftext|> and <|im_end|> when present, the eos id, and any extra (generation_config) ids."""
    ids = {special[t] for t in (ENDOFTEXT, IM_END) if t in special} | {eos_id} | set(extra)
    return sorted(ids)


def _load_hf(path: Path) -> Tokenizer:
    file = path / "tokenizer.json"
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the library raises a bare Exception for any parse error
        raise ValueError(f"{file}: unreadable tokenizer.json ({_first_line(e)})") from None
    special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    config_file = path / "tokenizer_config.json"
    config = _read_json(config_file)
    eos = _token_string(config.get("eos_token"), config_file, "eos_token") or ENDOFTEXT
    pad = _token_string(config.get("pad_token"), config_file, "pad_token") or eos
    eos_id = _token_id(special, eos, config_file, "eos_token")
    pad_id = _token_id(special, pad, config_file, "pad_token")
    generation_file = path / "generation_config.json"
    extra = _read_json(generation_file).get("eos_token_id", [])
    extra = [extra] if isinstance(extra, int) else extra
    if not all(isinstance(i, int) for i in extra):
        raise ValueError(f"{generation_file}: field 'eos_token_id' must be an int or a list of ints, got {extra!r}")
    # The template may live in tokenizer_config.json or in chat_template.jinja (newer checkpoints);
    # the sentence has no characters that JSON escapes, so a substring test on the raw text is exact.
    template_text = "".join(_read_text(f) for f in (config_file, path / "chat_template.jinja") if f.exists())
    default_system = QWEN25_DEFAULT_SYSTEM if QWEN25_DEFAULT_SYSTEM in template_text else None
    vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    return Tokenizer(backend, vocab_size, special, eos_id, pad_id, _stop_ids(special, eos_id, extra),
                     default_system, str(path))


def _load_sentencepiece(path: Path) -> Tokenizer:
    file = path / "tokenizer.model"
    try:
        backend = spm.SentencePieceProcessor(model_file=str(file))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{file}: unreadable sentencepiece model ({_first_line(e)})") from None
    special = {t: backend.piece_to_id(t) for t in SPECIAL_TOKENS if backend.piece_to_id(t) != backend.unk_id()}
    if ENDOFTEXT not in special:
        raise ValueError(f"{file}: has no {ENDOFTEXT} piece; train a tokenizer with train_tokenizer")
    eos_id = special[ENDOFTEXT]
    return Tokenizer(backend, backend.get_piece_size(), special, eos_id, eos_id, _stop_ids(special, eos_id),
                     None, str(path))


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `texts`, write `out_dir/tokenizer.json` + `tokenizer_config.json`, load it.

    Chosen so that decode(encode(x)) == x and arithmetic is learnable:
    - no normalisation, bytes as the base alphabet: any text encodes and decodes back exactly;
    - "\\n" is split off before anything else, one token always (solutions are line-structured);
    - digits are split one per token, so "48" is "4", "8" as in Qwen's pre-tokenizer;
    - words then split as GPT-2's byte-level BPE does (a word keeps its leading space);
    - the ChatML specials are ids 0, 1, 2 (<|endoftext|> is eos and pad), no BOS/EOS added.
    `vocab_size` is an upper bound: a small corpus may run out of merges first. The model file is a
    function of the texts (the trainer breaks ties by pair, not by thread timing).
    The directory is a complete HF tokenizer: transformers' AutoTokenizer gives our ids and chat string.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    backend.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
              "bos_token": None, "unk_token": None, "chat_template": CHATML_TEMPLATE,
              "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return load_tokenizer(out_dir)


def check_vocab(tokenizer: Tokenizer, config, source: str | Path) -> None:
    """Every tokenizer id must index a row of the model's embedding (extra padded rows are fine)."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{source}: tokenizer has {tokenizer.vocab_size} ids (max id {tokenizer.vocab_size - 1}) but the "
            f"model's vocab_size is {config.vocab_size}; ids >= {config.vocab_size} have no embedding row")
