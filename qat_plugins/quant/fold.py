"""BatchNorm folding as the QAT layers compute it in eval mode: torch.ao fused modules and torchao's
PT2E conv-bn pattern. Shared by the exporter (``qat_plugins.export``) and :mod:`.bias`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase

__all__ = ["fold_bn", "bn_fold_pattern", "const_value", "graph_attr", "is_pt2e_graph"]

_aten = torch.ops.aten
_CONVS = {_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default}
_LINEAR = {_aten.linear.default}
_BN = {_aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default}


def is_pt2e_graph(model: nn.Module) -> bool:
    """A GraphModule whose conv / linear weights come through fake-quantizer ``call_module`` nodes."""
    if not isinstance(model, torch.fx.GraphModule):
        return False
    for n in model.graph.nodes:
        if n.op == "call_function" and n.target in _CONVS | _LINEAR and len(n.args) > 1 \
                and isinstance(n.args[1], torch.fx.Node) and n.args[1].op == "call_module":
            try:
                if isinstance(model.get_submodule(str(n.args[1].target)), FakeQuantizeBase):
                    return True
            except AttributeError:
                continue
    return False


def fold_bn(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Folded weight (computed as the QAT module does) and folded bias, eval-mode BN stats."""
    w = mod.weight.detach()
    bn = getattr(mod, "bn", None)
    b = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
    if bn is None:
        return w, b
    if bn.training:
        raise ValueError(
            f"BatchNorm inside {type(mod).__name__} is still in training mode in eval(); call "
            "model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats) or model.eval() before export")
    if bn.running_var is None or bn.running_mean is None or bn.weight is None:
        raise ValueError(f"{type(mod).__name__}: BatchNorm without running statistics / affine "
                         "parameters cannot be folded for export")
    running_std = torch.sqrt(bn.running_var + bn.eps)
    scale_factor = bn.weight / running_std
    wshape = [1] * w.dim()
    wshape[0] = -1
    w_fold = w * scale_factor.reshape(wshape)
    mean = bn.running_mean - (b if b is not None else 0)
    bias = bn.bias - bn.weight * mean / running_std
    return w_fold.detach(), bias.detach()


def const_value(gm: torch.fx.GraphModule, node: Any, memo: dict[torch.fx.Node, Any]) -> Any:
    """Evaluate ``node`` if it depends on parameters / buffers / literals only, else raise KeyError."""
    if not isinstance(node, torch.fx.Node):
        if isinstance(node, (list, tuple)):
            return type(node)(const_value(gm, a, memo) for a in node)
        return node
    if node in memo:
        return memo[node]
    if node.op == "get_attr":
        val: Any = graph_attr(gm, str(node.target))
    elif node.op == "call_function" and node.target not in _CONVS | _LINEAR:
        args = [const_value(gm, a, memo) for a in node.args]
        kwargs = {k: const_value(gm, v, memo) for k, v in node.kwargs.items()}
        val = node.target(*args, **kwargs)
    else:
        raise KeyError(node.name)
    memo[node] = val
    return val


def graph_attr(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    """The (detached) parameter / buffer / attribute at dotted ``target`` of ``gm``."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach() if isinstance(obj, torch.Tensor) else obj


def _single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def bn_fold_pattern(gm: torch.fx.GraphModule, conv: torch.fx.Node,
                    memo: dict[torch.fx.Node, Any] | None = None) -> tuple[torch.Tensor, torch.fx.Node] | None:
    """``(folded bias, batch_norm node)`` if ``conv`` heads torchao's ``/ k [+ b] -> batch_norm(eval)``
    pattern (a conv bias ahead of the pattern not included), else ``None``. The graph is not changed."""
    memo = {} if memo is None else memo
    div = _single_user(conv)
    if div is None or div.target is not _aten.div.Tensor or div.args[0] is not conv:
        return None
    try:
        k = const_value(gm, div.args[1], memo).reshape(-1)
        cur, b = div, torch.zeros_like(k)
        nxt = _single_user(cur)
        if nxt is not None and nxt.target is _aten.add.Tensor and nxt.args[0] is cur:
            b = b + const_value(gm, nxt.args[1], memo).reshape(-1)
            cur, nxt = nxt, _single_user(nxt)
        if nxt is None or nxt.target not in _BN or nxt.args[0] is not cur:
            return None
        gamma, beta, mean, var = (const_value(gm, a, memo) for a in nxt.args[1:5])
        eps = nxt.args[7] if nxt.target is _aten.batch_norm.default else nxt.args[6]
        training = nxt.args[5] if nxt.target is _aten.batch_norm.default else False
    except KeyError:
        return None
    if training:
        return None
    inv_std = 1.0 / torch.sqrt(var + eps)
    g = gamma if gamma is not None else torch.ones_like(mean)
    # batch_norm(y / k + b) = y * g / (std * k) + (b - mean) * g / std + beta; g / (std * k) is 1 up to
    # float rounding by construction of torchao's pattern (k = g / std) -- checked, not assumed
    ratio = g * inv_std / k
    if not torch.allclose(ratio, torch.ones_like(ratio), rtol=1e-4, atol=0):
        return None
    if nxt.target is not _aten.batch_norm.default:  # _native_batch_norm_legit_*: a tuple, getitem 0
        return None
    bias = (b - mean) * g * inv_std + (beta if beta is not None else 0)
    return bias.detach().float(), nxt
