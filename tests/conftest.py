import os

# One thread per process: the tests' models are tiny (a second thread barely helps them), and the
# subprocess tests (CLI, 2-process DDP, benchmark) inherit this instead of oversubscribing the
# cores. On a busy machine OpenMP threads waiting for each other made the suite several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download weights

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
