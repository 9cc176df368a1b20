"""Quickstart: your own training loop, W4A4 QAT with the consistency regularizer (< 1 min on CPU).

    python examples/quickstart.py

1. train a small full-precision CNN on scikit-learn's 8x8 digits,
2. ``prepare_qat`` it to 4-bit weights and activations,
3. ``attach`` a ConsistencyRegularizer and add ``regs.loss(...)`` to the loss: that is all.
"""

import torch
import torch.nn.functional as F

import qat_plugins as qp
from qat_plugins.data import default_augment, load_digits_split
from qat_plugins.models import SmallCNN

torch.set_num_threads(1)
torch.manual_seed(0)
data = load_digits_split()
x_train, y_train = data.train.tensors
x_test, y_test = data.test.tensors


def accuracy(model):
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    model.train()
    return acc


# 1. full-precision model
fp_model = SmallCNN(width=16)
opt = torch.optim.Adam(fp_model.parameters(), 1e-2)
augment = default_augment()
for step in range(300):
    idx = torch.randint(0, len(x_train), (64,))
    loss = F.cross_entropy(fp_model(augment(x_train[idx])), y_train[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
fp_model.eval()
print(f"FP test accuracy:        {accuracy(fp_model):.2%}")

# 2. QAT model (a new model; fp_model is unchanged). One forward initialises the quantizers
#    (and sizes per-channel scales) before the optimizer is created.
qat_model = qp.prepare_qat(fp_model, weight_bits=4, act_bits=4)
with torch.no_grad():
    qat_model.eval()
    qat_model(x_train[:64])
    qat_model.train()
print(f"W4A4 before QAT:         {accuracy(qat_model):.2%}")

# 3. the usual loop, plus the regularizer's loss term
opt = torch.optim.SGD(qat_model.parameters(), lr=0.01, momentum=0.9)
with qp.attach(qat_model, [qp.ConsistencyRegularizer()], fp_model=fp_model) as regs:
    for step in range(150):
        idx = torch.randint(0, len(x_train), (64,))
        x, y = x_train[idx], y_train[idx]
        out = qat_model(x)
        loss = F.cross_entropy(out, y) + regs.loss(x, y, out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}  terms {regs.last_losses}")
print(f"W4A4 + CR test accuracy: {accuracy(qat_model):.2%}")
