"""saliency.source: the spectral residual, the model's own target encoder, a local supervised network."""

from __future__ import annotations

import pytest
import torch
import torchvision

from mixmask.config import Config, ConfigError, validate
from mixmask.mixing import Pixels
from mixmask.mixing.saliency import SaliencyConfig, SaliencySource, cell_means, foreground

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def views(n=3, size=32):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def test_encoder_source_uses_the_handed_feature_map():
    """Foreground = the cells where the channel sum of the handed map is high (never the image itself)."""
    src = SaliencySource(SaliencyConfig(source="encoder"))
    v = views()
    with pytest.raises(RuntimeError, match="encoder"):
        src(v, Pixels(MEAN, STD))
    hot = torch.zeros(3, 4, 4)
    hot[0, 0, 3] = hot[1, 2, 1] = hot[2, 3, 0] = 1.0  # one salient cell per sample, different positions
    seen = []

    def fmap(x):  # (N, 3, H, W) normalised -> (N, 2, 4, 4): the channel sum is 10 x hot
        seen.append(x)
        return torch.stack([4 * hot, 6 * hot], dim=1)

    src.feature_map = fmap
    s = src(v, Pixels(MEAN, STD))
    assert torch.allclose(s, 10 * hot)
    x = seen[0]
    assert x.dtype == torch.float32 and torch.allclose(x, (v.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25, atol=1e-6)
    fg = foreground(s, 4, 0.0)  # threshold 0: A >= mean(A)
    assert fg.reshape(3, 4, 4)[0, 0, 3] == 1 and fg.reshape(3, 4, 4)[1, 2, 1] == 1 and fg.reshape(3, 4, 4)[2, 3, 0] == 1
    assert fg.sum() == 3


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_source_is_the_local_networks_last_map(tmp_path, suffix):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / f"r18{suffix}"
    if suffix == ".pth":
        torch.save(net.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    src = SaliencySource(SaliencyConfig(source="file", weights=str(path), arch="resnet18"))
    v = views(2, 64)
    x = (v.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        want = net.layer4(net.layer3(net.layer2(net.layer1(h)))).sum(dim=1)  # (N, 2, 2)
    got = src(v, Pixels(MEAN, STD))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert cell_means(got, 2).shape == (2, 4)


def test_file_source_refuses_a_wrong_file(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(RuntimeError):  # strict load: never a silently random network
        SaliencySource(SaliencyConfig(source="file", weights=str(path), arch="resnet18"))


def test_file_source_config_errors(tmp_path):
    cfg = Config()
    cfg.mask.method, cfg.saliency.source = "saliency", "file"
    with pytest.raises(ConfigError, match="saliency.source=file needs weights"):
        validate(cfg)
    cfg.saliency.weights = str(tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="saliency.weights: no such file"):
        validate(cfg)
