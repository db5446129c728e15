"""Real architectures in miniature: branches, existing residuals, channels-last, 1-D/3-D, dtypes.

Each family in ``models.ARCHITECTURES`` mimics the structure of a common
architecture. For every one: the pass runs, preserve mode keeps the outputs,
and the numbers of shortcuts, existing residuals and rejections are the ones
the structure implies (the comments in EXPECTED say why).
"""

from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import ARCHITECTURES, DataBranchNet, build, deep_mlp
from ressurgeon.verify import PARITY_ATOL
from ressurgeon._fx import capture_info, info
from ressurgeon import Reason, ShapeError, Shortcut, SkipConfig, TraceOptions, add_skips, trace_model
from ressurgeon.spans import analyze_graph, select_spans
from ressurgeon.verify import PARITY_ATOL

# Tolerances, with the reason for each.
PRESERVE_ATOL = PARITY_ATOL[torch.float32]  # preserve mode equals the original (fp32, eval)
CHANGED_MIN = 1e-3     # standard init must move outputs by far more than rounding

# name -> (shortcuts inserted, existing residuals found, rejections by reason), span 2.
EXPECTED = {
    # plain CNNs: shortcuts across the pooling stages, strided 1x1 projections
    "vgg": (2, 0, {"head": 1, "overlaps": 2}),
    # the Linear classifier cannot join the conv features (rank differs)
    # the second skip reads the classifier's flattened input (a Linear projection)
    "alexnet": (2, 0, {"head": 1, "overlaps": 1, "shape-mismatch": 1}),
    # towers of different depths joined by a concat: no residual; shortcuts inside towers
    "inception": (5, 0, {"head": 1, "overlaps": 11}),
    # every dense layer reads the block input through a concat: all dense already
    "densenet": (0, 5, {"existing-residual": 12, "head": 1}),
    # two inverted residuals are left alone; the three plain blocks get shortcuts;
    # the SE gates of the plain block are 1x1 tensors and never span ends
    "mobilenet": (4, 2, {"existing-residual": 16, "head": 1, "overlaps": 3, "squeezed": 2}),
    # identity, projection, identity: three residuals, nothing to add
    "resnet": (0, 3, {"existing-residual": 8, "head": 1}),
    "vit": (0, 6, {"existing-residual": 16, "head": 1}),
    # the same transformer without its adds gets the adds back, around attention and MLP
    "vit_plain": (5, 0, {"head": 1, "overlaps": 5, "shape-mismatch": 1}),
    "convnext": (0, 4, {"existing-residual": 15, "head": 1}),
    # depthwise conv is channels-first, the MLP channels-last: most spans mix the two
    "convnext_plain": (2, 0, {"head": 1, "layout-mismatch": 10}),
    # window attention is an opaque torch.fx.wrap'd function: its residual is still found
    "swin": (0, 8, {"existing-residual": 16, "head": 1}),
    "channels_last_mlp": (2, 0, {"head": 1, "layout-mismatch": 1, "overlaps": 1}),
    "audio_1d": (2, 0, {"head": 1, "overlaps": 2}),
    "video_3d": (2, 0, {"head": 1, "overlaps": 1}),
    # two heads, and the concat of two inputs is a block (no residual: no shared fork)
    "two_in_two_out": (2, 0, {"head": 2, "overlaps": 1}),
}


def rejections(spans):
    return dict(Counter(s.reason.value for s in spans if not s.chosen))


def test_every_architecture_has_an_expectation():
    assert set(EXPECTED) == set(ARCHITECTURES)


@pytest.mark.parametrize("join", ["highway", "concat"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_join_preserves_every_architecture(name, join):
    """The other residual families, exact at insertion on every family of the matrix."""
    model, inputs = build(name)
    result = add_skips(model, inputs, SkipConfig(join=join))
    assert result.parity.max_abs_diff <= PRESERVE_ATOL
    for s in result.spans:
        assert s.chosen == (s.reason is None)
    assert all(s.join == join for s in result.skips)
    if join == "concat":  # every inserted concat widened its consumer by the source's channels
        for s in result.skips:
            assert s.kind == "concat" and s.consumer_layer and s.params > 0


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture(name):
    model, inputs = build(name)
    result = add_skips(model, inputs)
    skips, residuals, rejected = EXPECTED[name]
    assert (len(result.skips), len(result.residuals), rejections(result.spans)) == (
        skips, residuals, rejected)
    assert result.parity.max_abs_diff <= PRESERVE_ATOL
    for s in result.spans:
        assert s.chosen == (s.reason is None)
        assert (s.reason is Reason.EXISTING) == (s.residual is not None)
    # the rewritten module runs on another batch size and returns the same structure
    other = tuple(torch.randn(3, *t.shape[1:]) for t in inputs)
    with torch.no_grad():
        got, want = result.module(*other), model(*other)
    torch.testing.assert_close(got, want, rtol=0, atol=PRESERVE_ATOL)
    if skips:  # negative control: with standard init the shortcuts change the outputs
        standard = add_skips(model, inputs, SkipConfig(init="standard"))
        assert standard.parity.max_abs_diff > CHANGED_MIN


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_candidates_stay_one_per_unit(name):
    # At most one candidate per layer or block, never one per pair of tensors
    # (an all-pairs search finds thousands in MaxViT): the report stays readable.
    model, inputs = build(name)
    gm = trace_model(model, inputs)
    analysis = analyze_graph(gm)
    spans = select_spans(gm, SkipConfig(span=1))
    assert len(spans) <= len(analysis.layers) + len(analysis.blocks)


def test_candidate_count_is_linear_in_depth():
    gm = trace_model(deep_mlp(300, 8), (torch.randn(2, 8),))
    assert len(select_spans(gm, SkipConfig(span=1))) == 300  # 301 layers, the first has no parent


def test_resnet_residuals_are_reported_and_never_doubled():
    model, inputs = build("resnet")
    result = add_skips(model, inputs)
    assert [(r.name, r.kind, r.op) for r in result.residuals] == [
        ("layer1.add", "identity", "add"),
        ("layer2.0.add_1", "projection", "add"),   # the 1x1 downsample branch
        ("layer2.1.add_2", "identity", "add")]
    first = result.residuals[0]
    assert first.layers == ("layer1.conv1", "layer1.conv2") and first.shape == (2, 16, 8, 8)
    assert set(result.residuals[1].layers) == {
        "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"}
    # a span of 2 around two residual blocks would run parallel to both of them
    parallel = find(result.spans, "conv1", "layer2.0.add_1")
    assert parallel and parallel[0].layers == ("layer1.add", "layer2.0.add_1")
    assert parallel[0].reason is Reason.EXISTING and parallel[0].residual == "layer1.add"
    assert "existing_residuals" in result.to_dict()
    # span 1: the candidate from the stem to the first block's sum is exactly parallel to it
    spans = add_skips(model, inputs, SkipConfig(span=1)).spans
    twin = find(spans, "conv1", "layer1.add")
    assert twin and twin[0].reason is Reason.EXISTING and twin[0].residual == "layer1.add"


def find(spans, source, target):
    return [s for s in spans if (s.source_layer, s.target_layer) == (source, target)]


@pytest.mark.parametrize("name", ["inception", "mobilenet", "vit_plain"])
def test_a_second_pass_sees_the_first_passes_shortcuts(name):
    model, inputs = build(name)
    first = add_skips(model, inputs)
    second = add_skips(first.module, inputs)
    assert second.skips == [] and second.parity.max_abs_diff == 0.0
    # each inserted shortcut is now an existing residual, next to those the model had
    assert {r.target for r in second.residuals} == (
        {s.name for s in first.skips} | {r.target for r in first.residuals})


def test_mobilenet_shortcuts_stay_out_of_inverted_residuals():
    model, inputs = build("mobilenet")
    result = add_skips(model, inputs)
    inside = {lay for r in result.residuals for lay in r.layers}
    for s in result.spans:
        if s.chosen:
            assert not inside.intersection(s.layers)
    squeezed = [s for s in result.spans if s.reason is Reason.SQUEEZED]
    assert {s.target_layer for s in squeezed} == {"blocks.3.conv.2.fc1", "blocks.3.conv.2.fc2"}
    assert all(s.dst_shape[2:] == (1, 1) for s in squeezed)


def test_densenet_concatenation_counts_as_existing_shortcut():
    model, inputs = build("densenet")
    residuals = add_skips(model, inputs).residuals
    assert {r.op for r in residuals} == {"cat"} and {r.kind for r in residuals} == {"identity"}


def test_inception_module_is_one_unit():
    model, inputs = build("inception")
    gm = trace_model(model, inputs)
    blocks = analyze_graph(gm).blocks
    assert [(b.name, b.kind) for b in blocks] == [("mix1.cat", "block"), ("mix2.cat_1", "block")]
    assert len(blocks[0].covers) == 7  # every conv of the four towers
    spans = add_skips(model, inputs, SkipConfig(span=3)).spans
    # a span that crosses a module counts it once: mix1.cat's tree parent is the stem
    around = find(spans, "stem.0.conv", "mix2.b1.conv")
    assert around and around[0].layers == ("stem.1.conv", "mix1.cat", "mix2.b1.conv")


@pytest.mark.parametrize("name", ["convnext_plain", "channels_last_mlp"])
def test_channels_last_spans_get_linear_projections(name):
    model, inputs = build(name)
    result = add_skips(model, inputs)
    for skip in result.skips:
        assert len(skip.dst_shape) == 4 and skip.src_shape[1:3] == skip.dst_shape[1:3]
        proj = result.module.get_submodule(skip.name).proj
        assert isinstance(proj, nn.Linear)
        assert (proj.in_features, proj.out_features) == (skip.src_shape[-1], skip.dst_shape[-1])
    layout = [s for s in result.spans if s.reason is Reason.LAYOUT]
    assert layout and all(len(s.src_shape) == len(s.dst_shape) == 4 for s in layout)


@pytest.mark.parametrize("name,conv", [("audio_1d", nn.Conv1d), ("video_3d", nn.Conv3d)])
def test_1d_and_3d_convs_get_matching_projections(name, conv):
    model, inputs = build(name)
    result = add_skips(model, inputs)
    projected = [s for s in result.skips if s.kind == "projection"]
    assert projected and any(s.stride == 2 for s in projected)
    for s in projected:
        assert isinstance(result.module.get_submodule(s.name).proj, conv)


def test_swin_opaque_attention_is_kept_and_its_residual_found():
    model, inputs = build("swin")
    gm = trace_model(model, inputs)
    calls = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "window_attention"]
    assert len(calls) == 4  # opaque: one call per block, nothing traced inside
    names = [r.name for r in add_skips(model, inputs).residuals]
    assert names[:2] == ["stage1.0.add", "stage1.0.add_1"]  # attention, then MLP


def test_several_inputs_and_a_dict_of_outputs():
    model, inputs = build("two_in_two_out")
    result = add_skips(model, inputs, SkipConfig(init="standard"))
    out = result.module(*inputs)
    assert set(out) == {"logits", "embedding"} and result.parity.outputs == 2
    assert {(s.source_layer, s.target_layer) for s in result.skips} == {
        ("image.0", "image.4"), ("cat", "trunk.2")}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["vgg", "mobilenet", "vit_plain", "convnext_plain"])
def test_half_precision_models(name, dtype):
    model, inputs = build(name)
    model = model.to(dtype)
    inputs = tuple(t.to(dtype) for t in inputs)
    result = add_skips(model, inputs)
    assert result.skips
    assert result.parity.tolerance == PARITY_ATOL[dtype]
    assert result.parity.max_abs_diff <= PARITY_ATOL[dtype]
    for skip in result.skips:
        assert {p.dtype for p in result.module.get_submodule(skip.name).parameters()} == {dtype}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["vgg", "mobilenet", "vit_plain", "video_3d"])
def test_cuda_models(name, dtype):
    model, inputs = build(name)
    model = model.to("cuda", dtype)
    inputs = tuple(t.to("cuda", dtype) for t in inputs)
    result = add_skips(model, inputs)
    assert result.skips and result.parity.ok
    assert {p.device.type for p in result.module.parameters()} == {"cuda"}
    result.module.train()
    sum(t.float().sum() for t in [result.module(*inputs)]).backward()
    assert all(m.gate.grad is not None for m in result.module.modules()
               if isinstance(m, Shortcut) and m.gate is not None)


# -- tracing robustness: fake shapes, meta models, concrete args, the export fallback ------------

def node_meta(gm):
    return [(n.name, info(n).shape, info(n).dtype,
             info(n).device) for n in gm.graph.nodes]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES) + ["shape_branch", "transformer"])
def test_fake_propagation_records_the_same_shapes(name):
    model, inputs = build(name)
    real = trace_model(model, inputs)
    fake = trace_model(model, inputs, TraceOptions(fake=True))
    assert node_meta(fake) == node_meta(real)
    assert capture_info(fake).method == capture_info(real).method
    config = SkipConfig(span=2)
    assert select_spans(fake, config) == select_spans(real, config)


def test_fake_propagation_needs_no_memory_for_huge_inputs():
    model, _ = build("vgg")
    huge = torch.empty(2 ** 16, 3, 512, 512, device="meta")  # 200 GB as real float32
    gm = trace_model(model, (huge,), TraceOptions(fake=True))
    first_conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert info(first_conv).shape == (2 ** 16, 8, 512, 512)
    assert info(first_conv).device == torch.device("cpu")  # the model's device
    spans = select_spans(gm, SkipConfig())
    assert [s.dst_shape for s in spans if s.chosen][0] == (2 ** 16, 16, 256, 256)


def test_meta_device_model_is_planned_without_weights():
    model, inputs = build("mobilenet")
    with torch.device("meta"):
        torch.manual_seed(0)
        empty = ARCHITECTURES["mobilenet"][0]().eval()
    meta_inputs = tuple(t.to("meta") for t in inputs)
    planned = select_spans(trace_model(empty, meta_inputs), SkipConfig())
    real = select_spans(trace_model(model, inputs), SkipConfig())
    assert [(s.source, s.target, s.kind, s.reason) for s in planned] == [
        (s.source, s.target, s.kind, s.reason) for s in real]


class WithFlag(nn.Module):
    """A non-tensor forward argument: fx needs it concrete to trace the branch."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
                                  nn.Linear(4, 4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x, features_only=False):
        x = self.body(x)
        return x if features_only else self.head(x)


def test_concrete_args_bake_a_flag_into_the_graph():
    model, x = WithFlag().eval(), torch.randn(3, 4)
    gm = trace_model(model, (x,), TraceOptions(concrete_args={"features_only": True}))
    assert capture_info(gm).method == "fx"
    assert not any(n.target == "head" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x, features_only=True), rtol=0, atol=0)
    result = add_skips(model, (x,), trace=TraceOptions(concrete_args={"features_only": True}))
    assert result.skips and result.module(x).shape == (3, 4)


class CheckedWithFlag(WithFlag):
    """The flag model with a Python check on a shape: fx cannot trace it, torch.export can."""

    def forward(self, x, features_only=False):
        if x.shape[1] != 4:
            raise ValueError("4 features expected")
        return super().forward(x, features_only)


def test_the_export_fallback_bakes_in_concrete_args_too():
    model, x = CheckedWithFlag().eval(), torch.randn(3, 4)
    gm = trace_model(model, (x,), TraceOptions(concrete_args={"features_only": True}))
    assert capture_info(gm).method == "export"
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    torch.testing.assert_close(gm(x), model(x, features_only=True), rtol=0, atol=0)
    result = add_skips(model, (x,), trace=TraceOptions(concrete_args={"features_only": True}))
    assert result.parity.ok and result.module(x).shape == (3, 4)


class FlattenBranch(nn.Module):
    """fx cannot trace the shape test; export bakes ``x.size(0)`` unless the batch is dynamic."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(*[m for _ in range(3)
                                     for m in (nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())])
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = F.avg_pool2d(x, 2)
        x = self.convs(x)
        return self.fc(x.view(x.size(0), -1))


def test_export_fallback_keeps_the_batch_dynamic():
    torch.manual_seed(0)
    model, x = FlattenBranch().eval(), torch.randn(2, 4, 8, 8)
    result = add_skips(model, (x,), SkipConfig(init="standard"))
    assert result.method == "export" and result.skips
    for batch in (1, 5):
        assert result.module(torch.randn(batch, 4, 8, 8)).shape == (batch, 2)
    static = trace_model(model, (x,), TraceOptions(dynamic_batch=False))
    with pytest.raises(ShapeError, match="captured by torch.export with size 2 there"):
        static(torch.randn(5, 4, 8, 8))  # view(2, -1) was baked in: refused, not wrong


class Gate(DataBranchNet):
    """Data-dependent Python control flow deep inside a model (named for the error text)."""


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Gate(), nn.Linear(4, 4), nn.ReLU(),
                                  nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_trace_errors_name_the_module_and_the_line():
    from ressurgeon import TraceError

    with pytest.raises(TraceError) as info:
        trace_model(Nested(), (torch.randn(2, 4),))
    text = str(info.value)
    assert "in module 'body.2' (Gate)" in text
    assert "models.py" in text and "if x.sum() > 0:" in text  # where the branch is written
    assert "--leaf 'body.2'" in text
    # ...and the leaf it suggests makes the model traceable, with shortcuts around the gate
    result = add_skips(Nested().eval(), (torch.randn(2, 4),), trace=TraceOptions(leaf_modules=("body.2",)))
    assert result.method == "fx" and result.skips


def test_timm_notrace_registrations_are_default_leaves(monkeypatch):
    import sys
    import types

    from ressurgeon.trace import default_leaf_modules

    fx_registry = types.SimpleNamespace(get_notrace_modules=lambda: [Gate],
                                        get_notrace_functions=lambda: [])
    layers = types.ModuleType("timm.layers")
    layers._fx = fx_registry
    timm = types.ModuleType("timm")
    timm.layers = layers
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.layers", layers)
    monkeypatch.setitem(sys.modules, "timm.layers._fx", fx_registry)
    assert default_leaf_modules() == ((Gate,), ())
    gm = trace_model(Nested().eval(), (torch.randn(2, 4),))
    assert capture_info(gm).method == "fx"
    assert any(n.op == "call_module" and n.target == "body.2" for n in gm.graph.nodes)
