"""2:4 semi-structured sparsity: pattern checks (anywhere) and conversion to PyTorch's sparse GPU kernels.

``torch.sparse.to_sparse_semi_structured`` runs on CUDA GPUs of compute capability >= 8.0
(Ampere, Ada, Hopper) with float16/bfloat16 weights; on anything else we refuse with one line
instead of failing deep inside PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.models import weight_matrix
from sparsefit.walk.masks import model_layers

CPU_MESSAGE = "2:4 semi-structured kernels need a CUDA GPU with compute capability >= 8.0; found: {found}"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def is_semi_structured(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive input weights (last dim of (out, in)) has at most ``n`` nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % m != 0:
        return False
    groups = (weight.detach() != 0).reshape(weight.shape[0], -1, m)
    return bool((groups.sum(dim=-1) <= n).all())


def first_non_semi_structured(model: nn.Module) -> str | None:
    """The qualified name of the first prunable block layer that is not 2:4, or None when all are."""
    for name, module in model_layers(model).items():
        if not is_semi_structured(weight_matrix(module)):
            return name
    return None


def semi_structured_device_problem(device: torch.device | str | None = None) -> str | None:
    """Why 2:4 kernels cannot run on ``device`` (default: the current CUDA device), or None when they can."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return CPU_MESSAGE.format(found=device.type)
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        name = torch.cuda.get_device_name(device)
        return CPU_MESSAGE.format(found=f"{name} (compute capability {major}.{minor})")
    return None


def _as_linear(module: nn.Module) -> nn.Linear:
    # GPT-2's Conv1D computes x @ W with W (in, out); the sparse kernels want F.linear's (out, in) weight.
    weight = weight_matrix(module)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def to_semi_structured(model: nn.Module) -> nn.Module:
    """Convert every prunable block layer of a 2:4 model to PyTorch's semi-structured sparse weights, in place.

    The model must already be on a CUDA GPU of compute capability >= 8.0, in float16 or bfloat16.
    Raises UsageError naming the first layer that is not 2:4, or saying what the device lacks.
    """
    from torch.sparse import to_sparse_semi_structured

    # The pattern first: it is checkable anywhere, and a non-2:4 model is the deeper problem.
    offending = first_non_semi_structured(model)
    if offending is not None:
        raise UsageError(
            f"layer {offending!r} is not 2:4 sparse (some group of 4 input weights has more than 2 nonzeros); "
            "prune with --pattern 2:4 first"
        )
    param = next(model.parameters(), None)
    problem = semi_structured_device_problem(param.device if param is not None else "cpu")
    if problem is not None:
        raise UsageError(problem)
    for qualified, module in model_layers(model).items():
        if module.weight.dtype not in SUPPORTED_DTYPES:
            raise UsageError(
                f"layer {qualified!r} is {str(module.weight.dtype).removeprefix('torch.')}; 2:4 kernels need "
                "float16 or bfloat16 (load the model with --dtype bfloat16)"
            )
        if not isinstance(module, nn.Linear):
            module = _as_linear(module)
            parent_name, _, child = qualified.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module)
        try:
            sparse = to_sparse_semi_structured(module.weight.detach())
        except (RuntimeError, ValueError) as exc:
            text = str(exc).strip().splitlines()
            raise UsageError(
                f"layer {qualified!r} (shape {list(module.weight.shape)}) cannot use 2:4 kernels: "
                f"{text[0] if text else type(exc).__name__}"
            ) from None
        module.weight = nn.Parameter(sparse, requires_grad=False)
    return model
