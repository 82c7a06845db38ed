"""Support package of train.py: typed config, process groups, batching and sharding, training-state
checkpoints, per-stage objectives, and run records. train.py reads top to bottom; these are its helpers."""
