"""Reference training: validated configs, FP + QAT loops, atomic checkpoints with exact resume.

::

    from qat_plugins.training import load_config, run
    result = run(load_config("examples/train_config.yaml"), output_dir="runs/w4a4")
    print(result.fp_test_accuracy, result.test_accuracy)

or step by step with :func:`load_data`, :func:`build_fp_model`, :func:`train_fp`, :func:`train_qat`.
"""

from .checkpoint import capture_rng, check_config_matches, load_checkpoint, restore_rng, save_checkpoint
from .config import (
    DataConfig,
    FPConfig,
    ModelConfig,
    NNCFStyleConfig,
    QATConfig,
    TrainConfig,
    config_diff,
    config_hash,
    is_nncf_config,
    load_config,
    read_config_file,
    update_config,
)
from .trainer import (
    CHECKPOINT_NAME,
    RESULTS_NAME,
    EpochPermutationSampler,
    TrainResult,
    build_fp_model,
    build_loader,
    evaluate,
    is_rank0,
    load_data,
    load_trained,
    prepare_output_dir,
    prepare_student,
    run,
    seed_everything,
    train_fp,
    train_qat,
    train_step,
    write_json,
)

__all__ = [
    "TrainConfig", "DataConfig", "ModelConfig", "FPConfig", "QATConfig", "NNCFStyleConfig", "load_config",
    "read_config_file", "is_nncf_config", "update_config", "config_hash", "config_diff",
    "TrainResult", "train_fp", "train_qat", "run", "evaluate", "train_step", "build_loader", "load_data",
    "build_fp_model", "prepare_student", "prepare_output_dir", "load_trained", "write_json", "is_rank0", "seed_everything",
    "EpochPermutationSampler", "CHECKPOINT_NAME", "RESULTS_NAME",
    "save_checkpoint", "load_checkpoint", "capture_rng", "restore_rng", "check_config_matches",
]
