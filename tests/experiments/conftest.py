"""Fixtures the command tests share: the embedded digits built once, and a run in a fresh folder."""
import pytest


@pytest.fixture(scope="session")
def data_home(tmp_path_factory):
    """The embedded digits built once for the session's runs (``TAPS_DATA_HOME``)."""
    from datamodules.embedded import load_embedded_digits

    home = tmp_path_factory.mktemp("taps_data")
    load_embedded_digits(home / "embedded_digits")
    return home


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, data_home):
    """A run started in an empty working folder, on the shared data, outside any DDP run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TAPS_DATA_HOME", str(data_home))
    monkeypatch.delenv("TAPS_RUN_VERSION", raising=False)
    return tmp_path
