"""Adam, AdamW and the LR-on-plateau rule without torch.optim's machinery, so training never imports torch._dynamo.

Every torch.optim.Optimizer wraps its methods (add_param_group, zero_grad, state_dict, ...) in torch._disable_dynamo,
whose first call imports torch._dynamo: seconds of a short job's start-up, spent before the first step. `FusedAdam`
calls the same fused kernels torch.optim.Adam(fused=True) and AdamW(fused=True) call (torch._fused_adam_ and
torch._fused_adamw_), with the same state, so its parameters are bit-identical to theirs; its state_dict() has
torch.optim's layout, so a checkpoint written with either optimizer resumes with the other. `ReduceLROnPlateau`
is torch.optim.lr_scheduler.ReduceLROnPlateau's rule over any object with `param_groups`, with its state_dict.

make_optimizer picks FusedAdam where the fused kernels run (CPU, CUDA) and torch.optim elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

FUSED_DEVICES = ("cpu", "cuda")
# torch.optim.Adam's param_group entries, in its order (state_dict() lists them so); "params" comes last there
GROUP_DEFAULTS = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": True,
}


class FusedAdam:
    """torch.optim.Adam(params, lr, eps=eps, weight_decay=weight_decay, fused=True) (AdamW with
    decoupled_weight_decay=True), one parameter group, betas (0.9, 0.999), no amsgrad.

    Per parameter the state is torch's: "step" (a float32 scalar tensor on the parameter's device), "exp_avg" and
    "exp_avg_sq" (the parameter's shape and dtype), made at the parameter's first step with a gradient. Parameters
    whose grad is None are skipped, as torch skips them."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        eps: float,
        weight_decay: float,
        decoupled_weight_decay: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
    ):
        params = list(params)
        for index, param in enumerate(params):
            if param.device.type not in FUSED_DEVICES or not torch.is_floating_point(param):
                raise ValueError(
                    f"parameter {index} is {param.dtype} on {param.device.type}: FusedAdam needs floating-point "
                    f"parameters on {' or '.join(FUSED_DEVICES)}"
                )
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if not value >= 0.0:
                raise ValueError(f"{name}={value}: must be at least 0")
        self.param_groups: list[dict[str, Any]] = [
            {
                "params": params,
                "lr": lr,
                "betas": tuple(betas),
                "eps": eps,
                "weight_decay": weight_decay,
                **GROUP_DEFAULTS,
                "decoupled_weight_decay": decoupled_weight_decay,
            }
        ]
        self.state: dict[torch.Tensor, dict[str, Any]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step for every parameter with a gradient, grouped by device and dtype as torch groups them."""
        for group in self.param_groups:
            by_device_dtype: dict[tuple, list[list[torch.Tensor]]] = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("FusedAdam does not take sparse gradients")
                state = self.state.get(param)
                if state is None:
                    state = self.state[param] = {
                        "step": torch.zeros((), dtype=torch.float32, device=param.device),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                    }
                lists = by_device_dtype.setdefault((param.device, param.dtype), [[], [], [], [], []])
                for into, tensor in zip(
                    lists, (param, param.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]), strict=True
                ):
                    into.append(tensor)
            beta1, beta2 = group["betas"]
            kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
            for params, grads, exp_avgs, exp_avg_sqs, steps in by_device_dtype.values():
                torch._foreach_add_(steps, 1)
                kernel(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    [],  # max_exp_avg_sqs: amsgrad only
                    steps,
                    amsgrad=False,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=False,
                    grad_scale=None,
                    found_inf=None,
                )

    def state_dict(self) -> dict:
        """torch.optim.Optimizer.state_dict()'s layout: {"state": {index: state}, "param_groups": [group with
        "params" as indices]}, indices counted over the groups' parameters in order."""
        index_of: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            packed = {key: value for key, value in group.items() if key != "params"}
            index_of.update({id(p): i for i, p in enumerate(group["params"], len(index_of)) if id(p) not in index_of})
            packed["params"] = [index_of[id(p)] for p in group["params"]]
            groups.append(packed)
        return {"state": {index_of[id(p)]: state for p, state in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict() of this class or of torch.optim.Adam / AdamW (fused or not) over the same
        parameters: state tensors moved to their parameter's device and dtype, "step" to a float32 tensor."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the optimizer state has {len(saved_groups)} parameter group(s), "
                f"this optimizer {len(self.param_groups)}"
            )
        params_of: dict[int, torch.Tensor] = {}
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"parameter group {index} of the optimizer state holds {len(saved['params'])} parameters, "
                    f"this optimizer's {len(group['params'])}: not the same model"
                )
            params_of.update(zip(saved["params"], group["params"], strict=True))
        self.state = {}
        for index, saved_state in state_dict["state"].items():
            param = params_of[int(index)]
            state: dict[str, Any] = {}
            for key, value in saved_state.items():
                if key == "step":
                    value = torch.as_tensor(value, dtype=torch.float32).to(param.device)
                elif isinstance(value, torch.Tensor):
                    value = value.to(dtype=param.dtype, device=param.device)
                state[key] = value
            self.state[param] = state
        self.param_groups = [
            {**GROUP_DEFAULTS, **{k: v for k, v in saved.items() if k != "params"}, "params": group["params"]}
            for group, saved in zip(self.param_groups, saved_groups, strict=True)
        ]
        for group in self.param_groups:
            group["fused"] = True  # the kernels this class runs, whatever the saving optimizer ran
            group["betas"] = tuple(group["betas"])


def make_optimizer(params: Iterable[torch.Tensor], name: str, lr: float, eps: float, weight_decay: float, device):
    """Adam or AdamW (`name`) over `params`: FusedAdam on CPU and CUDA, torch.optim's (not fused) elsewhere."""
    decoupled = name == "AdamW"
    if torch.device(device).type in FUSED_DEVICES:
        return FusedAdam(params, lr=lr, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled)
    optimizer = torch.optim.AdamW if decoupled else torch.optim.Adam
    return optimizer(params, lr=lr, eps=eps, weight_decay=weight_decay)


class ReduceLROnPlateau:
    """torch.optim.lr_scheduler.ReduceLROnPlateau's rule in mode "min" with cooldown 0, for any optimizer with
    `param_groups`: after more than `patience` steps whose metric is not below the best by more than `threshold`
    (threshold_mode "abs") or by the fraction `threshold` ("rel"), each group's lr becomes max(lr * factor,
    min_lr), unless that moves it by eps or less. state_dict() holds torch's keys, so either loads the other's."""

    def __init__(
        self,
        optimizer,
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        min_lr: float = 0.0,
        eps: float = 1e-8,
    ):
        if factor >= 1.0:
            raise ValueError(f"factor={factor}: must be below 1")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode={threshold_mode!r}: expected 'rel' or 'abs'")
        self.optimizer = optimizer
        self.factor, self.default_min_lr = factor, min_lr
        self.min_lrs = [min_lr] * len(optimizer.param_groups)
        self.patience, self.cooldown, self.eps = patience, 0, eps
        self.last_epoch = 0
        self._last_lr = [group["lr"] for group in optimizer.param_groups]
        self.mode_worse, self.mode, self.threshold, self.threshold_mode = math.inf, "min", threshold, threshold_mode
        self.best, self.cooldown_counter, self.num_bad_epochs = math.inf, 0, 0

    def _is_better(self, value: float) -> bool:
        if self.threshold_mode == "abs":
            return value < self.best - self.threshold
        return value < self.best * (1.0 - self.threshold)

    def step(self, metric: float) -> None:
        value = float(metric)
        self.last_epoch += 1
        if self._is_better(value):
            self.best, self.num_bad_epochs = value, 0
        else:
            self.num_bad_epochs += 1
        if self.num_bad_epochs > self.patience:
            for group, min_lr in zip(self.optimizer.param_groups, self.min_lrs, strict=True):
                new_lr = max(float(group["lr"]) * self.factor, min_lr)
                if float(group["lr"]) - new_lr > self.eps:
                    group["lr"] = new_lr
            self.num_bad_epochs = 0
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("mode", "min") != "min" or state_dict.get("cooldown", 0) != 0:
            raise ValueError(
                f"the scheduler state has mode={state_dict.get('mode')!r}, cooldown={state_dict.get('cooldown')}: "
                "this rule runs mode 'min' with cooldown 0"
            )
        self.__dict__.update({key: value for key, value in state_dict.items() if key != "optimizer"})
