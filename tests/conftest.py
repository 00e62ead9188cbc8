import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests share 2 cores with each other's subprocesses: keep torch to one thread."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference_pair():
    """The shipped reference pair, loaded once per test session."""
    from models.reference_pair import load_reference_pair

    return load_reference_pair()
