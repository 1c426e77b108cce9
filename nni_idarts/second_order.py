"""Second derivatives through the user's model: equivalent formulations for ops without a double backward, and a probe.

The second-order hypergradients (``implicit``, ``unrolled``) differentiate the weight gradient once more (Hessian-vector
and mixed products by double backprop). Some PyTorch kernels have a backward that is not itself differentiable, so
autograd fails deep inside the first architecture step. Where an equivalent formulation with a double backward exists,
:func:`double_backward_formulations` swaps it in, only while the architecture step computes the hypergradient (the
weight steps, first-order searches and the user's model outside that step run the original kernels):

- fused scaled-dot-product attention (``F.scaled_dot_product_attention``, and ``nn.MultiheadAttention`` /
  ``nn.TransformerEncoderLayer``, which call it): the flash and memory-efficient kernels have no double backward; the
  math kernel (``SDPBackend.MATH``) computes the same attention from differentiable ops;
- ``hardsigmoid`` (``nn.Hardsigmoid``, ``F.hardsigmoid``; the squeeze-excite gate of NNI's ``MobileNetV3Space``):
  ``relu6(x + 3) / 6``: bit-identical values, and the same first derivative up to one float32 rounding (PyTorch's
  backward multiplies by float32's 1/6, also in float64; both are 0 at the kinks).

``hardswish`` needs nothing: PyTorch 2.14's ``hardswish_backward`` has a derivative (checked by the tests).

Where no equivalent exists, :func:`check_double_backward` (run once, on the first batch, before any step) refuses the
search with one :class:`SecondOrderUnsupportedError` naming the op and suggesting ``hypergradient='first_order'``.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .hypergradient import _grad, _vjp


class SecondOrderUnsupportedError(ValueError):
    """The model has an op without a double backward (and no equivalent formulation) in a second-order search."""


def _hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    out = F.relu6(input + 3) / 6
    if inplace:
        # relu6 saved its own input (input + 3), not ``input``: overwriting ``input`` leaves the graph valid.
        return input.copy_(out)
    return out


#: name in ``torch.nn.functional`` -> equivalent formulation with a double backward, bound there while the context is
#: active. ``nn.Hardsigmoid`` and every ``F.hardsigmoid(...)`` call look the name up at call time, so they get it; a
#: name bound earlier (``from torch.nn.functional import hardsigmoid``) or ``torch._C._nn.hardsigmoid`` do not, and the
#: probe then refuses the search naming hardsigmoid. (A TorchFunctionMode would catch those too, but it routes every
#: torch call of the step through Python: +15-35% on the DARTS space's hypergradient, measured.)
_FORMULATIONS: dict[str, Callable[..., torch.Tensor]] = {'hardsigmoid': _hardsigmoid}


@contextlib.contextmanager
def double_backward_formulations(enabled: bool = True) -> Iterator[None]:
    """While active, ops without a double backward run as an equivalent formulation that has one (see the module
    docstring). ``enabled=False`` is a no-op, for the first-order hypergradient, which needs no second derivatives."""
    if not enabled:
        yield
        return
    originals = {name: getattr(F, name) for name in _FORMULATIONS}
    with sdpa_kernel(SDPBackend.MATH):
        try:
            for name, formulation in _FORMULATIONS.items():
                setattr(F, name, formulation)
            yield
        finally:
            for name, original in originals.items():
                setattr(F, name, original)


# "derivative for aten::hardsigmoid_backward is not implemented" (ops whose derivative formula is not_implemented) and
# "the derivative for '_embedding_bag_backward' is not implemented." (ops whose autograd kernel refuses).
_NOT_IMPLEMENTED = re.compile(r"derivative for (?:aten::)?'?([\w.:]+?)'? is not implemented")


def _graph_nodes(roots: Sequence[torch.Tensor]) -> Iterator[Any]:
    """Every autograd node reachable from the ``grad_fn`` of ``roots``."""
    seen: set[Any] = set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)


def _once_differentiable_functions(loss: torch.Tensor) -> str:
    """The custom autograd.Functions in the graph of ``loss`` whose backward is decorated (``once_differentiable``
    sets ``__wrapped__``), by class name, as the message names them."""
    names = sorted({node._forward_cls.__name__ for node in _graph_nodes([loss])
                    if hasattr(getattr(node, '_forward_cls', None), 'backward')
                    and hasattr(node._forward_cls.backward, '__wrapped__')})
    return (f'a custom torch.autograd.Function whose backward is marked @once_differentiable'
            + (f' ({", ".join(names)})' if names else ''))


def _refusal(hypergradient: str, op: str) -> SecondOrderUnsupportedError:
    return SecondOrderUnsupportedError(
        f"hypergradient={hypergradient!r} needs second derivatives, but the model uses {op}, and nni-idarts has "
        "no equivalent formulation with a double backward for it. Use hypergradient='first_order' for this model "
        "space, or replace the op.")


def check_double_backward(train_loss: Callable[[], torch.Tensor], weights: Sequence[torch.Tensor],
                          alphas: Sequence[torch.Tensor], *, hypergradient: str) -> None:
    """Take one second derivative of ``train_loss`` (w.r.t. weights and alphas), as the ``hypergradient`` will.

    Raises :class:`SecondOrderUnsupportedError` naming the op if the model has one without a double backward; any
    other error propagates unchanged. Call it inside :func:`double_backward_formulations`, as the hypergradient runs.
    Costs one forward pass and two backward passes; it writes no ``.grad`` (the caller restores buffers and RNG).

    Two kinds are caught: aten ops whose backward has no derivative (autograd raises "derivative for aten::X is not
    implemented"), and custom autograd Functions with a ``@once_differentiable`` backward. PyTorch 2.14 does not raise
    for the latter: their backward's outputs carry no graph, so the second derivative silently leaves out every
    path through them. They are found by the error node (``DelayedError``, ``torch::autograd::Error``) that marks
    them in the gradient's graph.
    (A custom backward that is not differentiable in another way, e.g. through ``.detach()``, cannot be detected.)
    """
    loss = train_loss()
    # An op without even a first derivative fails here, as it would in any weight step: not ours to explain.
    grads = _grad(loss, weights, create_graph=True)
    if any(node.name() == 'torch::autograd::Error' for node in _graph_nodes(grads)):
        raise _refusal(hypergradient, _once_differentiable_functions(loss))
    try:
        # Alphas frozen for warm-up (requires_grad=False) are left out; the weights' products take the same ops.
        _vjp(grads, [*weights, *(a for a in alphas if a.requires_grad)], [torch.ones_like(g) for g in grads])
    except RuntimeError as error:
        match = _NOT_IMPLEMENTED.search(str(error))
        if 'once_differentiable' in str(error):  # older PyTorch raises instead
            raise _refusal(hypergradient, _once_differentiable_functions(loss)) from None
        if match is None:
            raise
        backward = match.group(1)
        forward = backward[:-len('_backward')] if backward.endswith('_backward') else backward
        raise _refusal(hypergradient, f'{forward.lstrip("_")} (aten::{backward} has no derivative in PyTorch)') from None
