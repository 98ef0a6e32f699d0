import pytest
import torch

# Tiny models run fastest single-threaded, and tests that start servers share the two cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def make_tiny_ldm(seed: int = 0):
    """A tiny LatentDiffusion with random, non-degenerate weights (zero-inits perturbed)."""
    from ldm.config import LDMConfig, load_yaml
    from ldm.models.diffusion import LatentDiffusion

    torch.manual_seed(seed)
    model = LatentDiffusion(load_yaml(LDMConfig, FIXTURES / "tiny_ldm.yaml"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        sync_ema(model)
    return model.eval()


def sync_ema(model) -> None:
    """Set the EMA shadow to the current weights, so the EMA and raw paths give one model."""
    if model.model_ema is None:
        return
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            getattr(model.model_ema, model.model_ema.m_name2s_name[name]).copy_(p)


@pytest.fixture(scope="session")
def tiny_ldm_dir(tmp_path_factory):
    """Our-format checkpoint folder of `make_tiny_ldm()`."""
    from ldm.pretrained import save_pretrained

    model = make_tiny_ldm()
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_pretrained(folder, model, "ldm", model.config)
    return folder
