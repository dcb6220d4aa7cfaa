"""qstar_mini: Quiet-STaR (Zelikman et al. 2024, arXiv 2403.09629), one readable function per step.

Follow one batch through :func:`qstar_mini.step.quiet_star_step` to meet every line of
Algorithm 1 in order; README.md has the map from each line to its function and notebook.
"""

__version__ = "0.1.0"


def set_seed(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA): call it first in every notebook and script."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
