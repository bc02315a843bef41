"""A model zerograph cannot trace gets an error naming the op, the module
path and what to do, instead of a bare stack trace from inside PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zerograph


@torch.library.custom_op("zerograph_test::no_fake", mutates_args=())
def no_fake(x: torch.Tensor) -> torch.Tensor:
    return x * 2


# Differentiable, so eager training works; no fake implementation, so it cannot be traced.
no_fake.register_autograd(lambda ctx, grad: grad * 2)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.ops.zerograph_test.no_fake(self.lin(x))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.blocks = nn.Sequential(nn.ReLU(), Inner())

    def forward(self, x):
        return self.blocks(self.a(x)).sum()


def test_untraceable_op_names_op_module_and_fix():
    model = zerograph.compile(Outer(), {"zero_optimization": {"stage": 3}})
    with pytest.raises(zerograph.TraceError) as info:
        model(torch.randn(2, 4))
    text = str(info.value)
    assert "op zerograph_test.no_fake" in text
    assert "module 'Outer.blocks.1'" in text
    assert "no fake impl" in text.lower() or "fake" in text
    assert "register_fake" in text and "torch.compiler.disable" in text
    assert info.value.__cause__ is not None
    torch._dynamo.reset()


def test_disabling_the_module_trains():
    inner_forward = Inner.forward

    class EagerInner(Inner):
        forward = torch.compiler.disable(inner_forward)

    model = Outer()
    model.blocks[1].__class__ = EagerInner
    reference = Outer()
    reference.load_state_dict(model.state_dict())
    model = zerograph.compile(model, {"zero_optimization": {"stage": 3}})
    x = torch.randn(2, 4)
    loss = model(x)
    loss.backward()
    ref_loss = reference(x)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_inputs_on_another_device_name_the_devices_and_the_fix():
    # The message Dynamo raised on a GPU machine for CPU inputs and CUDA
    # parameters (this CPU-only machine cannot produce it for real).
    from zerograph.runtime.errors import explain_trace_failure

    message = (
        "RuntimeError when making fake tensor call\n"
        "  Explanation: Dynamo failed to run FX node with fake tensors: call_function <function embedding at "
        "0x7fcbd29fc4a0>(*(FakeTensor(..., size=(2, 7), dtype=torch.int64), FakeTensor(..., device='cuda:0', "
        "size=(41, 16)), None, None, 2.0, False, False), **{}): got RuntimeError('Unhandled FakeTensor Device "
        "Propagation for aten.embedding.default, found two different devices cuda:0, cpu')\n"
        "from user code:\n"
        f'   File "{__file__}", line {Inner.forward.__code__.co_firstlineno + 1}, in forward\n'
    )
    error = explain_trace_failure(Outer(), RuntimeError(message))
    text = str(error)
    assert "op embedding" in text and "module 'Outer.blocks.1'" in text
    assert "cuda:0 and cpu" in text and "zerograph.device" in text
