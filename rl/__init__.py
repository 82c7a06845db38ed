"""GRPO for verifiable rewards, as small pure pieces (DeepSeekMath, Shao et al. 2024, arXiv:2402.03300).

    rl/rollout.py      rollout / rollout_batches: G samples per prompt, packed tensors, rank shards
    rl/rewards.py      RewardFn, correctness (data/graders), format_match, overlong_penalty, compute_rewards
    rl/advantages.py   group_advantages (group / batch / no std scaling), zero_std_groups
    rl/policy_loss.py  policy_loss: clipped ratio (eps_low / eps_high), k1 / k3 KL, grpo / dapo / dr_grpo sums
    rl/grpo.py         GRPOConfig, grpo_update (mu optimizer steps on one batch), grpo_step (rewards -> update)

One RL step of a trainer:

    for batch in rollout_batches(policy, prompts, references, cfg.sampling_params(), tokenizer.stop_ids,
                                 prompts_per_step, tokenizer, rank, world_size):
        metrics = grpo_step(policy, ref_model, optimizer, batch, reward_fns, cfg, scheduler=scheduler)
"""
