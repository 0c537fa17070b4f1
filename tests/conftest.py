import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A runner started in the background or under nohup ignores SIGINT / SIGHUP, and child processes
# inherit an ignored signal; the signal tests need them delivered as a terminal delivers them.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """Tiny random SDXL base + refiner saved in diffusers layout, with the reference pipelines."""
    from tiny import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session", autouse=True)
def _torch_single_thread():
    """Tiny reference models run faster on one torch thread (and don't fight MLX for the 2 cores)."""
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
