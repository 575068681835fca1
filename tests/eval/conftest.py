import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: a second intra-op thread only adds barrier waits on the shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
