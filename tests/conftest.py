import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors in the unit tests are tiny: one thread is faster than two and does not stall when the
    machine is busy (measured: the tiny autoencoder training test took 2 s on one thread, up to 60 s on two
    with other jobs running). Notebooks run in their own kernels and keep the default."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
