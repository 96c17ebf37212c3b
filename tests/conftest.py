"""Shared pytest fixtures. Run the suite with `bash tools/test.sh`."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine every op that waits for a
    busy core runs 20-50x slower (measured); restores the setting for the other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
