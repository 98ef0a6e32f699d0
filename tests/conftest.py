import pytest
import torch

# Tiny models run fastest single-threaded, and tests that start servers share the two cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
