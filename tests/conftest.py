import os

# One thread per process unless OMP_NUM_THREADS says otherwise (CI runs the fast set at 1 and at
# 2): the tests' models are tiny (a second thread barely helps them), and the subprocess tests
# (CLI, 2-process DDP, benchmark) inherit this instead of oversubscribing the cores. On a busy
# machine OpenMP threads waiting for each other made the suite several times slower. No test may
# depend on the thread count: reductions are compared within their rounding bound (helpers.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download weights

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_report_header(config):
    return (f"torch {torch.__version__}: {torch.get_num_threads()} thread(s) (OMP_NUM_THREADS="
            f"{os.environ['OMP_NUM_THREADS']}), CPU kernels {torch.backends.cpu.get_cpu_capability()}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
