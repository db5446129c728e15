"""timm's BatchNormAct2d (a BatchNorm2d subclass that applies an activation) is folded.

A replica built here (timm is not in CI): a BatchNorm2d subclass with ``drop`` and ``act``
submodules whose forward is ``act(drop(F.batch_norm(...)))``, like timm's. fx traces
through it into ``F.batch_norm`` on the module's own tensors: fold folds that into the conv
before it and keeps the activation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ressurgeon import SkipConfig, add_skips, fold


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features, act_layer=nn.ReLU):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


def regnet_like() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), BatchNormAct2d(8, nn.SiLU),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), BatchNormAct2d(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model.train()
    with torch.no_grad():
        for _ in range(3):   # running statistics that are not the identity
            model(torch.randn(8, 3, 8, 8) * 3 + 1)
    return model.eval()


def test_batchnormact_is_folded_and_its_activation_kept():
    model, x = regnet_like(), torch.randn(2, 3, 8, 8)
    folded = fold(model, (x,))
    assert sorted(folded.batchnorms_folded) == ["1", "3", "5"]
    graph = folded.module.graph
    assert not any(n.target is F.batch_norm for n in graph.nodes)
    acts = [n.target for n in graph.nodes if n.op == "call_module" and n.target.endswith("act")]
    assert acts == ["1.act", "3.act", "5.act"]
    torch.testing.assert_close(folded.module(x), model(x), rtol=1e-5, atol=1e-5)


def test_batchnormact_folds_after_add_skips_too():
    model, x = regnet_like(), torch.randn(2, 3, 8, 8)
    result = add_skips(model, (x,), SkipConfig(span=1))
    assert result.skips
    folded = fold(result.module, (x,))
    assert len(folded.batchnorms_folded) == 3
    torch.testing.assert_close(folded.module(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_shared_or_training_batch_norm_is_left_alone():
    model, x = regnet_like(), torch.randn(2, 3, 8, 8)

    class Shared(nn.Module):   # one BN's tensors read twice: folding would change the other
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8).eval()

        def forward(self, x):
            y = self.conv(x)
            stats = (self.bn.running_mean, self.bn.running_var)
            return F.batch_norm(y, *stats, training=False) + F.batch_norm(y, *stats,
                                                                          training=False)

    assert fold(Shared().eval(), (x,)).batchnorms_folded == []
