"""Train-mode behaviour survives: stochastic layers stay stochastic, loaded models keep their mode.

A .pt2 stores no train/eval flag: ``load_model`` infers it from the graph's mode-dependent
ops (train-mode batch_norm or dropout), else eval. Tracing keeps layers whose forward reads
``self.training`` (drop-path, stochastic depth, dropout) as modules, so the result's train
mode draws the same random masks as the original's.
"""

import pytest
import torch
import torch.nn as nn

from ressurgeon import add_skips, load_model

PARITY = 1e-6  # float32


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 4))


def _trained_stats(model):
    with torch.no_grad():  # running statistics far from the batch's own
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(0.5)
                m.running_var.fill_(3.0)
    return model


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_pt2_loads_in_the_mode_it_was_exported_in(tmp_path, mode):
    model = _trained_stats(_cnn()).train(mode == "train")
    x = torch.randn(4, 3, 8, 8)
    path = tmp_path / "cnn.pt2"
    torch.export.save(torch.export.export(model, (x,), strict=False), path)
    loaded = load_model(path)
    assert loaded.training is (mode == "train")
    if mode == "eval":  # main returned train mode: batch statistics, off by ~0.5
        before = loaded.get_buffer("1.running_mean").clone()
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=PARITY)
        assert torch.equal(loaded.get_buffer("1.running_mean"), before)


def test_a_pt2_without_mode_dependent_ops_loads_in_eval(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 4),), strict=False), path)
    assert load_model(path).training is False


def test_weights_with_arch_load_in_eval(tmp_path, monkeypatch):
    (tmp_path / "archs.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))\n")
    monkeypatch.chdir(tmp_path)
    torch.save(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).state_dict(), "w.pt")
    assert load_model("w.pt", arch="archs:build").training is False


class DropPath(nn.Module):
    """Drop-path written as timm writes it: identity in eval, a per-sample mask in train."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        mask = torch.floor(keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1),
                                             dtype=x.dtype, device=x.device))
        return x / keep * mask


def _stochastic_stack(width=16, depth=5):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU(), nn.Dropout(0.1), DropPath(0.3)]
    return nn.Sequential(*layers, nn.Linear(width, 4))


@pytest.mark.parametrize("captured_in", ["eval", "train"])
def test_drop_path_and_dropout_train_as_in_the_original(captured_in):
    model = _stochastic_stack().train(captured_in == "train")
    x = torch.randn(32, 16)
    result = add_skips(model, (x,))  # captured in train: main raised "a ressurgeon bug"
    assert len(result.skips) >= 2
    model.train(), result.module.train()
    torch.manual_seed(1)
    original = model(x)
    torch.manual_seed(1)
    rewritten = result.module(x)
    assert torch.equal(rewritten, original)  # the same masks, the gates at 0: bitwise
    assert not torch.equal(result.module(x), rewritten)  # and still random
    model.eval(), result.module.eval()
    torch.testing.assert_close(result.module(x), model(x), rtol=0, atol=PARITY)
    assert sum(type(m) is DropPath for m in result.module.modules()) == 5  # kept as modules
    assert result.mode_baked == ()


def test_a_torch_export_capture_names_the_layers_it_fixed():
    class Branchy(nn.Module):  # fx cannot follow the size branch: torch.export captures it
        def __init__(self):
            super().__init__()
            self.body = _stochastic_stack()

        def forward(self, x):
            y = self.body(x)
            return y * 2 if x.shape[0] > 64 else y

    result = add_skips(Branchy().eval(), (torch.randn(8, 16),))
    assert result.method == "export"
    assert result.mode_baked == tuple(f"body.{i}" for i in (3, 7, 11, 15, 19))
    assert result.to_dict()["mode_baked"] == list(result.mode_baked)


class Attention(nn.Module):
    """Attention as Hugging Face writes its dropout: functional, following self.training."""

    def __init__(self, width=16, p=0.2):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.p = p

    def forward(self, x):
        scores = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 4, dim=-1)
        scores = nn.functional.dropout(scores, p=self.p if self.training else 0.0,
                                       training=self.training)
        return self.o(scores @ self.v(x))


class Noisy(nn.Module):
    """A layer with weights and a train-only branch that is no dropout."""

    def __init__(self, width=16):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        y = self.fc(x)
        return y + 0.1 * torch.randn_like(y) if self.training else y


def test_functional_dropout_in_a_layer_with_weights_follows_the_mode():
    torch.manual_seed(0)
    model = nn.Sequential(Attention(), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), Attention(),
                          nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(4, 8, 16)
    result = add_skips(model, (x,))
    assert result.skips and result.mode_baked == ()
    assert sum(type(m) is nn.Dropout for m in result.module.modules()) == 2
    model.train(), result.module.train()
    torch.manual_seed(1)
    original = model(x)
    torch.manual_seed(1)
    assert torch.equal(result.module(x), original)
    assert not torch.equal(result.module(x), original)


def test_a_train_branch_that_cannot_be_kept_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), Noisy(), nn.ReLU(), nn.Linear(16, 16),
                          nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    result = add_skips(model, (torch.randn(4, 16),))
    assert result.mode_baked == ("2",)


class SdpaAttention(nn.Module):
    """Attention as GPT-2 writes it: a fused op whose dropout_p follows self.training."""

    def __init__(self, width=16, p=0.1):
        super().__init__()
        self.qkv, self.o, self.p = nn.Linear(width, 3 * width), nn.Linear(width, width), p

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        y = nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.p if self.training else 0.0)
        return self.o(y)


def test_a_torch_export_capture_names_every_weighted_layer_that_read_the_mode():
    """torch.export inlines a weighted layer's `if self.training`: the capture exports the
    other mode too and names each layer whose graph differs (GPT-2's attention: 4 of 4)."""
    class Branchy(nn.Module):  # fx cannot follow the size branch: torch.export captures it
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(*(SdpaAttention() for _ in range(3)))
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            y = self.head(self.blocks(x))
            return y * 2 if x.shape[0] > 64 else y

    torch.manual_seed(0)
    result = add_skips(Branchy().eval(), (torch.randn(2, 8, 16),))
    assert result.method == "export"
    assert result.mode_baked == ("blocks.0", "blocks.1", "blocks.2")
    assert result.parity.max_abs_diff <= PARITY
