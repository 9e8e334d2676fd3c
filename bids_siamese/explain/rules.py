"""LRP rules for a canonised network (:mod:`bids_siamese.explain.canonize`), in captum's scheme.

Rule sets (``rules=``):

* ``epsilon_plus`` (default): the w-square rule on the first convolution (its input, a normalised T1w, has
  negative values), z+ (``Alpha1_Beta0``, bias ignored) on every other convolution, the epsilon rule on
  linear layers and on the structural modules (additions, concatenations, pooling, branches), each with a
  stabiliser relative to the layer's mean |output|;
* ``epsilon``: the epsilon rule everywhere (``epsilon=1e-9`` is LRP-0). On a network without biases it
  conserves relevance exactly: the input relevance sums to the target.

The relative stabilisers are computed per scan (over each scan's own output of the layer), so a batch of
scans gets the same relevance maps as the scans one at a time.
"""
from __future__ import annotations

import torch
from captum.attr._utils.custom_modules import Addition_Module
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, IdentityRule, PropagationRule
from torch import nn

from .canonize import (CONV_LAYERS, NORM_LAYERS, PASS_ACTIVATIONS, POOL_LAYERS, Branch, Concat, ConvNorm, Reduce,
                       ScanReadout)

__all__ = ["RULE_SETS", "StabilisedEpsilonRule", "ZPlusRule", "WSquareRule", "attach_rules"]

RULE_SETS = ("epsilon_plus", "epsilon")
#: ``epsilon_plus``: stabiliser of z+ and linear layers, relative to the layer's mean |output|.
PLUS_RELATIVE_EPSILON = 0.1
#: ``epsilon_plus``: stabiliser of additions, concatenations, pooling and branches (nearly exact).
STRUCTURAL_RELATIVE_EPSILON = 1e-3


def per_scan_mean_abs(outputs: torch.Tensor) -> torch.Tensor:
    """``mean|z|`` of a layer's output per scan (batch element), shaped to broadcast against ``outputs``.

    Examples:
        >>> per_scan_mean_abs(torch.tensor([[1.0, -3.0], [0.5, 0.5]])).tolist()
        [[2.0], [0.5]]
    """
    return outputs.detach().abs().reshape(outputs.shape[0], -1).mean(1).reshape(-1, *([1] * (outputs.dim() - 1)))


class _Stabilised:
    """Mixin: the stabiliser added to ``z`` is ``epsilon + relative * mean|z|`` over the scan's layer output.

    A stabiliser relative to the layer's activation scale (as recommended for LRP-epsilon) absorbs the
    relevance of units whose output is near zero instead of letting it explode; ``relative = 0`` keeps
    captum's absolute epsilon (and exact conservation).
    """

    epsilon: float = 1e-9
    relative: float = 0.0

    def _create_backward_hook_output(self, outputs: torch.Tensor):
        scale = self.epsilon + self.relative * per_scan_mean_abs(outputs)

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
    first_conv = next((m for m in leaves if isinstance(m, CONV_LAYERS + (ConvNorm,))), None)
    for m in leaves:
        if isinstance(m, nn.ReLU):  # captum passes relevance through ReLU itself
            if hasattr(m, "rule"):
                del m.rule
            continue
        if isinstance(m, NORM_LAYERS + PASS_ACTIVATIONS):
            m.rule = IdentityRule()
        elif isinstance(m, CONV_LAYERS + (ConvNorm,)):
            if not plus:
                m.rule = StabilisedEpsilonRule(epsilon)
            elif m is first_conv:
                m.rule = WSquareRule(epsilon)
            else:
                m.rule = ZPlusRule(epsilon, relative=PLUS_RELATIVE_EPSILON)
        elif isinstance(m, (nn.Linear, ScanReadout)):
            m.rule = StabilisedEpsilonRule(epsilon, relative=PLUS_RELATIVE_EPSILON if plus else 0.0)
        elif isinstance(m, (Addition_Module, Concat, Reduce, Branch) + POOL_LAYERS):
            m.rule = StabilisedEpsilonRule(epsilon, relative=STRUCTURAL_RELATIVE_EPSILON if plus else 0.0)
        else:
            raise TypeError(f"LRP: no rule for layer type {type(m).__name__}")
    return module
