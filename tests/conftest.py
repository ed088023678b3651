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


@pytest.fixture(scope="session")
def course_home(tmp_path_factory):
    """A project folder of its own for tests that write checkpoints (e.g. the judge that `minildm evaluate` trains
    once per image size), so they never touch the checkout's checkpoints/ and share the judge across tests."""
    home = tmp_path_factory.mktemp("course_home")
    (home / "checkpoints").mkdir()
    return home
