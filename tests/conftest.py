import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def embedded():
    """The embedded tiny Qwen2.5-VL, loaded once for the whole session."""
    from fp8mix.models import loading

    return loading.load(None)
