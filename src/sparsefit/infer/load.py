"""``sparsefit.load``: a sparse checkpoint as a transformers model whose pruned linears run the sparse kernel.

``kernels``: ``sparse`` puts every pruned layer of the decoder blocks on :class:`SparseLinear`; ``dense`` keeps
torch's dense linears; ``auto`` uses the sparse layer only where it decodes faster than the dense matmul for
that layer's shape, density and thread count (measured once on this machine and cached, see :mod:`.choose`), so
a model is never slower than dense. A compressed export (``export --format compressed``) loads straight into
the sparse layers: its bitmask and values become the layer's buffers, with no dense copy of the weight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.infer import kernel as compiled
from sparsefit.infer.choose import choose_sparse, shape_density
from sparsefit.infer.sparse_linear import VALUES, SparseLinear

KERNELS = ("auto", "sparse", "dense", "2:4")  # 2:4: torch's semi-structured GPU kernels
PRUNED_BELOW = 0.95  # a layer counts as pruned when it keeps less than this share of its weights


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def check_choice(kernels: str, values: str) -> None:
    if kernels not in KERNELS:
        raise UsageError(f"kernels {kernels!r}: use {', '.join(KERNELS)}")
    if kernels == "2:4":
        from sparsefit.export.semi_structured import semi_structured_device_problem

        problem = semi_structured_device_problem()
        if problem:
            raise UsageError(f"--kernels 2:4: {problem}; on a CPU use --kernels sparse or auto")
        if values not in SEMI_STRUCTURED_VALUES:
            raise UsageError(f"--kernels 2:4 values {values!r}: use {', '.join(SEMI_STRUCTURED_VALUES)}")
        return
    if values not in VALUES:
        raise UsageError(f"sparse values {values!r}: use {', '.join(VALUES)}")
    if kernels == "sparse" and compiled.problem():
        raise UsageError(f"--kernels sparse cannot run here: {compiled.problem()}")


SEMI_STRUCTURED_VALUES = {"bf16": torch.bfloat16, "float16": torch.float16}


def default_values(kernels: str) -> str:
    """The kept values' type when none is asked for: exact float32 on the CPU, bf16 for 2:4 (it takes no float32)."""
    return "bf16" if kernels == "2:4" else "float32"


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer of the decoder blocks (dense, or already a :class:`SparseLinear`), by qualified name."""
    from sparsefit.models.adapters import get_adapter, is_prunable

    adapter = get_adapter(model)
    return {
        f"{adapter.blocks}.{index}.{name}": module
        for index, block in enumerate(adapter.get_blocks(model))
        for name, module in block.named_modules()
        if name and (is_prunable(module) or isinstance(module, SparseLinear))
    }


def pruned_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder blocks' linears that keep less than :data:`PRUNED_BELOW` of their weights, by name."""
    out = {}
    for name, layer in decoder_linears(model).items():
        # A sparse layer is pruned whatever it keeps (the compressed export stores a weight sparse only when smaller)
        sparse = isinstance(layer, SparseLinear)
        if sparse or layer.weight.device.type != "meta" and shape_density(layer)[2] < PRUNED_BELOW:
            out[name] = layer
    return out


@torch.no_grad()
def sparsify(model: nn.Module, kernels: str = "auto", values: str = "float32", threads: int | None = None) -> dict:
    """Put ``model``'s pruned block linears on :class:`SparseLinear` in place (all of them, or where faster).

    Returns ``{layer name: "sparse" | "dense"}`` for the pruned layers. ``kernels="sparse"`` on a model with no
    pruned layer is a UsageError (a structured model is a plain smaller model: use dense or auto).
    """
    from sparsefit.models.adapters import weight_matrix

    if kernels == "2:4":
        raise UsageError("sparsify puts layers on the CPU's sparse layer (auto, sparse or dense); 2:4 kernels go "
                         "through sparsefit.load(..., kernels='2:4')")  # fmt: skip
    check_choice(kernels, values)
    layers = pruned_layers(model)
    if kernels == "sparse" and not layers:
        raise UsageError("--kernels sparse: the model has no pruned layer (every block linear keeps >= 95 % of its "
                         "weights); use --kernels dense or auto")  # fmt: skip
    if kernels == "dense" or not layers or compiled.problem():
        return {name: "dense" for name in layers}
    threads = threads or torch.get_num_threads()
    chosen = {}
    use = choose_sparse(layers, values, threads) if kernels == "auto" else dict.fromkeys(layers, True)
    for name, layer in layers.items():
        if isinstance(layer, SparseLinear):
            chosen[name] = "sparse" if use[name] else "dense"
            if not use[name]:
                linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
                linear.weight.copy_(layer.dense_weight())
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias)
                _set_module(model, name, linear)
            continue
        if use[name]:
            sparse = SparseLinear.from_weight(weight_matrix(layer), getattr(layer, "bias", None), values)
            _set_module(model, name, sparse)
        chosen[name] = "sparse" if use[name] else "dense"
    return chosen


def weight_bytes(model: nn.Module, as_dense: bool = False) -> int:
    """Bytes of the model's weights as held: tied tensors once, a sparse layer's compressed buffers (or, with
    ``as_dense``, what its dense float32 weight would take)."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            weight = module.in_features * module.out_features * 4 if as_dense else module.weight_bytes()
            total += weight + (module.bias.numel() * 4 if module.bias is not None else 0)
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if tensor.device.type != "meta" and key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    return total


def _load_compressed_sparse(folder: Path, values: str) -> nn.Module:
    """A compressed export with its linear layers built from the stored bitmask and values (no dense copy)."""
    from sparsefit.export.compressed import WEIGHTS_FILE, decompress_state_dict, read_compressed_file
    from sparsefit.models.loading import meta_model

    weights = folder / WEIGHTS_FILE
    tensors, metadata = read_compressed_file(weights)
    model = meta_model(folder, torch.float32)
    compressed = json.loads(metadata.get("compressed", "{}"))
    modules = dict(model.named_modules())
    for name, shape in compressed.items():
        module = modules.get(name.removesuffix(".weight"))
        if not isinstance(module, nn.Linear) or tuple(shape) != (module.out_features, module.in_features):
            continue  # e.g. GPT-2's Conv1D stores (in, out): it goes through the dense state below
        bias_name = name.removesuffix("weight") + "bias"
        bias = tensors.pop(bias_name, None)
        if module.bias is not None and bias is None:
            raise UsageError(f"{str(weights)!r} lacks tensor {bias_name!r}; re-export it")
        sparse = SparseLinear(tensors.pop(f"{name}.bitmask"), tensors.pop(f"{name}.values"), tuple(shape), bias, values)
        _set_module(model, name.removesuffix(".weight"), sparse)
    rest = {name: shape for name, shape in compressed.items() if f"{name}.bitmask" in tensors}
    metadata = {**metadata, "compressed": json.dumps(rest)}
    state = decompress_state_dict(tensors, metadata, repr(str(weights)))
    state = {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state.items()}
    missing, _unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if left:
        raise UsageError(f"{str(weights)!r} lacks tensors the model needs (first: {left[0]!r}); re-export it")
    return model


def load(path: str | os.PathLike, kernels: str = "auto", values: str | None = None, threads: int | None = None,
         trust_remote_code: bool = False) -> nn.Module:  # fmt: skip
    """The checkpoint at ``path`` (a run folder, an HF or compressed export, a built-in name) as a transformers
    model in eval mode, its pruned linears on the sparse kernel per ``kernels``; ``model.generate`` works on it.

    ``values``: how the sparse layers store the kept weights: ``float32`` (exact), ``bf16`` or ``int8`` (one scale
    per row); for ``kernels="2:4"`` (a CUDA GPU): ``bf16`` (the default) or ``float16``. ``threads``: the thread
    count ``auto`` measures for (default: torch's).
    """
    from sparsefit.export.compressed import WEIGHTS_FILE, load_compressed
    from sparsefit.models.loading import load as load_dense

    values = values or default_values(kernels)
    check_choice(kernels, values)
    folder = Path(path).expanduser()
    if kernels == "2:4":
        from sparsefit.export.semi_structured import to_semi_structured

        model = load_compressed(folder)[0] if (folder / WEIGHTS_FILE).is_file() else load_dense(str(path)).model
        model = model.to("cuda", SEMI_STRUCTURED_VALUES[values]).eval()
        return to_semi_structured(model)
    if (folder / WEIGHTS_FILE).is_file() and kernels != "dense" and not compiled.problem():
        model = _load_compressed_sparse(folder, values)
        model.eval()
        sparsify(model, kernels, values, threads)  # auto: the layers not faster go back to dense
        return model
    if (folder / WEIGHTS_FILE).is_file():
        model = load_compressed(folder)[0]
    else:
        model = load_dense(str(path), trust_remote_code=trust_remote_code).model
    model.eval()
    sparsify(model, kernels, values, threads)
    return model
