"""One run per folder: a new run never mixes with the run already in `train.output_dir`, and `--resume` continues
only the run it was started as.

A second run written into a used folder would keep the first run's newer checkpoints (`ckpt.keep_last` deletes its
own at once), and `--eval` / `--export` of the folder would read the first run's weights while `results.json` says the
second's numbers. So a new run into a folder that holds another run's checkpoints, results or weights stops with the
choices (`--resume auto`; a new folder; `train.overwrite=true`, which removes them first). What a folder keeps across
runs on purpose stays: a fitted teacher (`teacher*.safetensors` and its record), a pretrained detection backbone
(`backbone/`), teacher-output caches.
"""
import shutil
from pathlib import Path
from typing import Any, Dict, List

from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf

from .checkpoint import CheckpointError, complete_checkpoints
from .config import ConfigError

# what a run leaves in its folder that another run must not mix with (removed by train.overwrite=true)
RUN_FILES = ('checkpoints', 'results.json', 'student.safetensors', 'health.json', 'tensorboard', 'config.yaml')

# config keys a resume may change: where things are, how often to log, save and evaluate, how fast to load; a
# moved teacher file; the accumulation (it follows the process count while train.global_batch stays:
# shake_vit/core/stream.py). Everything else is the run's identity.
RESUME_MAY_CHANGE = ('train.output_dir', 'train.epochs', 'train.log_interval', 'train.log_with', 'train.cpu_threads',
                     'train.grad_accum', 'train.trust_pickled_files', 'train.overwrite', 'data.root',
                     'data.num_workers', 'data.pin_memory', 'data.download', 'data.dali_threads',
                     'data.dali_prefetch', 'ckpt.', 'eval.', 'health.',
                     'teacher.checkpoint', 'teacher.cache', 'teacher_cache.')  # (model.pretrained and
# det.backbone_weights decide the detectors' BatchNorm and which layers train: they stay)


def previous_run(out: Path) -> List[str]:
    """What in `out` belongs to another run: its checkpoints (the newest update), results, weights."""
    found = []
    checkpoints = complete_checkpoints(out / 'checkpoints')
    if checkpoints:
        found.append(f'checkpoints up to {checkpoints[-1].name}')
    found += [name for name in ('results.json', 'student.safetensors') if (out / name).is_file()]
    return found


def claim(cfg: DictConfig) -> None:
    """Before a new (not resumed) run builds anything: refuse a folder holding another run, or with
    `train.overwrite=true` remove that run's files (the main process; the others wait)."""
    out = Path(cfg.train.output_dir)
    state = PartialState()
    state.wait_for_everyone()  # every process looks at the folder before the main one may clear it
    found = previous_run(out)
    if not found:
        return
    teacher = next(iter(sorted(out.glob('teacher*.safetensors'))), None)
    reuse = (f' The teacher fitted there is reused in that folder either way, and from another one with '
             f'teacher.checkpoint={teacher}.' if teacher else '')
    if not cfg.train.overwrite:
        raise ConfigError(f"train.output_dir '{out}' holds another run ({', '.join(found)}). A new run there would "
                          "mix with it: its checkpoints, --eval and --export would read the other run's weights. "
                          f'Continue that run with --resume auto, start this one in a new folder '
                          f'(train.output_dir={out}_2), or set train.overwrite=true to remove the other run\'s '
                          f'checkpoints, results, weights and TensorBoard events first.{reuse}')
    if state.is_main_process:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        print(f"[shake-vit] train.overwrite=true: removed the earlier run's {', '.join(found)} and TensorBoard events "
              f'from {out}', flush=True)
    state.wait_for_everyone()


def _leaves(node: Any, prefix: str = '') -> Dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f'{prefix}{key}.').items()}
    return {prefix[:-1]: node}


def identity(cfg: DictConfig) -> Dict[str, Any]:
    """The config a resume must keep, as flat `section.key` leaves (lists whole)."""
    return kept(_leaves(OmegaConf.to_container(cfg, resolve=True)))


def kept(leaves: Dict[str, Any]) -> Dict[str, Any]:
    """Flat `section.key` leaves without those a resume may change (a checkpoint's identity recorded when the list
    was shorter is compared on what it is now)."""
    return {k: v for k, v in leaves.items() if not any(k == m or (m.endswith('.') and k.startswith(m))
                                                        for m in RESUME_MAY_CHANGE)}


def check_same_run(saved: Dict[str, Any], current: Dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose run had another identity, naming each key that differs (checkpoints written before
    the identity was recorded are compared on their architecture alone, by the caller)."""
    diffs = [f'{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}' for k in sorted(set(saved) | set(current))
             if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f'Checkpoint {path} belongs to another run than this config describes ('
                              + '; '.join(diffs[:8]) + (f'; and {len(diffs) - 8} more' if len(diffs) > 8 else '')
                              + '). Resume with the config the run was started with (its config.yaml), or start a '
                              f'new run from its weights with model.pretrained={path / "model.safetensors"} in '
                              'another train.output_dir.')
