"""Recurrent stacks: LSTM/GRU/RNN layers get shortcuts; a multi-layer module is split exactly."""

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from models import BiGRUStack, LSTMList, PackedLSTM
from ressurgeon import SkipConfig, ShapeError, TraceError, add_skips, find_spans, fold, \
    gate_report, load_model, save_model
from ressurgeon.config import TraceOptions
from ressurgeon.recurrent import RecurrentStack, split_recurrent
from ressurgeon.spans import Reason
from ressurgeon.trace import trace_model

# Tolerances, with the reason for each:
# add and highway with preserve add exact zeros (a zero gate times a finite S(x)): bitwise equal.
# concat widens weight_ih_l0 with zero columns: the sum is exact, but the matrix product over
# a wider K is blocked differently, so the last bit can move (2.9e-8 measured).
CONCAT_ATOL = 1e-6

# (builder, example shape, (batch, time) positions in that shape, chosen spans at span=1)
STACKS = {
    "lstm_list": (LSTMList, (2, 6, 4), (0, 1), 5),      # embed->rnns.0, then 4 between layers
    "packed_lstm": (PackedLSTM, (6, 2, 4), (1, 0), 4),  # embed->layers.0, then 3 inside the LSTM
    "bigru": (BiGRUStack, (2, 6, 4), (0, 1), 3),        # 2 identities, 1 projection (16 -> 24)
}


def build(name, seed=0):
    builder, shape, _, _ = STACKS[name]
    torch.manual_seed(seed)
    return builder().eval(), torch.randn(*shape)


def resized(name, batch, time):
    _, shape, (b, t), _ = STACKS[name]
    shape = list(shape)
    shape[b], shape[t] = batch, time
    return torch.randn(*shape)


@pytest.mark.parametrize("name", sorted(STACKS))
def test_shortcuts_found_between_recurrent_layers(name):
    model, x = build(name)
    spans = find_spans(model, (x,), SkipConfig(span=1))
    chosen = [s for s in spans if s.chosen]
    assert len(chosen) == STACKS[name][3]
    assert all(s.channel_axis == -1 for s in chosen)
    if name == "bigru":
        assert [s.kind for s in chosen] == ["identity", "projection", "identity"]
        assert chosen[1].src_shape[-1] == 16 and chosen[1].dst_shape[-1] == 24
    if name == "packed_lstm":  # the split module's layers are layers of their own
        assert [s.target_layer for s in chosen[1:]] == ["lstm.layers.1", "lstm.layers.2",
                                                        "lstm.layers.3"]


@pytest.mark.parametrize("join", ["add", "highway", "concat"])
@pytest.mark.parametrize("name", sorted(STACKS))
def test_preserve_is_exact_at_every_batch_and_length(name, join):
    model, x = build(name)
    result = add_skips(model, (x,), SkipConfig(span=1, join=join, init="preserve"))
    assert len(result.skips) >= 2
    atol = CONCAT_ATOL if join == "concat" else 0.0
    assert result.parity.max_abs_diff <= atol
    for batch, time in ((1, 6), (5, 6), (2, 3), (3, 11)):
        y = resized(name, batch, time)
        got, want = result.module(y), model(y)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


def test_concat_widens_input_weights_of_both_directions_with_zero_columns():
    model, x = build("bigru")
    result = add_skips(model, (x,), SkipConfig(span=1, join="concat", init="preserve"))
    modules = dict(result.module.named_modules())
    widened = [s for s in result.skips if isinstance(modules[s.consumer_layer], nn.GRU)]
    # non-overlapping spans of one layer: the features join the input of grus.2 and grus.3
    assert [s.consumer_layer for s in widened] == ["grus.2", "grus.3"]
    for skip in widened:
        gru = modules[skip.consumer_layer]
        old = dict(model.named_modules())[skip.consumer_layer]
        for name in ("weight_ih_l0", "weight_ih_l0_reverse"):
            w, w0 = getattr(gru, name), getattr(old, name)
            assert w.shape[1] == w0.shape[1] + skip.src_shape[-1]
            assert torch.equal(w[:, :w0.shape[1]], w0)
            assert torch.count_nonzero(w[:, w0.shape[1]:]) == 0
        assert skip.params == 2 * gru.weight_ih_l0.shape[0] * skip.src_shape[-1]


def test_concat_into_an_unsplit_multilayer_module_is_refused_with_a_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mid = nn.Linear(4, 8), nn.Linear(8, 8)
            self.lstm = nn.LSTM(8, 8, num_layers=2)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.lstm(torch.relu(self.mid(self.embed(x))))[0])

    model, x = Net().eval(), torch.randn(6, 2, 4)
    spans = find_spans(model, (x,), SkipConfig(span=1, join="concat"),
                       trace=TraceOptions(split_recurrent=False))
    into_lstm = [s for s in spans if s.consumer_layer == "lstm"]
    assert into_lstm and all(s.reason is Reason.CONSUMER for s in into_lstm)
    assert "multi-layer" in Reason.CONSUMER.text


@pytest.mark.parametrize("name", sorted(STACKS))
def test_standard_shortcuts_carry_gradient_to_the_first_recurrent_layer(name):
    model, x = build(name)
    result = add_skips(model, (x,), SkipConfig(span=1, init="standard"))

    def first_grad(module):
        module.zero_grad()
        module(x).pow(2).mean().backward()
        weight = next(p for n, p in module.named_parameters() if n.endswith("weight_ih_l0"))
        return weight.grad.norm().item()

    plain, skipped = first_grad(model), first_grad(result.module)
    # measured (seed 0): lstm_list 2.2e-4 -> 0.13, packed_lstm 4.6e-4 -> 0.09, bigru 5e-3 -> 0.05
    assert skipped > 0 and skipped > 5 * plain


def test_caller_state_and_final_states_keep_the_layers_a_chain():
    """h0 from the caller is a side input, not a path; h_n gathers states, it joins no branches."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(8, 8, num_layers=3)
            self.fc = nn.Linear(8, 3)

        def forward(self, x, h0):
            out, h = self.gru(x, h0)
            return self.fc(out), h

    torch.manual_seed(0)
    model, x, h0 = Net().eval(), torch.randn(5, 2, 8), torch.randn(3, 2, 8)
    result = add_skips(model, (x, h0), SkipConfig(span=1))
    assert [(s.source_layer, s.target_layer) for s in result.skips] == [
        ("gru.layers.0", "gru.layers.1"), ("gru.layers.1", "gru.layers.2")]
    assert result.residuals == [] and result.parity.max_abs_diff == 0.0


def _flat(value):
    return torch.utils._pytree.tree_leaves(value)


def _same(a, b):
    fa, fb = _flat(a), _flat(b)
    return len(fa) == len(fb) and all(torch.equal(p.data if hasattr(p, "batch_sizes") else p,
                                                  q.data if hasattr(q, "batch_sizes") else q)
                                      for p, q in zip(fa, fb))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_split_is_bitwise_exact_in_eval_and_seeded_train(cls, batch_first):
    torch.manual_seed(0)
    fused = cls(5, 6, num_layers=3, bidirectional=True, dropout=0.3, batch_first=batch_first)
    stack = RecurrentStack.from_packed(fused)
    assert [p.input_size for p in stack.layers] == [5, 12, 12]
    assert stack.layers[2].weight_hh_l0_reverse is fused.weight_hh_l2_reverse  # shared, renamed
    x = torch.randn(2, 7, 5) if batch_first else torch.randn(7, 2, 5)
    h0, c0 = torch.randn(6, 2, 6), torch.randn(6, 2, 6)
    state = (h0, c0) if cls is nn.LSTM else h0
    packed = pack_padded_sequence(x, torch.tensor([7, 4]), batch_first=batch_first,
                                  enforce_sorted=False)
    for train in (False, True):
        fused.train(train)
        stack.train(train)
        for args in ((x,), (x, state), (packed, state)):
            torch.manual_seed(1)
            want = fused(*args)
            torch.manual_seed(1)
            got = stack(*args)
            assert _same(got, want), (train, len(args))
    # the traced graph of a model holding the fused module is exact too, seeded train included
    model = nn.Sequential(fused)
    gm = trace_model(model, (x,))
    assert isinstance(gm.get_submodule("0.layers.2"), cls)
    for train in (False, True):
        model.train(train)
        gm.train(train)
        torch.manual_seed(2)
        want = model(x)
        torch.manual_seed(2)
        assert _same(gm(x), want)


def test_split_keeps_lstm_projections_and_draws_no_random_numbers():
    torch.manual_seed(0)
    fused = nn.LSTM(4, 6, num_layers=2, proj_size=3, bidirectional=True).eval()
    state = torch.random.get_rng_state()
    net = split_recurrent(nn.Sequential(fused))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert net[0].layers[1].weight_hr_l0 is fused.weight_hr_l1
    x = torch.randn(5, 2, 4)
    assert _same(net(x), fused(x))


def test_pt2_of_the_result_round_trips_and_refuses_other_lengths(tmp_path):
    model, x = build("packed_lstm")
    result = add_skips(model, (x,), SkipConfig(span=1, init="standard"))
    path = save_model(result.module, tmp_path / "lstm.pt2", (x,))
    loaded = load_model(path)
    assert torch.equal(loaded(x), result.module(x))
    # torch.export fixes the time dim of aten.lstm: another length is refused, never wrong.
    # Sequence-first, that is dim 0, where the batch would be symbolic: the capture is static.
    with pytest.raises(ShapeError, match=r"size 9 at dim 0.* with size 6 .*aten\.lstm") as info:
        loaded(resized("packed_lstm", 2, 9))
    assert "--dynamic" not in str(info.value)  # no option frees that dim in torch.export
    with pytest.raises(ShapeError, match="size 5 at dim 1"):
        loaded(resized("packed_lstm", 5, 6))


def test_recurrent_layers_of_a_pt2_input_join_by_add_and_highway(tmp_path):
    """There they are aten.lstm calls on flat weights: layers for add and highway, at the
    captured length; no module for concat to widen."""
    model, x = build("lstm_list")
    loaded = load_model(save_model(model, tmp_path / "plain.pt2", (x,)))
    for join in ("add", "highway"):
        result = add_skips(loaded, (x,), SkipConfig(span=1, join=join))
        assert len(result.skips) == 5 and result.parity.max_abs_diff == 0.0
        assert torch.equal(result.module(x), model(x))
    with pytest.raises(ShapeError, match=r"size 9 at dim 1.*aten\.lstm"):
        result.module(resized("lstm_list", 2, 9))
    spans = find_spans(loaded, (x,), SkipConfig(span=1, join="concat"))
    assert sum(s.reason is Reason.CONSUMER for s in spans) == 4  # rnns.1-4 read no module


def test_packed_sequences_are_refused_naming_the_call():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 8, num_layers=2, batch_first=True)

        def forward(self, x, lengths):
            out, _ = self.lstm(pack_padded_sequence(x, lengths, batch_first=True,
                                                    enforce_sorted=False))
            return out.data

    with pytest.raises(TraceError, match="pack_padded_sequence") as info:
        add_skips(Packed(), (torch.randn(2, 5, 4), torch.tensor([5, 3])))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("init", ["rezero", "morph"])
def test_other_inits_join_recurrent_layers(init):
    model, x = build("lstm_list")
    result = add_skips(model, (x,), SkipConfig(span=1, init=init))
    assert len(result.skips) == 5 and all(s.init == init for s in result.skips)
    y = resized("lstm_list", 3, 9)
    out = result.module(y)
    assert torch.isfinite(out).all()
    if init == "morph":  # exact at insertion, like preserve
        assert torch.equal(out, model(y))


def test_preserve_keeps_the_inter_layer_dropout_in_train_mode():
    torch.manual_seed(0)
    model, x = PackedLSTM(dropout=0.3).train(), torch.randn(6, 2, 4)
    result = add_skips(model, (x,), SkipConfig(span=1))
    assert len(result.skips) == 4
    result.module.train()
    torch.manual_seed(3)
    want = model(x)
    torch.manual_seed(3)
    assert torch.equal(result.module(x), want)
    torch.manual_seed(4)
    assert not torch.equal(result.module(x), want)  # the dropout does act: other draws differ


def test_models_that_read_the_fused_modules_attributes_still_trace():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 8, num_layers=3, bidirectional=True, batch_first=True)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            self.lstm.flatten_parameters()
            rows = self.lstm.num_layers * (2 if self.lstm.bidirectional else 1)
            h0 = torch.zeros(rows, x.size(0), self.lstm.hidden_size)
            out, _ = self.lstm(x, (h0, torch.zeros_like(h0)))
            return self.head(out)

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 5, 4)
    result = add_skips(model, (x,), SkipConfig(span=1))
    assert len(result.skips) == 2 and result.parity.max_abs_diff == 0.0
    y = torch.randn(3, 8, 4)
    assert torch.equal(result.module(y), model(y))


@pytest.mark.parametrize("join", ["add", "highway", "concat"])
def test_fold_removes_closed_recurrent_shortcuts(join):
    model, x = build("bigru")
    result = add_skips(model, (x,), SkipConfig(span=1, join=join))
    gates = gate_report(result.module).gates
    assert gates and all(g.value == 0.0 for g in gates)  # concat: its new weight_ih columns
    folded = fold(result.module, (x,)).module
    count = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in folded.parameters()) == count  # narrowed back / removed
    assert torch.equal(folded(x), model(x))


def test_a_state_from_another_stack_does_not_widen_a_residual():
    """A decoder fed the encoder's state: its residual covers the decoder only, so the
    encoder's layers still take shortcuts (state edges are no data path for regions either)."""

    class EncDec(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec, self.fc = nn.LSTM(8, 8, num_layers=3), nn.LSTM(8, 8), nn.Linear(8, 3)

        def forward(self, x, y):
            _, (h, c) = self.enc(x)
            return self.fc(y + self.dec(y, (h[-1:], c[-1:]))[0])

    torch.manual_seed(0)
    model = EncDec().eval()
    result = add_skips(model, (torch.randn(5, 2, 8), torch.randn(4, 2, 8)), SkipConfig(span=1))
    assert [r.layers for r in result.residuals] == [("dec",)]
    assert [(s.source_layer, s.target_layer) for s in result.skips] == [
        ("enc.layers.0", "enc.layers.1")]
