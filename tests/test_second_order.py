"""Second-order searches on ops without a double backward (issue 9): equivalent formulations in the architecture step
only, a refusal naming the op where none exists, and trainer settings refused at fit start.

The spaces are written here, small enough to show the cause: attention (``nn.MultiheadAttention`` and
``F.scaled_dot_product_attention``, whose fused CPU kernel has no double backward), ``nn.Hardsigmoid`` (no double
backward) and ``nn.Hardswish`` (has one), and two ops without a double backward and without a substitute.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.nas.nn.pytorch import LayerChoice, ModelSpace
from torch.autograd.function import once_differentiable
from torch.utils.data import TensorDataset

from nni_idarts import IDartsStrategy, hypergradient, second_order
from nni_idarts.second_order import SecondOrderUnsupportedError, double_backward_formulations
from nni_idarts.search import search
from search_probes import StepRecorder

QUIET = {'enable_progress_bar': False, 'enable_model_summary': False}
SEQ, DIM, N_SAMPLES, BATCH = 4, 8, 8, 4


class SelfAttention(nn.Module):
    """q, k, v projections and F.scaled_dot_product_attention (the fused kernel on CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v)


class MultiheadSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(DIM, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # need_weights=False is the path through F.scaled_dot_product_attention (need_weights=True is plain matmuls).
        return self.attention(x, x, x, need_weights=False)[0]


class HardGate(nn.Module):
    """A squeeze-excite style gate, as in MobileNetV3: x * hardsigmoid(linear(x))."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(DIM, DIM)
        self.gate = nn.Hardsigmoid(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.linear(x))


class ExplicitHardGate(HardGate):
    """HardGate written with the formulation the architecture step substitutes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (F.relu6(self.linear(x) + 3) / 6)


class SequenceSpace(ModelSpace):
    """Sequences (SEQ x DIM) -> embedding -> one LayerChoice over ``candidates`` -> mean over the sequence -> 10 classes."""

    def __init__(self, candidates: dict[str, nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Linear(DIM, DIM)
        self.op = LayerChoice(candidates, label='op')
        self.head = nn.Linear(DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        return self.head((h + self.op(h)).mean(1))


def attention_space() -> SequenceSpace:
    return SequenceSpace({'sdpa': SelfAttention(), 'mha': MultiheadSelfAttention(), 'linear': nn.Linear(DIM, DIM)})


def hard_activation_space(gate: type[HardGate] = HardGate) -> SequenceSpace:
    return SequenceSpace({'hardsigmoid_gate': gate(), 'hardsigmoid_inplace': nn.Sequential(
        nn.Linear(DIM, DIM), nn.Hardsigmoid(inplace=True)), 'hardswish': nn.Sequential(nn.Linear(DIM, DIM), nn.Hardswish())})


def sequences(seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(N_SAMPLES, SEQ, DIM, generator=generator),
                         torch.randint(0, 10, (N_SAMPLES,), generator=generator))


def run(space: ModelSpace, mode: str, recorder: StepRecorder | None = None, **options):
    strategy = IDartsStrategy(hypergradient=mode, inner_steps=1, arc_learning_rate=0.05, **options)
    callbacks = [recorder] if recorder is not None else []
    result = search(space, sequences(0), sequences(1), strategy, epochs=1, batch_size=BATCH, learning_rate=0.1,
                    trainer_kwargs={**QUIET, 'callbacks': callbacks})
    return result, strategy


def alphas_of(strategy) -> list[torch.Tensor]:
    return [a.detach().clone() for a in strategy.oneshot_module.arch_parameters()]


@contextlib.contextmanager
def no_formulations(enabled: bool = True):
    yield


# ----- the formulations: same values, a double backward, only inside the context -----

def test_formulations_give_the_original_values_and_first_derivatives():
    torch.manual_seed(0)
    x = (torch.randn(4000) * 4).requires_grad_()  # float32, the dtype of the searches
    # (F.hardsigmoid is looked up at call time, as nn.Hardsigmoid does: the context rebinds that name.)
    for function in (lambda t: F.hardsigmoid(t), nn.Hardsigmoid(), lambda t: F.hardsigmoid(t.clone(), inplace=True)):
        original = function(x)
        (grad_original,) = torch.autograd.grad(original.sum(), x)
        with double_backward_formulations():
            substituted = function(x)
            (grad_substituted,) = torch.autograd.grad(substituted.sum(), x, create_graph=True)
            (second,) = torch.autograd.grad(grad_substituted.sum(), x)  # exists now
        assert torch.equal(original, substituted)
        # PyTorch's backward multiplies by a rounded 1/6, the formulation divides by 6: equal up to one rounding.
        # (In float64 PyTorch's constant is float32's 1/6, off by 3e-8; the formulation's is exact.)
        torch.testing.assert_close(grad_substituted.detach(), grad_original, rtol=1.2e-7, atol=0)
        assert torch.equal(second, torch.zeros_like(second))  # piecewise linear
    assert torch.equal(F.hardsigmoid(x), F.relu6(x + 3) / 6)

    torch.manual_seed(0)
    space = attention_space()
    inputs = torch.randn(3, SEQ, DIM)
    for candidate in ('sdpa', 'mha'):
        op = space.op[candidate]
        original = op(inputs)
        with double_backward_formulations():
            substituted = op(inputs)
        torch.testing.assert_close(substituted, original, rtol=1e-5, atol=1e-6)  # another kernel, same attention


def test_outside_the_context_the_original_kernels_run():
    x = torch.randn(5, requires_grad=True)
    original = F.hardsigmoid
    with double_backward_formulations():
        assert F.hardsigmoid is not original
    assert F.hardsigmoid is original
    (grad,) = torch.autograd.grad(F.hardsigmoid(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='derivative for aten::hardsigmoid_backward is not implemented'):
        torch.autograd.grad(grad.sum(), x)
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
    with double_backward_formulations():
        assert not torch.backends.cuda.flash_sdp_enabled()
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()) == flags


def test_hardswish_has_a_double_backward_of_its_own():
    x = (torch.randn(1000, dtype=torch.float64) * 4).requires_grad_()
    (grad,) = torch.autograd.grad(F.hardswish(x).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    expected = torch.where(x.abs() < 3, torch.full_like(x, 1 / 3), torch.zeros_like(x))
    torch.testing.assert_close(second, expected)


def test_hypergradient_with_the_substitution_equals_the_explicitly_written_model():
    torch.manual_seed(0)
    strategy = IDartsStrategy()
    original = strategy.mutate_model(SequenceSpace({'gate': HardGate(), 'linear': nn.Linear(DIM, DIM)}))
    torch.manual_seed(0)
    explicit_strategy = IDartsStrategy()
    explicit = explicit_strategy.mutate_model(SequenceSpace({'gate': ExplicitHardGate(), 'linear': nn.Linear(DIM, DIM)}))
    explicit.load_state_dict(original.state_dict())
    (x_train, y_train), (x_val, y_val) = sequences(0).tensors, sequences(1).tensors

    def hypergradient_of(net, strategy_):
        arch_ids = {id(a) for a in strategy_._arch_parameters.values()}
        alphas = [p for p in net.parameters() if id(p) in arch_ids]
        weights = [p for p in net.parameters() if id(p) not in arch_ids]
        return hypergradient.neumann(lambda: F.cross_entropy(net(x_train), y_train),
                                     lambda: F.cross_entropy(net(x_val), y_val), weights, alphas, K=2, gamma=0.1)

    with double_backward_formulations():
        substituted = hypergradient_of(original, strategy)
    reference = hypergradient_of(explicit, explicit_strategy)
    assert all(torch.equal(a, b) for a, b in zip(substituted, reference))
    assert any(a.abs().max() > 0 for a in substituted)


# ----- searches on the tiny spaces -----

@pytest.mark.parametrize('space_fn', [attention_space, hard_activation_space], ids=['attention', 'hard_activations'])
@pytest.mark.parametrize('mode', ['implicit', 'unrolled'])
def test_second_order_search_runs_on_ops_without_a_double_backward(space_fn, mode):
    torch.manual_seed(0)
    result, strategy = run(space_fn(), mode)
    assert result.alphas_moved
    assert strategy.oneshot_module._nonfinite_total == 0
    assert all(a.abs().max() > 0.01 for a in alphas_of(strategy))
    assert result.arch['op'] in ('sdpa', 'mha', 'linear', 'hardsigmoid_gate', 'hardsigmoid_inplace', 'hardswish')


@pytest.mark.parametrize('space_fn, op', [(attention_space, 'scaled_dot_product_flash_attention_for_cpu'),
                                          (hard_activation_space, 'hardsigmoid')], ids=['attention', 'hardsigmoid'])
def test_without_the_formulations_the_probe_names_the_op(space_fn, op):
    """What the formulations fix: with them switched off, the search stops before any step, naming the op."""
    recorder = StepRecorder()
    torch.manual_seed(0)
    with mock.patch.object(second_order, 'double_backward_formulations', no_formulations), \
            pytest.raises(SecondOrderUnsupportedError, match=f"uses {op} \\(aten::.* Use hypergradient='first_order'"):
        run(space_fn(), 'implicit', recorder)
    assert recorder.steps == []


def test_first_order_alphas_are_identical_with_and_without_the_substitution_machinery():
    torch.manual_seed(0)
    _, with_machinery = run(hard_activation_space(), 'first_order')
    torch.manual_seed(0)
    with mock.patch.object(second_order, 'double_backward_formulations', no_formulations):
        _, without = run(hard_activation_space(), 'first_order')
    assert all(torch.equal(a, b) for a, b in zip(alphas_of(with_machinery), alphas_of(without)))
    assert all(a.abs().max() > 0.01 for a in alphas_of(without))


# ----- ops without a double backward and without a substitute: refused before any step -----

class SegmentMax(nn.Module):
    """Max over segments of the features (torch.segment_reduce: aten::_segment_reduce_backward has no derivative)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, DIM)
        pooled = torch.stack([torch.segment_reduce(row, 'max', lengths=torch.tensor([DIM // 2, DIM // 2]))
                              for row in flat])
        return pooled.repeat(1, DIM // 2).reshape(x.shape)


class _ClippedSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(-1, 1) ** 2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 2 * x.clamp(-1, 1) * (x.abs() < 1)


class ClippedSquare(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ClippedSquare.apply(x)


@pytest.mark.parametrize('op_module, message', [
    (SegmentMax, r'uses segment_reduce \(aten::_segment_reduce_backward has no derivative in PyTorch\)'),
    (ClippedSquare, r'uses a custom torch.autograd.Function whose backward is marked @once_differentiable '
                    r'\(_ClippedSquare\)'),
], ids=['aten_op', 'custom_function'])
@pytest.mark.parametrize('mode', ['implicit', 'unrolled'])
def test_op_without_double_backward_is_refused_before_any_step(op_module, message, mode):
    recorder = StepRecorder()
    torch.manual_seed(0)
    space = SequenceSpace({'special': nn.Sequential(nn.Linear(DIM, DIM), op_module()), 'linear': nn.Linear(DIM, DIM)})
    with pytest.raises(SecondOrderUnsupportedError, match=message) as excinfo:
        run(space, mode, recorder)
    assert f"hypergradient={mode!r} needs second derivatives" in str(excinfo.value)
    assert "Use hypergradient='first_order'" in str(excinfo.value)
    error = excinfo.value  # one message, not a chain with autograd's error
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert recorder.steps == []  # before the first step, weight or architecture

    # ... and first order searches the same space.
    torch.manual_seed(0)
    space = SequenceSpace({'special': nn.Sequential(nn.Linear(DIM, DIM), op_module()), 'linear': nn.Linear(DIM, DIM)})
    result, _ = run(space, 'first_order')
    assert result.alphas_moved


def test_probe_leaves_no_trace():
    """The probe restores buffers and the RNG: a second-order search with it equals one without it."""
    space_fn = lambda: SequenceSpace({'drop': nn.Sequential(nn.Linear(DIM, DIM), nn.Dropout(0.5)),  # noqa: E731
                                      'bn': nn.Sequential(nn.Linear(DIM, DIM), nn.Flatten(0, 1),
                                                          nn.BatchNorm1d(DIM), nn.Unflatten(0, (-1, SEQ)))})
    torch.manual_seed(0)
    _, probed = run(space_fn(), 'implicit')
    torch.manual_seed(0)
    with mock.patch.object(second_order, 'check_double_backward'):
        _, unprobed = run(space_fn(), 'implicit')
    assert all(torch.equal(a, b) for a, b in zip(alphas_of(probed), alphas_of(unprobed)))
    weights = lambda s: [p.detach() for p in s.oneshot_module.weight_parameters()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(weights(probed), weights(unprobed)))
    buffers = lambda s: list(s.oneshot_module.training_module.buffers())  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(buffers(probed), buffers(unprobed)))


# ----- trainer settings refused at fit start -----

@pytest.mark.parametrize('precision', ['bf16-mixed', 'bf16-true'])
def test_mixed_and_half_precision_are_refused_at_fit_start(precision):
    recorder = StepRecorder()
    torch.manual_seed(0)
    strategy = IDartsStrategy(inner_steps=1)
    with pytest.raises(ValueError, match=f"does not support Lightning precision='{precision}'.*'32-true'"):
        search(hard_activation_space(), sequences(0), sequences(1), strategy, epochs=1, batch_size=BATCH,
               trainer_kwargs={**QUIET, 'precision': precision, 'callbacks': [recorder]})
    assert recorder.steps == []


def test_sync_batchnorm_is_refused_at_fit_start():
    recorder = StepRecorder()
    torch.manual_seed(0)
    # What Trainer(sync_batchnorm=True) makes of a BatchNorm under DDP (the conversion runs before on_fit_start).
    # Under real DDP on CPU, PyTorch's DistributedDataParallel itself refuses SyncBatchNorm ("SyncBatchNorm layers only
    # work with GPU modules") before on_fit_start, so this check matters on GPUs; here the module is put in directly.
    space = SequenceSpace({'bn': nn.Sequential(nn.Linear(DIM, DIM), nn.Flatten(0, 1), nn.SyncBatchNorm(DIM),
                                               nn.Unflatten(0, (-1, SEQ))), 'linear': nn.Linear(DIM, DIM)})
    with pytest.raises(ValueError, match='does not support SyncBatchNorm .*sync_batchnorm=False'):
        search(space, sequences(0), sequences(1), IDartsStrategy(inner_steps=1), epochs=1, batch_size=BATCH,
               trainer_kwargs={**QUIET, 'callbacks': [recorder]})
    assert recorder.steps == []

