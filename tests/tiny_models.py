"""Small networks shared by the engine tests."""

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
