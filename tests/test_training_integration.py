"""Where users train: torch.compile, DistributedDataParallel, state_dict, deepcopy, pickle.

The rewritten module is a plain ``torch.fx.GraphModule`` with ``Shortcut``
submodules; each test checks it behaves like any other nn.Module in the tool
a training script hands it to, with numbers, not just "it ran".
"""

import copy
import io
import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from models import build
from ressurgeon import Shortcut, SkipConfig, add_skips

# Tolerances, with the reason for each.
EXACT = 0.0             # the same module, copied or reloaded: bit-identical
COMPILED_ATOL = 1e-5    # inductor fuses and reorders float32 arithmetic
RANKS_ATOL = 1e-6       # DDP averages the same gradients on every rank (gloo all-reduce)


def rewritten(name="vgg", init="preserve"):
    model, inputs = build(name)
    result = add_skips(model, inputs, SkipConfig(init=init))
    assert result.skips
    with torch.no_grad():  # give the gates values a reload could get wrong
        for i, m in enumerate(m for m in result.module.modules() if isinstance(m, Shortcut)):
            if m.gate is not None:
                m.gate.fill_(0.25 * (i + 1))
    return result, inputs


def outputs(module, inputs):
    module.eval()
    with torch.no_grad():
        return module(*inputs)


def max_diff(a, b):
    leaves_a = torch.utils._pytree.tree_leaves(a)
    leaves_b = torch.utils._pytree.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    return max((x - y).abs().max().item() for x, y in zip(leaves_a, leaves_b))


# -- torch.compile ------------------------------------------------------------------

def _compile_and_step(backend):
    model, (x,) = build("mlp_widths")  # widths change: projections with weights to learn
    module = add_skips(model, (x,), SkipConfig(init="standard")).module.train()
    reference = copy.deepcopy(module)
    compiled = torch.compile(module, backend=backend)
    out = compiled(x)
    out.square().mean().backward()
    expected = reference(x)
    expected.square().mean().backward()
    assert (out - expected).abs().max().item() <= COMPILED_ATOL
    for (name, p), q in zip(module.named_parameters(), reference.parameters()):
        assert (p.grad - q.grad).abs().max().item() <= COMPILED_ATOL, name
    shortcut_grads = [p.grad for n, p in module.named_parameters() if n.startswith("skip_")]
    assert shortcut_grads and all(g.abs().sum() > 0 for g in shortcut_grads)


def test_torch_compile_traces_the_rewritten_module():
    # dynamo + AOTAutograd without a C++ compiler: fast, checks the graph capture
    torch._dynamo.reset()
    _compile_and_step("aot_eager")


@pytest.mark.slow  # the first inductor run compiles C++ (about 25 s on 2 cores, cold cache)
def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    _compile_and_step("inductor")


# -- DistributedDataParallel on gloo -----------------------------------------------

def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)  # the same model and shortcuts on every rank
        model, inputs = build("vgg")
        module = add_skips(model, inputs, SkipConfig(init="standard")).module.train()
        ddp = nn.parallel.DistributedDataParallel(module)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)
        loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in module.parameters()])
        opt.step()
        params = torch.cat([p.detach().flatten() for p in module.parameters()])
        torch.save({"grads": grads, "params": params, "loss": loss.item(),
                    "names": [n for n, _ in module.named_parameters()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow   # spawns two processes that import torch
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_ddp_two_processes_agree(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["loss"] != r1["loss"]  # the ranks really saw different data...
    assert (r0["grads"] - r1["grads"]).abs().max().item() <= RANKS_ATOL  # ...yet agree
    assert (r0["params"] - r1["params"]).abs().max().item() <= RANKS_ATOL
    assert r0["grads"].abs().sum() > 0
    assert any(n.startswith("skip_") and n.endswith("proj.weight") for n in r0["names"])


# -- state_dict, deepcopy, pickling --------------------------------------------------

@pytest.mark.parametrize("name", ["vgg", "vit_plain", "shape_branch"])
def test_state_dict_round_trip(name, tmp_path):
    result, inputs = rewritten(name)
    path = tmp_path / "weights.pt"
    torch.save(result.module.state_dict(), path)
    fresh = add_skips(build(name, seed=7)[0], inputs, plan=result.plan)  # other weights
    assert max_diff(outputs(fresh.module, inputs), outputs(result.module, inputs)) > 0
    missing, unexpected = fresh.module.load_state_dict(torch.load(path, weights_only=True))
    assert (missing, unexpected) == ([], [])
    assert max_diff(outputs(fresh.module, inputs), outputs(result.module, inputs)) == EXACT


@pytest.mark.parametrize("name", ["vgg", "vit_plain", "shape_branch"])
def test_deepcopy_is_independent(name):
    result, inputs = rewritten(name)
    twin = copy.deepcopy(result.module)
    assert max_diff(outputs(twin, inputs), outputs(result.module, inputs)) == EXACT
    assert not {id(p) for p in twin.parameters()} & {id(p) for p in result.module.parameters()}
    before = outputs(result.module, inputs)
    twin.train()
    opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    sum(t.square().mean() for t in torch.utils._pytree.tree_leaves(twin(*inputs))).backward()
    opt.step()
    assert max_diff(outputs(result.module, inputs), before) == EXACT  # the original is untouched
    assert max_diff(outputs(twin, inputs), before) > 0


@pytest.mark.parametrize("name", ["vgg", "vit_plain", "shape_branch"])
def test_pickle_and_torch_save_whole_module(name):
    result, inputs = rewritten(name)
    expected = outputs(result.module, inputs)
    again = pickle.loads(pickle.dumps(result.module))
    assert max_diff(outputs(again, inputs), expected) == EXACT
    assert sum(isinstance(m, Shortcut) for m in again.modules()) == len(result.skips)
    buffer = io.BytesIO()
    torch.save(result.module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # a whole module: only for your own files
    assert max_diff(outputs(loaded, inputs), expected) == EXACT
    loaded.train()  # and it still trains like the original would
    loss = sum(t.square().mean() for t in torch.utils._pytree.tree_leaves(loaded(*inputs)))
    loss.backward()
    assert all(m.gate.grad is not None for m in loaded.modules()
               if isinstance(m, Shortcut) and m.gate is not None)


# -- from the CLI's output to fine-tuning and back to deployment ---------------------------------

def test_the_cli_output_fine_tunes_then_folds_and_exports(example_models, tmp_path):
    from helpers import run_cli

    from ressurgeon import fold, load_model, save_model

    out = tmp_path / "vgg.skips.pt2"
    assert run_cli("add-skips", example_models["vgg"], "-o", out, "-q").exit_code == 0
    model = load_model(out)  # trainable: BatchNorm modules, Shortcut modules with gates
    gates = [m.gate for m in model.modules() if isinstance(m, Shortcut)]
    assert gates and all(g.item() == 0 for g in gates)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    assert all(g.item() != 0 for g in gates)  # the gates opened
    tuned = tmp_path / "tuned.pt2"
    save_model(model, tuned, (x,))
    folded = fold(load_model(tuned), (x,))
    assert {s.outcome for s in folded.skips} <= {"absorbed", "kept"}
    assert folded.max_abs_diff <= folded.tolerance
    result = run_cli("export", tuned, "--onnx", tmp_path / "t.onnx", "--fold", "--json")
    assert result.exit_code == 0, result.output


def test_every_entry_point_takes_what_torch_export_gave(tmp_path):
    from ressurgeon import export_onnx, find_spans, fold, gradient_flow

    model, (x,) = build("vgg")
    ep = torch.export.export(model.eval(), (x,))
    for given in (ep, ep.module()):
        result = add_skips(given, (x,))
        assert result.skips and result.parity.max_abs_diff == EXACT
        assert sum(s.chosen for s in find_spans(given, (x,))) == len(result.skips)
        assert fold(given, (x,)).max_abs_diff <= 1e-4
        assert gradient_flow(given, (x,)).skips == len(result.skips)
        report = export_onnx(given, tmp_path / "m.onnx", (x,))
        assert report.parity_checked and not report.dynamic_batch  # captured with a fixed batch
