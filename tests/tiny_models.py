"""Small networks and their set-up, shared by the tests."""

import torch

from mnpo.models import build_model


def tiny_vgg_mnpo(classes: int = 3) -> torch.nn.Module:
    """The released layout at width 1/16, seed 0, in eval mode, with a classifier spread wide
    enough (std 0.5 instead of He-init's 0.01) that its class scores and maps differ clearly."""
    torch.manual_seed(0)
    model = build_model("vgg16-mnpo", classes, width=0.0625)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
    return model.eval()


def spread_batchnorm(module: torch.nn.Module, mean_range: float = 0.5, affine: bool = False) -> torch.nn.Module:
    """Draw every BatchNorm2d's statistics away from the identity (running mean
    U(-mean_range, mean_range), variance U(0.5, 2)) and, with ``affine``, its weight U(0.5, 1.5)
    and bias U(-0.2, 0.2), from torch's global generator: so that comparisons see the buffers and
    the affine parameters. Returns ``module``."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-mean_range, mean_range)
                m.running_var.uniform_(0.5, 2.0)
                if affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    return module


def spread_for_maps(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with BatchNorm statistics away from the identity and a classifier
    whose softmax is not flat (He-init's 0.01 would make it so)."""
    spread_batchnorm(model, mean_range=0.3)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
    return model.eval()
