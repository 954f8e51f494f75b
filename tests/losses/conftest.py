"""The loss tests work on small tensors: one intra-op thread is fastest for them and, when the suite runs
under xdist (-n 2) on two cores, avoids oversubscribing the machine (OpenMP threads spinning on a busy
core turn microsecond ops into milliseconds). Restored after each test, so other packages' tests are not
affected."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
