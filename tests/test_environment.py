"""The thread count the suite runs at is the one asked for (CI runs the fast set at 1 and at 2)."""
import os

import torch


def test_torch_uses_the_thread_count_of_omp_num_threads():
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
