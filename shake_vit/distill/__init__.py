"""What every family shares about distillation: the method registry, the logit losses, teacher fitting and records,
the health checks' base, the teacher-output cache's format and store, and their config sections (schema.py)."""
from . import schema  # noqa: F401  (registers the sections)
