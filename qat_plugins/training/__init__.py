"""Reference training: validated configs, FP + QAT loops, atomic checkpoints with exact resume.

::

    from qat_plugins.training import load_config, run
    result = run(load_config("examples/train_config.yaml"), output_dir="runs/w4a4")
    print(result.fp_test_accuracy, result.test_accuracy)

or step by step with :func:`load_data`, :func:`build_fp_model`, :func:`train_fp`, :func:`train_qat`.
"""

from .bn import BNSchedule, bn_stats_frozen, count_bn_layers, freeze_bn_stats, reestimate_bn_stats, unfreeze_bn_stats
from .checkpoint import (capture_rng, check_config_matches, load_checkpoint, read_resume_checkpoint, restore_rng,
                         save_checkpoint)
from .config import (
    DataConfig,
    FPConfig,
    ModelConfig,
    NNCFStyleConfig,
    QATConfig,
    TrainConfig,
    as_train_config,
    config_diff,
    config_hash,
    is_nncf_config,
    load_config,
    read_config_file,
    update_config,
)
from .loaders import EpochPermutationSampler, build_loader, evaluate, iterate_batches, load_data
from .run import (
    CHECKPOINT_NAME,
    RESULTS_NAME,
    RunHooks,
    build_fp_model,
    check_run,
    export_and_validate,
    load_trained,
    lock_output_dir,
    prepare_output_dir,
    run,
    write_json,
)
from .trainer import TrainResult, is_rank0, prepare_student, seed_everything, train_fp, train_qat, train_step

__all__ = [
    "BNSchedule", "freeze_bn_stats", "unfreeze_bn_stats", "bn_stats_frozen", "reestimate_bn_stats", "count_bn_layers",
    "TrainConfig", "DataConfig", "ModelConfig", "FPConfig", "QATConfig", "NNCFStyleConfig", "load_config",
    "read_config_file", "is_nncf_config", "update_config", "config_hash", "config_diff",
    "TrainResult", "train_fp", "train_qat", "run", "evaluate", "train_step", "build_loader", "load_data",
    "build_fp_model", "prepare_student", "prepare_output_dir", "load_trained", "write_json", "is_rank0", "seed_everything",
    "EpochPermutationSampler", "CHECKPOINT_NAME", "RESULTS_NAME", "RunHooks", "check_run", "export_and_validate",
    "lock_output_dir",
    "iterate_batches", "as_train_config", "read_resume_checkpoint",
    "save_checkpoint", "load_checkpoint", "capture_rng", "restore_rng", "check_config_matches",
]
