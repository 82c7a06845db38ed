"""The training library behind train.py: typed config, models, batches and sharding, the stages
(supervised.py: sft and kd; rl_stage.py: GRPO), the run's bookkeeping (run.py: run directory, schedule,
checkpoints, export), evaluation, process groups and run records."""
