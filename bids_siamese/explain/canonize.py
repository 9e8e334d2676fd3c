"""Canonisation: an equivalent copy of a network that captum's LRP propagates relevance through exactly.

captum's :class:`~captum.attr.LRP` propagates relevance module by module: each leaf module carries a rule,
the relevance of its output is divided by the output (``s = R / z``), sent back through the module's own
gradient and multiplied by its input (``R_in = x * J^T s``). Anything that is not a module with a rule
(``x + y``, ``torch.cat``, ``x.mean()``, a module called twice, an in-place activation, a normalisation
layer) either breaks that bookkeeping or silently changes the total relevance. So the model is first
*canonised* with :mod:`torch.fx` into an equivalent graph that captum handles exactly:

* dropout and identity modules are removed; in-place activations become out-of-place;
* every normalisation layer fed directly by a convolution or linear layer is merged into it: BatchNorm
  (eval mode, running statistics) once, InstanceNorm/GroupNorm (statistics of the scan itself) per scan,
  by a calibration forward pass, so the merged layer is an ordinary affine layer for that scan;
* normalisation layers that follow something else (DenseNet's pre-activation BatchNorm after a
  concatenation) and activations other than ReLU (LeakyReLU, PReLU, ...) pass relevance through
  unchanged (captum's ``IdentityRule``);
* ``a + b`` (residual connections) becomes captum's ``Addition_Module``, ``torch.cat`` (dense connections)
  a concatenation module, ``x.mean(dim)`` / ``x.amax(dim)`` (global pooling) reduction modules, all with
  the epsilon rule, so relevance splits in proportion to each input's contribution;
* a module called more than once gets one copy per call (captum refuses shared modules);
* a tensor used by several layers is routed through one identity "branch" module per use, so the
  relevance each use sends back is added up before it is multiplied by the tensor.

The rules themselves are in :mod:`bids_siamese.explain.rules`, the explained targets in
:mod:`bids_siamese.explain.lrp`.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from captum.attr._utils.custom_modules import Addition_Module
from torch import nn

__all__ = ["CanonicalModel", "ScanReadout", "canonize"]

#: Convolutions (merged with a following normalisation into :class:`ConvNorm`; LRP rules act on them).
CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_INSTANCENORM = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
#: Normalisations: merged into the convolution before them, kept as leaves of the traced graph otherwise.
NORM_LAYERS = _BATCHNORM + _INSTANCENORM + (nn.GroupNorm,)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
#: Element-wise activations that relevance passes through unchanged (identity rule).
PASS_ACTIVATIONS = (nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Softplus, nn.ReLU6, nn.Mish,
                    nn.Tanh, nn.Sigmoid)
#: Pooling layers (the epsilon rule splits their relevance by contribution).
POOL_LAYERS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
               nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
               nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


# ----------------------------------------------------------------------------------------------------------
# Structural modules that replace functional operations
# ----------------------------------------------------------------------------------------------------------
class Branch(nn.Module):
    """Identity for one use of a tensor that has several uses (keeps captum's bookkeeping exact)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class Concat(nn.Module):
    """``torch.cat`` as a module (dense connections)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = int(dim)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.dim)


class Reduce(nn.Module):
    """``x.mean(dim)`` or ``x.amax(dim)`` as a module (global average or max pooling).

    With the epsilon rule relevance splits in proportion to each input's contribution: over all inputs for
    the mean, to the maximum for ``amax``.
    """

    def __init__(self, op: str, dim: Any, keepdim: bool = False):
        super().__init__()
        if op not in ("mean", "amax"):
            raise ValueError(f"reduction must be mean or amax, got {op!r}")
        self.op = op
        self.dim = dim
        self.keepdim = bool(keepdim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(x, self.op)(dim=self.dim, keepdim=self.keepdim)


class ScanReadout(nn.Module):
    """The LRP target as a layer: ``sum_k w_bk e_bk`` with fixed weights per scan ``b`` (``weights``: ``(B, D)``).

    A linear layer with one output whose weights differ from scan to scan, so that a batch of scans, each
    with its own target, is explained in one pass. LRP rules treat it as a linear layer.
    """

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.register_buffer("weights", weights.detach().reshape(weights.shape[0], -1).clone())

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return (e * self.weights).sum(dim=1, keepdim=True)


class ConvNorm(nn.Module):
    """A convolution merged with the normalisation that follows it, a single affine layer for one scan.

    ``weight`` and ``bias`` (what LRP rules read and modify) are the merged values. For per-scan statistics
    (InstanceNorm, GroupNorm) they are set by a calibration forward pass (``calibrating = True``), which
    normalises with the scan's own statistics exactly as the original pair of layers does.
    """

    def __init__(self, conv: nn.Module, norm: nn.Module):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise TypeError(f"LRP: convolution with padding_mode={conv.padding_mode} is not supported")
        self.dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(conv)]
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        w0 = conv.weight.detach().clone()
        b0 = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(w0.shape[0], dtype=w0.dtype)
        self.register_buffer("w0", w0)
        self.register_buffer("b0", b0)
        channels = w0.shape[0]
        gamma = getattr(norm, "weight", None)
        beta = getattr(norm, "bias", None)
        self.register_buffer("gamma", gamma.detach().clone() if gamma is not None else torch.ones(channels))
        self.register_buffer("beta", beta.detach().clone() if beta is not None else torch.zeros(channels))
        self.eps = float(norm.eps)
        self.static = False
        self.calibrating = False
        self.n_groups = channels
        if isinstance(norm, _BATCHNORM) or (
            isinstance(norm, _INSTANCENORM) and norm.track_running_stats and norm.running_mean is not None
        ):
            self.static = True
            scale = self.gamma / torch.sqrt(norm.running_var.detach() + self.eps)
            shift = self.beta - self.gamma * norm.running_mean.detach() / torch.sqrt(norm.running_var.detach() + self.eps)
            self.weight = nn.Parameter(w0 * scale.reshape(-1, *([1] * (w0.dim() - 1))))
            self.bias = nn.Parameter(b0 * scale + shift)
        else:
            if isinstance(norm, nn.GroupNorm):
                self.n_groups = int(norm.num_groups)
            self.weight = nn.Parameter(w0.clone())
            self.bias = nn.Parameter(b0.clone())

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.dims]
        return fn(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating and not self.static:
            if x.shape[0] != 1:
                raise ValueError("LRP with instance/group normalisation explains one scan at a time (batch of 1)")
            with torch.no_grad():
                y0 = self._conv(x, self.w0, self.b0)
                c = y0.shape[1]
                grouped = y0.reshape(1, self.n_groups, -1)
                mean = grouped.mean(-1).repeat_interleave(c // self.n_groups, dim=1)[0]
                std = torch.sqrt(grouped.var(-1, unbiased=False) + self.eps).repeat_interleave(c // self.n_groups, dim=1)[0]
                scale = self.gamma / std
                shift = self.beta - self.gamma * mean / std
                self.weight.data = self.w0 * scale.reshape(-1, *([1] * (self.w0.dim() - 1)))
                self.bias.data = self.b0 * scale + shift
        return self._conv(x, self.weight, self.bias)


# ----------------------------------------------------------------------------------------------------------
# Canonisation
# ----------------------------------------------------------------------------------------------------------
@dataclass
class CanonicalModel:
    """A canonised copy of a network, ready for captum's LRP.

    Attributes:
        module: the rewritten :class:`torch.fx.GraphModule` (same forward function as the original).
        needs_calibration: whether it holds per-scan merged normalisations (call :meth:`calibrate`).
    """

    module: fx.GraphModule
    needs_calibration: bool

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.module.parameters()).device

    def to(self, device: str | torch.device) -> "CanonicalModel":
        """Move the model to ``device`` (in place); returns itself."""
        self.module.to(device)
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The (pre-normalisation) embeddings ``(B, D)`` of a batch ``(B, 1, X, Y, Z)``; with per-scan merged
        normalisations the scans are calibrated one at a time (the model is left calibrated to the last)."""
        if not self.needs_calibration:
            with torch.no_grad():
                return self.module(x)
        return torch.cat([self.calibrate(x[i:i + 1]) for i in range(x.shape[0])])

    def calibrate(self, x: torch.Tensor) -> torch.Tensor:
        """Set the per-scan merged weights from ``x`` (batch of 1) and return the output."""
        folded = [m for m in self.module.modules() if isinstance(m, ConvNorm)]
        for m in folded:
            m.calibrating = True
        try:
            with torch.no_grad():
                return self.module(x)
        finally:
            for m in folded:
                m.calibrating = False


class _Tracer(fx.Tracer):
    """Keeps normalisation layers (and subclasses with their own ``forward``) as single modules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, NORM_LAYERS) or super().is_leaf_module(m, module_qualified_name)


def _replace_node_with_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, args: tuple, name: str) -> fx.Node:
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, args=args)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _arg(node: fx.Node, index: int, key: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def canonize(model: nn.Module) -> CanonicalModel:
    """An equivalent copy of ``model`` that captum's LRP propagates through exactly (see the module doc).

    Args:
        model: a network traceable by :func:`torch.fx.symbolic_trace` (all bids-siamese backbones are).

    Returns:
        The canonised model; the original is not modified.

    Raises:
        TypeError: the network uses an operation LRP cannot handle here (e.g. ``F.normalize`` or a product of
            two tensors inside the network).

    Examples:
        >>> net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.ReLU(inplace=True))
        >>> canon = canonize(net.eval())
        >>> sorted(type(m).__name__ for m in canon.module.children())
        ['ConvNorm', 'ReLU']
    """
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as err:  # pragma: no cover - every bundled backbone traces
        raise TypeError(f"LRP: the model cannot be traced by torch.fx ({err})") from err
    graph = gm.graph
    counter = iter(range(1_000_000))

    def fresh(prefix: str) -> str:
        return f"lrp_{prefix}_{next(counter)}"

    def module_of(node: fx.Node) -> nn.Module | None:
        return gm.get_submodule(node.target) if node.op == "call_module" else None

    # 1. drop dropout/identity modules and functional dropout (eval mode: identity)
    for node in list(graph.nodes):
        mod = module_of(node)
        if isinstance(mod, _DROPOUT) or (node.op == "call_function" and node.target in (F.dropout, F.dropout3d,
                                                                                        F.dropout2d)):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)

    # nn.Flatten / nn.Unflatten modules -> tensor methods (pure re-indexing, no rule needed)
    for node in list(graph.nodes):
        mod = module_of(node)
        if isinstance(mod, nn.Flatten):
            with graph.inserting_after(node):
                new = graph.call_function(torch.flatten, args=(node.args[0], mod.start_dim, mod.end_dim))
            node.replace_all_uses_with(new)
            graph.erase_node(node)

    # 2. merge normalisations into the convolution that feeds them
    needs_calibration = False
    for node in list(graph.nodes):
        mod = module_of(node)
        if not isinstance(mod, NORM_LAYERS):
            continue
        source = node.args[0]
        src_mod = module_of(source) if isinstance(source, fx.Node) else None
        if isinstance(src_mod, CONV_LAYERS) and len(source.users) == 1:
            fused = ConvNorm(src_mod, mod)
            needs_calibration |= not fused.static
            name = fresh("convnorm")
            gm.add_submodule(name, fused)
            source.target = name
            node.replace_all_uses_with(source)
            graph.erase_node(node)
        elif isinstance(src_mod, nn.Linear) and isinstance(mod, nn.BatchNorm1d) and len(source.users) == 1:
            scale = mod.weight.detach() / torch.sqrt(mod.running_var + mod.eps) if mod.affine else 1.0 / torch.sqrt(
                mod.running_var + mod.eps)
            shift = (mod.bias.detach() if mod.affine else 0.0) - mod.running_mean * scale
            lin = copy.deepcopy(src_mod)
            lin.weight.data = lin.weight.data * scale[:, None]
            bias = lin.bias.data if lin.bias is not None else torch.zeros(lin.out_features)
            lin.bias = nn.Parameter(bias * scale + shift)
            name = fresh("linearnorm")
            gm.add_submodule(name, lin)
            source.target = name
            node.replace_all_uses_with(source)
            graph.erase_node(node)

    # BatchNorm (eval) feeding a linear layer: merged into that layer (W (a x + b) + c)
    for node in list(graph.nodes):
        mod = module_of(node)
        if not isinstance(mod, _BATCHNORM) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        lin = module_of(user)
        if not isinstance(lin, nn.Linear) or mod.running_mean is None:
            continue
        std = torch.sqrt(mod.running_var + mod.eps)
        scale = (mod.weight.detach() if mod.affine else torch.ones_like(std)) / std
        shift = (mod.bias.detach() if mod.affine else torch.zeros_like(std)) - mod.running_mean * scale
        merged = copy.deepcopy(lin)
        bias = lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features)
        merged.weight = nn.Parameter(lin.weight.detach() * scale[None, :])
        merged.bias = nn.Parameter(bias + lin.weight.detach() @ shift)
        name = fresh("normlinear")
        gm.add_submodule(name, merged)
        user.target = name
        user.replace_input_with(node, node.args[0])
        graph.erase_node(node)

    # 3. functional operations -> modules
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add) or (
            node.op == "call_method" and node.target in ("add", "add_", "__add__", "__iadd__")
        ):
            a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
            if isinstance(a, fx.Node) and isinstance(b, fx.Node) and "alpha" not in node.kwargs:
                _replace_node_with_module(gm, node, Addition_Module(), (a, b), fresh("add"))
        elif node.op == "call_function" and node.target in (torch.cat, torch.concat):
            tensors = _arg(node, 0, "tensors")
            dim = _arg(node, 1, "dim", 0)
            _replace_node_with_module(gm, node, Concat(dim), tuple(tensors), fresh("cat"))
        elif (node.op == "call_method" and node.target == "mean") or (
            node.op == "call_function" and node.target is torch.mean
        ):
            dim = _arg(node, 1, "dim", None)
            if dim is None:
                raise TypeError("LRP: a mean over all dimensions (batch included) is not supported")
            _replace_node_with_module(gm, node, Reduce("mean", dim, _arg(node, 2, "keepdim", False)), (node.args[0],),
                                      fresh("mean"))
        elif (node.op == "call_method" and node.target == "amax") or (
            node.op == "call_function" and node.target is torch.amax
        ):
            dim = _arg(node, 1, "dim", None)
            _replace_node_with_module(gm, node, Reduce("amax", dim, _arg(node, 2, "keepdim", False)), (node.args[0],),
                                      fresh("amax"))
        elif (node.op == "call_function" and node.target in (F.relu, torch.relu)) or (
            node.op == "call_method" and node.target == "relu"
        ):
            _replace_node_with_module(gm, node, nn.ReLU(), (node.args[0],), fresh("relu"))
        elif node.op == "call_function" and node.target is F.normalize:
            raise TypeError("LRP: F.normalize inside the network; explain the embedding before normalisation "
                            "(see embedding_network)")
        elif node.op in ("call_function", "call_method") and node.target in (operator.mul, operator.sub, torch.mul,
                                                                            "mul", "sub", "__mul__", "__sub__"):
            if sum(isinstance(a, fx.Node) for a in node.args) > 1:
                raise TypeError(f"LRP: product/difference of two tensors ({node.target}) is not supported")

    # 4. one module per call
    seen: set[str] = set()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        if node.target in seen:
            name = fresh("copy")
            gm.add_submodule(name, copy.deepcopy(gm.get_submodule(node.target)))
            node.target = name
        seen.add(node.target)

    # 5. one branch module per use of a tensor that has several uses
    for node in list(graph.nodes):
        users = [u for u in node.users if u.op != "output"]
        if len(users) < 2:
            continue
        for user in users:
            if user.op == "call_method" and user.target in ("size", "dim"):
                continue
            name = fresh("branch")
            gm.add_submodule(name, Branch())
            with graph.inserting_before(user):
                branch = graph.call_module(name, args=(node,))
            user.replace_input_with(node, branch)

    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return CanonicalModel(module=gm, needs_calibration=needs_calibration)
