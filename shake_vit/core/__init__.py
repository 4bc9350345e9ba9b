"""The spine: config loading (config.py) and the shared sections (schema.py), the engine (Trainer, evaluate), the
checkpoints, preemption, optimizer and schedule, the run folder, the runner, the Family interface and its registry,
the data pieces every family's loaders share, and reading weight files."""
from . import schema  # noqa: F401  (registers the spine's config sections)
