"""Layer-wise relevance propagation (LRP) for the 3D Siamese encoders, through captum.

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

Relevance *targets* (what is explained), from the scan's embedding ``u`` (unit length when the model
L2-normalises; the normalisation itself, being scale-free, is not propagated through: relevance is
assigned to the pre-normalisation embedding, which is proportional to ``u``):

* ``embedding`` (as in the twin-identification paper): the embedding summed over its dimensions,
  ``sum_k u_k``;
* ``embedding_abs`` (the default of :func:`bids_siamese.explain.run.run_explain`): ``sum_k |u_k|``. The sign of
  an embedding dimension is arbitrary, so with the signed sum dimensions of opposite sign cancel and a
  scan's target can be near zero or negative; with the absolute values every dimension contributes its
  magnitude. On the demo dataset this target ranks the planted family regions highest (docs/benchmarks.md);
* ``distance``: the distance of a pair of scans. Both distances decompose exactly over embedding
  dimensions (cosine: ``1 - u.v = sum_k (u_k - v_k)^2 / 2``; euclidean: ``d = sum_k (e_k - f_k)^2 / d``);
  each scan of the pair receives half of every dimension's share, which LRP propagates to its voxels, so
  the two maps together sum to ``d``.

Rule sets (``rules=``):

* ``epsilon_plus`` (default): z+ (``Alpha1_Beta0``, bias ignored) on every convolution but the first, the
  epsilon rule on the first convolution (its input, a normalised T1w, has negative values), on linear
  layers and on the structural modules;
* ``epsilon``: the epsilon rule everywhere (``epsilon=1e-9`` is LRP-0). On a network without biases it
  conserves relevance exactly: the input relevance sums to the target. Used by the tests.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from captum.attr import LRP
from captum.attr._utils.custom_modules import Addition_Module
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, IdentityRule, PropagationRule
from torch import nn

__all__ = [
    "RULE_SETS",
    "TARGETS",
    "CanonicalModel",
    "canonize",
    "embedding_network",
    "relevance_embedding",
    "relevance_pair_distance",
    "relevance_distance_to",
    "distance_shares",
]

TARGETS = ("embedding", "embedding_abs", "distance")
RULE_SETS = ("epsilon_plus", "epsilon")
#: ``epsilon_plus``: stabiliser of z+ and linear layers, relative to the layer's mean |output|.
PLUS_RELATIVE_EPSILON = 0.1
#: ``epsilon_plus``: stabiliser of additions, concatenations, pooling and branches (nearly exact).
STRUCTURAL_RELATIVE_EPSILON = 1e-3

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_INSTANCENORM = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_NORMS = _BATCHNORM + _INSTANCENORM + (nn.GroupNorm,)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_PASS_ACTIVATIONS = (nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Softplus, nn.ReLU6, nn.Mish,
                     nn.Tanh, nn.Sigmoid)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_SHAPE_OPS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "permute", "contiguous", "transpose",
              "split", "chunk", "size", "dim", "__getitem__"}


# ----------------------------------------------------------------------------------------------------------
# Structural modules that replace functional operations
# ----------------------------------------------------------------------------------------------------------
class _Branch(nn.Module):
    """Identity for one use of a tensor that has several uses (keeps captum's bookkeeping exact)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class _Concat(nn.Module):
    """``torch.cat`` as a module (dense connections)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = int(dim)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.dim)


class _Mean(nn.Module):
    """``x.mean(dim)`` as a module (global average pooling)."""

    def __init__(self, dim: Any, keepdim: bool = False):
        super().__init__()
        self.dim = dim
        self.keepdim = bool(keepdim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=self.dim, keepdim=self.keepdim)


class _AMax(nn.Module):
    """``x.amax(dim)`` as a module (global max pooling): relevance goes to the maximum."""

    def __init__(self, dim: Any, keepdim: bool = False):
        super().__init__()
        self.dim = dim
        self.keepdim = bool(keepdim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=self.dim, keepdim=self.keepdim)


class _ConvNorm(nn.Module):
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

    def calibrate(self, x: torch.Tensor) -> torch.Tensor:
        """Set the per-scan merged weights from ``x`` (batch of 1) and return the output."""
        folded = [m for m in self.module.modules() if isinstance(m, _ConvNorm)]
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
        return isinstance(m, _NORMS) or super().is_leaf_module(m, module_qualified_name)


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
        ['ReLU', '_ConvNorm']
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
        if not isinstance(mod, _NORMS):
            continue
        source = node.args[0]
        src_mod = module_of(source) if isinstance(source, fx.Node) else None
        if isinstance(src_mod, _CONV) and len(source.users) == 1:
            fused = _ConvNorm(src_mod, mod)
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
            _replace_node_with_module(gm, node, _Concat(dim), tuple(tensors), fresh("cat"))
        elif (node.op == "call_method" and node.target == "mean") or (
            node.op == "call_function" and node.target is torch.mean
        ):
            dim = _arg(node, 1, "dim", None)
            if dim is None:
                raise TypeError("LRP: a mean over all dimensions (batch included) is not supported")
            _replace_node_with_module(gm, node, _Mean(dim, _arg(node, 2, "keepdim", False)), (node.args[0],),
                                      fresh("mean"))
        elif (node.op == "call_method" and node.target == "amax") or (
            node.op == "call_function" and node.target is torch.amax
        ):
            dim = _arg(node, 1, "dim", None)
            _replace_node_with_module(gm, node, _AMax(dim, _arg(node, 2, "keepdim", False)), (node.args[0],),
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
            gm.add_submodule(name, _Branch())
            with graph.inserting_before(user):
                branch = graph.call_module(name, args=(node,))
            user.replace_input_with(node, branch)

    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return CanonicalModel(module=gm, needs_calibration=needs_calibration)


# ----------------------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------------------
class _Stabilised:
    """Mixin: the stabiliser added to ``z`` is ``epsilon + relative * mean|z|`` over the layer's output.

    A stabiliser relative to the layer's activation scale (as recommended for LRP-epsilon) absorbs the
    relevance of units whose output is near zero instead of letting it explode; ``relative = 0`` keeps
    captum's absolute epsilon (and exact conservation).
    """

    epsilon: float = 1e-9
    relative: float = 0.0

    def _create_backward_hook_output(self, outputs: torch.Tensor):
        scale = self.epsilon + self.relative * float(outputs.abs().mean())

        def _backward_hook_output(grad: torch.Tensor) -> torch.Tensor:
            sign = torch.sign(outputs)
            sign[sign == 0] = 1
            self.relevance_output[grad.device] = grad.data
            return grad / (outputs + sign * scale)

        return _backward_hook_output


class StabilisedEpsilonRule(_Stabilised, EpsilonRule):
    """LRP-epsilon with the stabiliser ``epsilon + relative * mean|z|``."""

    def __init__(self, epsilon: float = 1e-9, relative: float = 0.0) -> None:
        EpsilonRule.__init__(self, epsilon)
        self.epsilon, self.relative = float(epsilon), float(relative)


class ZPlusRule(_Stabilised, Alpha1_Beta0_Rule):
    """z+ (alpha=1, beta=0): positive weights only, bias ignored; stabiliser relative to mean|z|."""

    def __init__(self, epsilon: float = 1e-9, relative: float = 0.0) -> None:
        Alpha1_Beta0_Rule.__init__(self, set_bias_to_zero=True)
        self.epsilon, self.relative = float(epsilon), float(relative)


class WSquareRule(_Stabilised, PropagationRule):
    """The w-square rule for the first layer: ``R_i = sum_j w_ij^2 / sum_i' w_i'j^2 R_j``.

    Relevance is spread over each unit's receptive field by the squared weights, independently of the sign
    of the input intensities (a normalised T1w is negative below its median). Implemented in captum's
    scheme by squaring the weights, zeroing the bias and feeding ones instead of the input in the
    propagation pass.
    """

    def __init__(self, epsilon: float = 1e-9) -> None:
        self.epsilon, self.relative = float(epsilon), 0.0

    def forward_hook_weights(self, module, inputs, outputs) -> None:
        device = inputs[0].device
        if hasattr(module, "activations") and device in module.activations:
            raise RuntimeError(f"Module {module} is used more than once in the network")
        module.activations[device] = tuple(torch.ones_like(i.data) for i in inputs)
        self._manipulate_weights(module, inputs, outputs)

    def _manipulate_weights(self, module, inputs, outputs) -> None:
        module.weight.data = module.weight.data ** 2
        if getattr(module, "bias", None) is not None:
            module.bias.data = torch.zeros_like(module.bias.data)


def _leaf_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if len(list(m.children())) == 0]


def attach_rules(module: nn.Module, rules: str = "epsilon_plus", epsilon: float = 1e-9) -> nn.Module:
    """Give every leaf module of a canonised network its LRP rule (``module.rule``), in place.

    Args:
        module: a canonised network (possibly wrapped with a readout layer).
        rules: ``epsilon_plus`` or ``epsilon`` (see the module doc).
        epsilon: the absolute stabiliser of every rule.

    Raises:
        TypeError: a leaf module has no known rule.
    """
    if rules not in RULE_SETS:
        raise ValueError(f"rules must be one of {RULE_SETS}, got {rules!r}")
    plus = rules == "epsilon_plus"
    leaves = _leaf_modules(module)
    first_conv = next((m for m in leaves if isinstance(m, _CONV + (_ConvNorm,))), None)
    for m in leaves:
        if isinstance(m, nn.ReLU):  # captum passes relevance through ReLU itself
            if hasattr(m, "rule"):
                del m.rule
            continue
        if isinstance(m, _NORMS + _PASS_ACTIVATIONS):
            m.rule = IdentityRule()
        elif isinstance(m, _CONV + (_ConvNorm,)):
            if not plus:
                m.rule = StabilisedEpsilonRule(epsilon)
            elif m is first_conv:
                m.rule = WSquareRule(epsilon)
            else:
                m.rule = ZPlusRule(epsilon, relative=PLUS_RELATIVE_EPSILON)
        elif isinstance(m, nn.Linear):
            m.rule = StabilisedEpsilonRule(epsilon, relative=PLUS_RELATIVE_EPSILON if plus else 0.0)
        elif isinstance(m, (Addition_Module, _Concat, _Mean, _AMax, _Branch) + _POOLS):
            m.rule = StabilisedEpsilonRule(epsilon, relative=STRUCTURAL_RELATIVE_EPSILON if plus else 0.0)
        else:
            raise TypeError(f"LRP: no rule for layer type {type(m).__name__}")
    return module


# ----------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------
def embedding_network(model: nn.Module) -> tuple[nn.Module, bool]:
    """The part of a bids-siamese model that maps one scan to its *pre-normalisation* embedding.

    Args:
        model: a :class:`~bids_siamese.models.heads.SiameseEncoder`, a
            :class:`~bids_siamese.models.heads.LongitudinalSiamese` (its shared encoder) or any network mapping
            ``(B, 1, X, Y, Z)`` to ``(B, D)``.

    Returns:
        ``(network, normalised)``: a copy without the final L2 normalisation, and whether the model's
        embeddings are L2-normalised.
    """
    net = getattr(model, "module", model)
    if hasattr(net, "encoder") and hasattr(net, "fuse"):
        net = net.encoder
    net = copy.deepcopy(net).eval()
    head = getattr(net, "head", None)
    normalised = bool(getattr(head, "normalize", False))
    if head is not None and hasattr(head, "normalize"):
        head.normalize = False
    return net, normalised


class _Readout(nn.Module):
    """Canonised network followed by a fixed linear readout ``sum_k w_k e_k`` (the LRP target)."""

    def __init__(self, body: nn.Module, weights: torch.Tensor):
        super().__init__()
        self.body = body
        self.readout = nn.Linear(weights.numel(), 1, bias=False)
        self.readout.weight.data = weights.reshape(1, -1).to(self.readout.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.body(x))


def _as_input(volume: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(volume, dtype=np.float32)) if not isinstance(volume, torch.Tensor) else volume
    x = x.float()
    while x.dim() < 5:
        x = x.unsqueeze(0)
    if x.shape[0] != 1:
        raise ValueError("explain one scan at a time (a 3D volume or a (1, 1, X, Y, Z) tensor)")
    return x


def _safe_ratio(num: torch.Tensor, den: torch.Tensor, tiny: float = 1e-12) -> torch.Tensor:
    ok = den.abs() > tiny
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _propagate(canon: CanonicalModel, x: torch.Tensor, shares: Callable[[torch.Tensor], torch.Tensor],
               rules: str, epsilon: float) -> tuple[np.ndarray, float]:
    """LRP of ``sum_k shares(e)_k`` for the single scan ``x``; returns (input relevance, target value)."""
    with torch.no_grad():
        e = canon.calibrate(x) if canon.needs_calibration else canon.module(x)
    e = e.reshape(-1)
    c = shares(e).reshape(-1)
    weights = _safe_ratio(c, e)
    wrapped = _Readout(canon.module, weights).eval()
    attach_rules(wrapped, rules=rules, epsilon=epsilon)
    relevance = LRP(wrapped).attribute(x.clone().requires_grad_(True), target=0)
    target = float((weights * e).sum())
    return relevance.detach().reshape(x.shape[2:]).cpu().numpy().astype(np.float32), target


def relevance_embedding(model: nn.Module | CanonicalModel, volume: np.ndarray | torch.Tensor, target: str = "embedding",
                        normalised: bool = True, rules: str = "epsilon_plus", epsilon: float = 1e-9) -> np.ndarray:
    """LRP relevance map of one scan for its embedding.

    Args:
        model: the embedding network (pre-normalisation, see :func:`embedding_network`) or its
            :func:`canonize` result (faster when explaining many scans).
        volume: the scan on the model grid, ``(X, Y, Z)`` or ``(1, 1, X, Y, Z)``.
        target: ``embedding`` (``sum_k u_k``) or ``embedding_abs`` (``sum_k |u_k|``).
        normalised: whether the model's embeddings are unit length (``u = e / |e|``); else ``u = e``.
        rules: rule set (``epsilon_plus`` or ``epsilon``).
        epsilon: the epsilon rule's stabiliser.

    Returns:
        Relevance per voxel, same spatial shape as ``volume`` (float32), summing (up to bias absorption)
        to the target.

    Examples:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Conv3d(1, 2, 3, bias=False), nn.ReLU(), nn.Flatten(1),
        ...                     nn.Linear(2 * 6 ** 3, 4, bias=False))
        >>> vol = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
        >>> r = relevance_embedding(net, vol, normalised=False, rules="epsilon")
        >>> e = net(torch.as_tensor(vol)[None, None]).sum().item()
        >>> bool(abs(r.sum() - e) < 1e-3 * max(1.0, abs(e)))
        True
    """
    if target not in ("embedding", "embedding_abs"):
        raise ValueError(f"target must be embedding or embedding_abs here, got {target!r}")
    canon = model if isinstance(model, CanonicalModel) else canonize(model)
    x = _as_input(volume)

    def shares(e: torch.Tensor) -> torch.Tensor:
        u = e / e.norm().clamp_min(1e-12) if normalised else e
        return u.abs() if target == "embedding_abs" else u

    return _propagate(canon, x, shares, rules, epsilon)[0]


def distance_shares(e_a: torch.Tensor, e_b: torch.Tensor, distance: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-dimension decomposition of a pair distance, half to each scan.

    Args:
        e_a: embedding of the first scan (pre-normalisation), shape ``(D,)``.
        e_b: embedding of the second scan.
        distance: ``cosine`` (``1 - cos``) or ``euclidean``.

    Returns:
        ``(c_a, c_b)``, each ``(D,)`` and non-negative, with ``c_a.sum() + c_b.sum()`` equal to the distance.

    Examples:
        >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
        >>> ca, cb = distance_shares(a, b, "cosine")
        >>> round(float(ca.sum() + cb.sum()), 6)
        1.0
        >>> ca, cb = distance_shares(a, b, "euclidean")
        >>> round(float(ca.sum() + cb.sum()), 4)
        2.2361
    """
    if distance == "cosine":
        u = e_a / e_a.norm().clamp_min(1e-12)
        v = e_b / e_b.norm().clamp_min(1e-12)
        per_dim = (u - v) ** 2 / 2.0
    elif distance == "euclidean":
        diff2 = (e_a - e_b) ** 2
        per_dim = diff2 / diff2.sum().sqrt().clamp_min(1e-12)
    else:
        raise ValueError(f"distance must be cosine or euclidean, got {distance!r}")
    return per_dim / 2.0, per_dim / 2.0


def relevance_pair_distance(model: nn.Module | CanonicalModel, volume_a: np.ndarray | torch.Tensor,
                            volume_b: np.ndarray | torch.Tensor, distance: str = "cosine",
                            rules: str = "epsilon_plus", epsilon: float = 1e-9) -> tuple[np.ndarray, np.ndarray, float]:
    """LRP relevance maps of a pair of scans for their embedding distance.

    Args:
        model: the embedding network (pre-normalisation) or its :func:`canonize` result.
        volume_a: first scan on the model grid.
        volume_b: second scan.
        distance: ``cosine`` or ``euclidean`` (as the model was trained).
        rules: rule set.
        epsilon: the epsilon rule's stabiliser.

    Returns:
        ``(relevance_a, relevance_b, distance_value)``; the two maps together sum (up to bias absorption) to
        the distance.

    Examples:
        >>> net = nn.Sequential(nn.Flatten(1), nn.Linear(27, 3, bias=False))
        >>> rng = np.random.default_rng(1)
        >>> ra, rb, d = relevance_pair_distance(net, rng.random((3, 3, 3)), rng.random((3, 3, 3)), rules="epsilon")
        >>> bool(abs(ra.sum() + rb.sum() - d) < 1e-4)
        True
    """
    canon = model if isinstance(model, CanonicalModel) else canonize(model)
    xa, xb = _as_input(volume_a), _as_input(volume_b)
    with torch.no_grad():
        ea = (canon.calibrate(xa) if canon.needs_calibration else canon.module(xa)).reshape(-1)
        eb = (canon.calibrate(xb) if canon.needs_calibration else canon.module(xb)).reshape(-1)
    ca, cb = distance_shares(ea, eb, distance)
    ra, _ = _propagate(canon, xa, lambda e: ca, rules, epsilon)
    rb, _ = _propagate(canon, xb, lambda e: cb, rules, epsilon)
    return ra, rb, float(ca.sum() + cb.sum())


def relevance_distance_to(model: nn.Module | CanonicalModel, volume: np.ndarray | torch.Tensor,
                          other_embedding: torch.Tensor | np.ndarray, distance: str = "cosine",
                          rules: str = "epsilon_plus", epsilon: float = 1e-9) -> tuple[np.ndarray, float]:
    """LRP map of one scan for its share of the distance to another scan's (pre-normalisation) embedding.

    The same as the first map of :func:`relevance_pair_distance`, without propagating the other scan.

    Returns:
        ``(relevance, the scan's share of the distance)`` (the share is half the distance).

    Examples:
        >>> net = nn.Sequential(nn.Flatten(1), nn.Linear(8, 3, bias=False))
        >>> rng = np.random.default_rng(2)
        >>> a, b = rng.random((2, 2, 2)), rng.random((2, 2, 2))
        >>> eb = net(torch.as_tensor(b, dtype=torch.float32).reshape(1, 1, 2, 2, 2))[0].detach()
        >>> r, share = relevance_distance_to(net, a, eb, rules="epsilon")
        >>> bool(abs(r.sum() - share) < 1e-5)
        True
    """
    canon = model if isinstance(model, CanonicalModel) else canonize(model)
    x = _as_input(volume)
    with torch.no_grad():
        e = (canon.calibrate(x) if canon.needs_calibration else canon.module(x)).reshape(-1)
    c, _ = distance_shares(e, torch.as_tensor(np.asarray(other_embedding), dtype=e.dtype).reshape(-1), distance)
    relevance, _ = _propagate(canon, x, lambda _e: c, rules, epsilon)
    return relevance, float(c.sum())


def explain_scans(model: nn.Module, volumes: Iterable[np.ndarray], target: str = "embedding",
                  rules: str = "epsilon_plus") -> list[np.ndarray]:
    """Relevance maps of several scans for a bids-siamese model (embedding targets).

    Args:
        model: a trained bids-siamese model (see :func:`embedding_network`).
        volumes: scans on the model grid.
        target: ``embedding`` or ``embedding_abs``.
        rules: rule set.
    """
    net, normalised = embedding_network(model)
    canon = canonize(net)
    return [relevance_embedding(canon, v, target=target, normalised=normalised, rules=rules) for v in volumes]
