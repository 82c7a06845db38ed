"""The study's GRPO stage against an independent implementation: TRL's GRPOTrainer.

    pip install -r requirements-dev.txt trl
    python study.py                                             # trains seed_<s>/base and seed_<s>/grpo
    python bench/grpo_trl_check.py --study runs/study --seed 0  # TRL from the same base, same settings

TRL trains from the same start model (the study's seed_<s>/base/final, an HF-layout directory) on the
same prompts (the train split, rendered as study.py renders them) with the same reward (the gsm8k grader's
correctness), the same rollout batch (grpo_prompts x grpo_group samples at temperature 1, one optimizer
step per batch), loss (DAPO token-level, no KL), advantage (group mean and std), lr (constant after 5
warmup steps), AdamW betas and clipping. What differs is what should not matter: the prompt order, the
sampling streams, and the code. The greedy test and harder pass@1 of both models are measured with the
same evaluation (trainer/evaluation.py); the study's figure for this seed is read from its eval stage.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import study  # noqa: E402
from data.graders import gsm8k  # noqa: E402
from data.readers import load_gsm8k  # noqa: E402
from data.tasks import render_prompts  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402
from trainer.stages import evaluate_model  # noqa: E402


def trl_grpo(start: str, tokenizer_dir: Path, rows: list[dict], cfg: study.StudyConfig, seed: int, out: Path):
    """TRL GRPOTrainer from `start`; the trained model is saved to out (HF layout)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(start, torch_dtype=torch.float32)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    prompts = render_prompts(load_tokenizer(str(tokenizer_dir)), rows, "synthetic", "chat")
    dataset = Dataset.from_list([{"prompt": p, "reference": r["reference"]} for p, r in zip(prompts, rows)])

    def correct(completions, reference, **_):
        return [gsm8k.grade(c, r).score for c, r in zip(completions, reference)]

    batch = cfg.grpo_prompts * cfg.grpo_group
    args = GRPOConfig(
        output_dir=str(out / "trainer"), max_steps=cfg.grpo_steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=cfg.grpo_group,
        num_iterations=1, learning_rate=cfg.grpo_lr, lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, cfg.grpo_steps), adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0,
        max_grad_norm=1.0, loss_type="dapo", beta=0.0, scale_rewards="group", temperature=1.0, top_p=1.0,
        max_completion_length=cfg.max_new_tokens, use_cpu=True, seed=seed, logging_steps=1,
        save_strategy="no", report_to="none", bf16=False)
    trainer = GRPOTrainer(model=model, reward_funcs=correct, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    trainer.model.save_pretrained(out / "final", safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / "final" / name).write_bytes((Path(start) / name).read_bytes())
    return rewards


def greedy(model_dir: str, data: Path, cfg: study.StudyConfig, out: Path) -> dict[str, float]:
    """{split: greedy pass@1} of a model on test and harder, evaluated as the study's eval stage does."""
    suites = {split: ("synthetic", load_gsm8k(data / f"{split}.jsonl")) for split in study.SPLITS}
    modes = {"greedy": study.eval_params(study.Run(cfg, 0, out))["greedy"]}
    evaluate_model(model_dir, str(data / "tokenizer"), suites, modes, "chat", cfg.eval_batch, out)
    return {split: json.loads((out / f"{split}_greedy" / "summary.json").read_text())["pass@1"]
            for split in study.SPLITS}


def study_figure(run: study.Run, name: str, split: str) -> float:
    return json.loads((run.eval_dir(name) / f"{split}_greedy" / "summary.json").read_text())["pass@1"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", default="runs/study", help="a study directory with seed_<seed>/base and grpo done")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: <study>/trl_check/seed_<seed>")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    study_dir = Path(args.study)
    cfg = study.StudyConfig(**json.loads((study_dir / "study_config.json").read_text()))
    run = study.Run(cfg, args.seed, study_dir)
    out = Path(args.out or study_dir / "trl_check" / f"seed_{args.seed}")
    t0 = time.perf_counter()
    rewards = trl_grpo(run.final("base"), run.data / "tokenizer", load_gsm8k(run.data / "train.jsonl"), cfg,
                       args.seed, out)
    seconds = time.perf_counter() - t0
    result = {"seed": args.seed, "trl_seconds": round(seconds, 1), "trl_rollout_reward": rewards}
    trl = greedy(str(out / "final"), run.data, cfg, out)
    for split in study.SPLITS:
        result[split] = {"base": study_figure(run, "base", split), "srlm grpo": study_figure(run, "grpo", split),
                         "trl grpo": trl[split]}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"seed {args.seed}: greedy pass@1 (%) base -> srlm GRPO | TRL GRPO ({cfg.grpo_steps} steps of "
          f"{cfg.grpo_prompts} x {cfg.grpo_group}, lr {cfg.grpo_lr}; TRL took {seconds:.0f} s)")
    for split in study.SPLITS:
        r = result[split]
        print(f"  {split}: {100 * r['base']:.1f} -> {100 * r['srlm grpo']:.1f} | {100 * r['trl grpo']:.1f}")
    n = max(1, len(rewards) // 8)
    print(f"  TRL rollout reward: first {n} steps {sum(rewards[:n]) / n:.3f}, last {n} steps {sum(rewards[-n:]) / n:.3f}")


if __name__ == "__main__":
    main()
