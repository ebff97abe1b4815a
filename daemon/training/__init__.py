"""Training: datasets from validated rows, the ranker and the crop proposer, honest holdout
metrics, the model registry, the retrain policy and the audit hook's token budget.

Heavy imports (torch) happen only inside the modules that train (``models``, ``fit``), which
the light modules (``policy``, ``audit``, ``cli``) import inside functions, so ``trainingd
status`` never loads torch.
"""

from __future__ import annotations
