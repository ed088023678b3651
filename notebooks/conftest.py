"""nbval (CI, `make test`): the real-data notebooks are skipped, with the reason, where their data are absent."""

import os
from pathlib import Path

import pytest

NEEDS = {"11a_mnist.ipynb": "MNIST", "11b_cifar10.ipynb": "cifar10-test"}  # notebook -> folder under the data root


def data_root() -> Path:
    """As minildm.config.data_root: $MINILDM_DATA, else data/ in the project."""
    return Path(os.environ["MINILDM_DATA"]) if os.environ.get("MINILDM_DATA") else Path(__file__).parents[1] / "data"


def pytest_collection_modifyitems(config, items):
    for item in items:
        need = NEEDS.get(Path(str(item.fspath)).name)
        if need and not (data_root() / need).is_dir():
            item.add_marker(pytest.mark.skip(reason=f"{Path(str(item.fspath)).name} needs the real data set in "
                                                    f"{data_root() / need} (set MINILDM_DATA to the folder that holds "
                                                    f"{need}/, e.g. ../shared/data)"))
