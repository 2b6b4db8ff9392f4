"""scvi_scale.optim against torch.optim's own implementation: parameters bit-identical to torch.optim.Adam and
AdamW (fused) step for step, state_dicts loadable both ways, and the LR-on-plateau rule's lr sequence equal to
torch.optim.lr_scheduler.ReduceLROnPlateau's."""

from __future__ import annotations

import copy

import pytest
import torch

from scvi_scale import optim

STEPS = 20


def make_parameters(seed: int) -> list[torch.nn.Parameter]:
    """Parameters of a few shapes, one frozen (requires_grad False) and one that never gets a gradient."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 2, 4), (1,), (6,)]
    parameters = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    parameters[3].requires_grad_(False)
    return parameters


def set_gradients(parameters, step: int) -> None:
    """Seeded gradients for all parameters but the frozen one and the last (its grad stays None)."""
    generator = torch.Generator().manual_seed(1000 + step)
    for index, parameter in enumerate(parameters):
        if parameter.requires_grad and index != len(parameters) - 1:
            parameter.grad = torch.randn(parameter.shape, generator=generator) * (1 + step % 3)


def torch_optimizer(name: str, parameters, **settings):
    optimizer = torch.optim.AdamW if name == "AdamW" else torch.optim.Adam
    return optimizer(parameters, fused=True, **settings)


def run(optimizer, parameters, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        set_gradients(parameters, step)
        optimizer.step()


SETTINGS = {"lr": 3e-2, "eps": 0.01, "weight_decay": 1e-2}


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_parameters_are_bit_identical_to_torch_fused(name):
    ours, theirs = make_parameters(0), make_parameters(0)
    run(optim.make_optimizer(ours, name, device="cpu", **SETTINGS), ours, range(STEPS))
    run(torch_optimizer(name, theirs, **SETTINGS), theirs, range(STEPS))
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.equal(mine, reference)
    assert not torch.equal(ours[0], make_parameters(0)[0])  # it did train
    assert torch.equal(ours[3], make_parameters(0)[3]) and torch.equal(ours[4], make_parameters(0)[4])


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("direction", ["torch to ours", "ours to torch"])
def test_state_dicts_load_both_ways_and_resume_bit_identically(name, direction):
    """10 steps with one optimizer, its state_dict loaded into the other for 10 more: the same parameters as 20 steps
    with torch's; the state_dicts have the same layout and values."""
    reference = make_parameters(0)
    run(torch_optimizer(name, reference, **SETTINGS), reference, range(STEPS))

    first_parameters = make_parameters(0)
    ours_first = direction == "ours to torch"
    first = (
        optim.make_optimizer(first_parameters, name, device="cpu", **SETTINGS)
        if ours_first
        else torch_optimizer(name, first_parameters, **SETTINGS)
    )
    run(first, first_parameters, range(STEPS // 2))
    saved = copy.deepcopy(first.state_dict())
    second_parameters = [p.detach().clone().requires_grad_(p.requires_grad) for p in first_parameters]
    second = (
        torch_optimizer(name, second_parameters, **SETTINGS)
        if ours_first
        else optim.make_optimizer(second_parameters, name, device="cpu", **SETTINGS)
    )
    second.load_state_dict(saved)
    reloaded = second.state_dict()
    assert reloaded["param_groups"] == saved["param_groups"]
    assert list(reloaded["state"]) == list(saved["state"])
    for index, state in saved["state"].items():
        assert list(reloaded["state"][index]) == list(state)
        for key, value in state.items():
            assert (
                torch.equal(reloaded["state"][index][key], value) and reloaded["state"][index][key].dtype == value.dtype
            )
    run(second, second_parameters, range(STEPS // 2, STEPS))
    for mine, want in zip(second_parameters, reference, strict=True):
        assert torch.equal(mine, want)


def test_a_state_dict_of_another_model_is_refused():
    parameters = make_parameters(0)
    optimizer = optim.make_optimizer(parameters, "Adam", device="cpu", **SETTINGS)
    run(optimizer, parameters, range(2))
    other = optim.make_optimizer(parameters[:2], "Adam", device="cpu", **SETTINGS)
    with pytest.raises(ValueError, match="holds 5 parameters, this optimizer's 2"):
        other.load_state_dict(optimizer.state_dict())


def test_integer_parameters_are_refused_up_front():
    with pytest.raises(ValueError, match="parameter 0 is torch.int64"):
        optim.FusedAdam([torch.zeros(3, dtype=torch.int64)], lr=1e-3, eps=1e-8, weight_decay=0.0)


@pytest.mark.parametrize("threshold_mode", ["abs", "rel"])
def test_plateau_lr_sequence_equals_torchs(threshold_mode):
    """A seeded noisy, slowly improving metric: the same lr after every step as torch's scheduler, including
    reductions clipped at min_lr; a state_dict taken halfway loads into the other and carries on the same."""
    generator = torch.Generator().manual_seed(3)
    metrics = (torch.linspace(10, 9, 300) + torch.rand(300, generator=generator)).tolist()
    settings = dict(factor=0.6, patience=3, threshold=0.05, threshold_mode=threshold_mode, min_lr=2e-4)
    theirs_optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(theirs_optimizer, **settings)
    ours_optimizer = optim.FusedAdam([torch.nn.Parameter(torch.zeros(1))], lr=1e-2, eps=1e-8, weight_decay=0.0)
    ours = optim.ReduceLROnPlateau(ours_optimizer, **settings)
    assert ours.state_dict() == theirs.state_dict()
    for index, metric in enumerate(metrics):
        if index == 150:  # swap states across: each continues from the other's
            ours_state, theirs_state = copy.deepcopy(ours.state_dict()), copy.deepcopy(theirs.state_dict())
            ours.load_state_dict(theirs_state)
            theirs.load_state_dict(ours_state)
        ours.step(metric)
        theirs.step(metric)
        assert ours_optimizer.param_groups[0]["lr"] == theirs_optimizer.param_groups[0]["lr"], index
    assert ours.state_dict() == theirs.state_dict()
    assert ours_optimizer.param_groups[0]["lr"] == 2e-4  # it reduced down to min_lr


def test_training_imports_no_torch_dynamo():
    """The optimizer's whole life (steps, state_dict, load) leaves torch._dynamo unimported: checked in a fresh
    process, as this one may have imported it already."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from scvi_scale import optim\n"
        "p = [torch.nn.Parameter(torch.ones(3))]\n"
        "o = optim.make_optimizer(p, 'AdamW', lr=1e-3, eps=1e-8, weight_decay=1e-6, device='cpu')\n"
        "s = optim.ReduceLROnPlateau(o)\n"
        "p[0].grad = torch.ones(3); o.step(); o.zero_grad(); s.step(1.0)\n"
        "o.load_state_dict(o.state_dict()); s.load_state_dict(s.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
