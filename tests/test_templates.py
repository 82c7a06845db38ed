"""data/templates.py: prompt strings (literal), completion-only labels, truncation, chat masks."""
import pytest

from data.templates import IGNORE_INDEX, STOP_STRINGS, chat_example, format_completion, render_prompt, \
    tokenize_example
from model.tokenizer import load_tokenizer, train_tokenizer
from test_tokenizer import CORPUS, build_hf_dir

QUESTION = "Mia has 12 apples. She buys 7 more apples. How many apples does Mia have now?"
ANSWER = "After buying 7 more apples, Mia has 12+7 = <<12+7=19>>19 apples.\n#### 19"
SHOT = ("Tom has 3 pens. He buys 2 more pens. How many pens does Tom have now?",
        "After buying 2 more pens, Tom has 3+2 = <<3+2=5>>5 pens.\n#### 5")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("sp"), vocab_size=320)


def test_fewshot_literal(tok):
    prompt = render_prompt(tok, QUESTION, style="fewshot", shots=[SHOT])
    assert prompt == (
        "Question: Tom has 3 pens. He buys 2 more pens. How many pens does Tom have now?\n"
        "Answer: After buying 2 more pens, Tom has 3+2 = <<3+2=5>>5 pens.\n#### 5\n\n"
        "Question: Mia has 12 apples. She buys 7 more apples. How many apples does Mia have now?\n"
        "Answer:")
    assert STOP_STRINGS["fewshot"] == ("\n\nQuestion:",) and STOP_STRINGS["chat"] == ()
    with pytest.raises(ValueError, match="system"):
        render_prompt(tok, QUESTION, style="fewshot", system="Be brief.")


def test_chat_literal(tok):
    assert render_prompt(tok, QUESTION) == (
        "<|im_start|>user\n" + QUESTION + "\nSolve step by step.<|im_end|>\n<|im_start|>assistant\n")
    prompt = render_prompt(tok, QUESTION, task="math", system="S.", shots=[SHOT])
    boxed = "\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert prompt == ("<|im_start|>system\nS.<|im_end|>\n"
                      "<|im_start|>user\n" + SHOT[0] + boxed + "<|im_end|>\n"
                      "<|im_start|>assistant\n" + SHOT[1] + "<|im_end|>\n"
                      "<|im_start|>user\n" + QUESTION + boxed + "<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert render_prompt(tok, QUESTION, instruction="") == (
        "<|im_start|>user\n" + QUESTION + "<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        render_prompt(tok, QUESTION, task="chess")
    with pytest.raises(ValueError, match="style"):
        render_prompt(tok, QUESTION, style="json")


@pytest.mark.parametrize("style", ["chat", "fewshot"])
def test_labels_mask_exactly_the_prompt(tok, style):
    prompt = render_prompt(tok, QUESTION, style=style, shots=[SHOT])
    completion = format_completion(ANSWER, style)
    input_ids, labels = tokenize_example(tok, prompt, completion, max_len=1000, style=style)
    n_prompt = len(tok.encode(prompt))
    end_id = tok.special_tokens["<|im_end|>"] if style == "chat" else tok.eos_id
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == input_ids[n_prompt:]
    assert input_ids[-1] == end_id
    assert tok.decode(input_ids[n_prompt:-1]) == completion
    # Separate encoding of prompt and completion equals encoding the concatenation.
    assert input_ids == tok.encode(prompt + completion) + [end_id]


def test_truncation_policy(tok):
    prompt = render_prompt(tok, QUESTION)
    full_ids, full_labels = tokenize_example(tok, prompt, ANSWER, max_len=1000)
    n_prompt = len(tok.encode(prompt))
    ids, labels = tokenize_example(tok, prompt, ANSWER, max_len=n_prompt + 3)
    assert ids == full_ids[:n_prompt + 3] and labels == full_labels[:n_prompt + 3]
    assert tok.special_tokens["<|im_end|>"] not in ids[n_prompt:]  # a cut answer does not teach stopping
    with pytest.raises(ValueError, match=rf"no learnable token within max_len={n_prompt}.*first learnable at {n_prompt}"):
        tokenize_example(tok, prompt, ANSWER, max_len=n_prompt)


def _learned_text(tok, input_ids, labels):
    """Decoded maximal runs of labelled tokens."""
    runs, run = [], []
    for i, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            run.append(i)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    return runs + ([tok.decode(run)] if run else [])


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "And 2 more?"},
            {"role": "assistant", "content": "19+2 = <<19+2=21>>21\n#### 21"}]


def test_chat_example_loss_on_assistant_turns(tok):
    input_ids, labels = chat_example(tok, MESSAGES, max_len=1000)
    assert input_ids == tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=False))
    assert _learned_text(tok, input_ids, labels) == [ANSWER + "<|im_end|>", MESSAGES[4]["content"] + "<|im_end|>"]


def test_chat_example_default_system_unlabelled(tmp_path):
    hf = load_tokenizer(build_hf_dir(tmp_path))
    input_ids, labels = chat_example(hf, MESSAGES[1:3], max_len=1000)
    text = hf.apply_chat_template(MESSAGES[1:3], add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\nYou are Qwen")
    assert input_ids == hf.encode(text)
    assert _learned_text(hf, input_ids, labels) == [ANSWER + "<|im_end|>"]
