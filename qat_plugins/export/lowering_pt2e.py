"""Integer weights for PT2E graphs (torchao ``prepare_qat_pt2e``): weight fake quantizers -> stored
integer weights, torchao's simulated conv-bn fold -> a folded bias.

In a PT2E graph a weight reaches its conv / linear as ``get_attr`` (times torchao's per-channel
``gamma / sqrt(running_var + eps)`` for conv-bn) -> fake quantizer. In eval mode that input is a
constant, so :func:`lower_pt2e_weights` evaluates it, lets ``make_weight`` build the integer weight
module, and calls that module instead of the fake quantizer. torchao's conv-bn QAT pattern
``batch_norm(conv(x, fq(w * k)) / k [+ b]) `` equals ``conv(x, fq(w * k)) + bias'`` with
``k = gamma / sqrt(running_var + eps)`` and ``bias' = (b - running_mean) * k + beta``, so the division
and the batch norm are removed and the conv gets ``bias'`` (what ``convert_pt2e`` folds, without its
minute of pattern tracing).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..quant.fold import bn_fold_pattern, const_value, is_pt2e_graph

__all__ = ["lower_pt2e_weights", "is_pt2e_graph"]

_aten = torch.ops.aten
_CONVS = {_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default}
_LINEAR = {_aten.linear.default}
MakeWeight = Callable[[str, str, nn.Module, torch.Tensor], nn.Module]


def _fold_bn(gm: torch.fx.GraphModule, conv: torch.fx.Node, memo: dict[torch.fx.Node, Any]) -> torch.Tensor | None:
    """If ``conv`` heads torchao's conv-bn pattern, rewire the batch norm's users to ``conv`` and return
    the folded bias (else ``None``)."""
    found = bn_fold_pattern(gm, conv, memo)
    if found is None:
        return None
    bias, bn_out = found
    bn_out.replace_all_uses_with(conv)
    return bias


def lower_pt2e_weights(gm: torch.fx.GraphModule, make_weight: MakeWeight) -> int:
    """Replace the weight fake quantizers of conv / linear nodes (eval-mode ``gm``, in place).

    ``make_weight(name, layer_type, fake_quantizer, weight)`` returns the module whose ``forward()``
    gives the weight (integer + DequantizeLinear, or float). The module is registered as
    ``<module path>.w`` (so ONNX initializers are named ``layer1.conv1.w.qweight``). Returns the
    number of weights lowered.
    """
    # quant.pt2e imports the optional torchao at import time: only PT2E graphs (torchao installed) get here
    from ..quant.pt2e import is_fake_quant_node, pt2e_module_name

    memo: dict[torch.fx.Node, Any] = {}
    count = 0
    used: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _CONVS | _LINEAR or len(node.args) < 2:
            continue
        fq_node = node.args[1]
        if not isinstance(fq_node, torch.fx.Node) or not is_fake_quant_node(fq_node):
            continue
        try:
            w = const_value(gm, fq_node.args[0], memo)
        except KeyError:
            continue  # weight computed from activations: leave it as Q/DQ
        name = pt2e_module_name(node) or node.name
        base, i = name, 1
        while name in used:
            name, i = f"{base}_{i}", i + 1
        used.add(name)
        fq = gm.get_submodule(str(fq_node.target))
        layer_type = "Linear" if node.target in _LINEAR else f"Conv{w.dim() - 2}d"
        bias = _fold_bn(gm, node, memo) if node.target in _CONVS else None
        wmod = make_weight(name, layer_type, fq, w.detach().float())
        owner, _, leaf = (name + ".w").rpartition(".")
        try:
            holder = gm.get_submodule(owner)
        except AttributeError:
            holder = gm
            leaf = (name + ".w").replace(".", "_")
        holder.add_module(leaf, wmod)
        target = f"{owner}.{leaf}" if holder is not gm else leaf
        with gm.graph.inserting_before(node):
            wnode = gm.graph.call_module(target, ())
        node.update_arg(1, wnode)
        if bias is not None:
            old = node.args[2] if len(node.args) > 2 else None
            if old is not None:  # a conv bias before the pattern's division passes through it unchanged
                bias = bias + const_value(gm, old, memo).detach().float()
            bname = target.replace(".", "_") + "_folded_bias"
            gm.register_buffer(bname, bias)
            with gm.graph.inserting_before(node):
                bnode = gm.graph.get_attr(bname)
            args = list(node.args) + [None] * (3 - len(node.args))
            args[2] = bnode
            node.args = tuple(args)
        count += 1
    # num_batches_tracked += 1 (torchao keeps it in eval graphs): a side effect the export must not carry
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is _aten.add_.Tensor and not node.users \
                and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "get_attr" \
                and str(node.args[0].target).endswith("num_batches_tracked"):
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return count
