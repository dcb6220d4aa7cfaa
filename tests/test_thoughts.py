"""qstar_mini.thoughts: where the sampling noise comes from."""

import pytest
import torch

from qstar_mini.thoughts import gumbel_noise


def test_the_same_seed_gives_the_same_noise():
    a = gumbel_noise((2, 3, 7), torch.Generator().manual_seed(4))
    b = gumbel_noise((2, 3, 7), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, gumbel_noise((2, 3, 7), torch.Generator().manual_seed(5)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: a CPU generator's noise moved to it")
def test_a_cpu_generator_gives_the_gpu_the_cpu_noise():
    """The notebooks' outputs rely on this: thoughts sampled on a GPU from a CPU generator are the
    ones the CPU samples, wherever the logits agree."""
    on_cpu = gumbel_noise((2, 3, 50), torch.Generator().manual_seed(0))
    on_gpu = gumbel_noise((2, 3, 50), torch.Generator().manual_seed(0), device="cuda")
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)
