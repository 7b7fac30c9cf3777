"""kdops: continuous knowledge distillation.

The library is a pipeline of stages, one module each, imports pointing one way:

    data -> soft_labels (teacher) -> distill (student, losses, schedules) -> evaluate -> gate -> registry

Nothing here imports ``flows``, ``serving`` or ``monitoring``; nothing runs on import.
"""

__version__ = "0.1.0"
