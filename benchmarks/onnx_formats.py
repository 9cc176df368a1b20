"""ORT size / latency / agreement of FP32 vs int8 vs int4 for SmallResNet (width 16) on digits, W4A4, 2 ORT threads.

Run: python benchmarks/onnx_formats.py  (writes ONNX files to /tmp/qat_plugins_onnx_formats)
"""
import torch, json
torch.set_num_threads(1)
from qat_plugins.training.config import load_config
from qat_plugins.training.trainer import train_fp, train_qat, load_data, build_fp_model, seed_everything
from qat_plugins.export import compare_formats, format_table
cfg = load_config({"seed": 0, "model": {"name": "resnet", "width": 16}, "qat": {"weight_bits": 4, "act_bits": 4, "augment": False}, "progress": False})
data = load_data(cfg); seed_everything(0)
fp = train_fp(build_fp_model(cfg, data), data, cfg)
res = train_qat(fp, data, cfg)
reps = compare_formats(res.model, (data.test.tensors[0][:2],), data.test, "/tmp/qat_plugins_onnx_formats", float_model=fp, num_threads=2, repeats=20)
print(format_table(reps))
