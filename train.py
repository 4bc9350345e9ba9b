"""shake-vit: distill a DeiT student with SHAKE (shadow knowledge distillation) on timm and Accelerate.

    accelerate launch train.py                                    # the quick start (digits, fits its own teacher)
    accelerate launch train.py --config configs/NAME.yaml [section.key=value ...]
    accelerate launch train.py --config configs/NAME.yaml --resume auto          # continue the newest checkpoint
    python train.py --config configs/NAME.yaml --config configs/smoke.yaml data.root=...   # a few CPU steps
    python train.py --config configs/NAME.yaml --print-config     # resolved config and derived values, no training
    python train.py --config configs/NAME.yaml --check-data       # decode every image once, list unreadable files
    accelerate launch train.py --eval runs/NAME                   # evaluate a run, checkpoint, export or file
    python train.py --export runs/NAME [--export-head cls|both]   # a plain timm model (model.safetensors)
    python train.py --export runs/NAME --export-format onnx       # model.onnx, dynamic batch, checked by onnxruntime
    accelerate launch train.py --config configs/NAME.yaml --cache-teacher DIR   # the teachers' outputs, once; then
    accelerate launch train.py --config configs/NAME.yaml teacher.cache=DIR      # ... any number of runs without them

`python train.py ...` does the same in one process. Overrides may stand before, between or after the flags.
"""
import argparse
import logging
import os
import sys
from pathlib import Path

from shake_vit.core.config import ConfigError, load_config

QUICKSTART = Path(__file__).resolve().parent / 'configs' / 'quickstart.yaml'


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', action='append', metavar='YAML',
                   help=f'recipe YAML; repeat to layer files, later ones win '
                        f'(default: {QUICKSTART.relative_to(QUICKSTART.parents[1])}; with --eval/--export: the '
                        "checkpoint's own config.yaml)")
    p.add_argument('--print-config', action='store_true', help='print the resolved config and derived values, exit '
                   '(without the data, the values that need it are named)')
    p.add_argument('--check-data', action='store_true', help='decode every train and val image once and list the '
                   'unreadable ones (exit status 2 if any), then exit')
    p.add_argument('--resume', metavar='auto|PATH', help="continue from the newest checkpoint ('auto'; starts "
                   'fresh when there is none) or from a checkpoint folder')
    p.add_argument('--eval', metavar='PATH', help='evaluate a run folder, checkpoint folder, export folder or file')
    p.add_argument('--export', metavar='PATH', help='export a run/checkpoint as a plain timm model')
    p.add_argument('--export-head', choices=('cls', 'both'),
                   help="cls: the classification head alone; both: the distilled DeiT with its two heads (timm "
                        "averages them). Default: what the student predicts with (SHAKE: cls, DeiT's methods: both)")
    p.add_argument('--export-format', choices=('timm', 'onnx'), default='timm',
                   help="timm: model.safetensors + config.json (timm's save_for_hf); onnx: model.onnx with a dynamic "
                        'batch size (classification; the cls head by default), checked with onnxruntime if installed')
    p.add_argument('--export-dir', metavar='DIR', help='where to export (default: next to the checkpoint)')
    p.add_argument('--export-ema', action='store_true', help='export the EMA weights')
    p.add_argument('--cache-teacher', metavar='DIR', help="write the teachers' outputs on this config's exact input "
                   'stream, every epoch, to DIR (resumable), then exit; train from it with teacher.cache=DIR')
    p.add_argument('--debug', action='store_true', help='show full tracebacks for configuration errors')
    p.add_argument('overrides', nargs='*', metavar='section.key=value', help='config overrides, applied last')
    return p.parse_intermixed_args(argv)  # overrides before and after flags alike


def print_config(cfg) -> None:
    """The resolved config, then what follows from it; the values that need the data are named when it is absent
    (e.g. before the cluster's data set is mounted)."""
    from omegaconf import OmegaConf

    from shake_vit.core import stream
    from shake_vit.core.build import process_state
    from shake_vit.core.family import family_of
    from shake_vit.core.stream import derive
    from shake_vit.distill import methods
    state = process_state()  # joined as a run joins them (on a CPU-only machine too)
    cfg = stream.resolve(cfg, state.num_processes)  # the global batch and this launch's accumulation, as a run has
    if state.is_main_process:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        method = methods.of(cfg)
        output = {'cls': 'the cls head', 'avg': 'the average of all heads'}[cfg.model.predict or method.predict]
        uses_t = method.temperature is not None or cfg.loss.temperature is not None
        print(f'# method: {method.name}, {method.summary}; '
              f"{f'temperature {methods.temperature(cfg):g}' if uses_t else 'no temperature'}; the student predicts "
              f'with {output}')
    family = family_of(cfg)
    check_architectures(family, cfg)
    try:
        offline = cfg.copy()
        offline.data.download = False  # printing a config never downloads a data set
        splits = family.build_splits(offline)
    except ConfigError as err:
        if state.is_main_process:
            print(f'# derived: {derive(cfg, state.num_processes, None).describe()}')
            why = ('not downloaded yet: data.download=true downloads it when the run starts (--print-config never '
                   'downloads)') if cfg.data.download else f'not readable here ({err})'
            print(f'# data: {why}')
        return
    # the stream the run's train loader walks: its updates per epoch are the run's
    layout = stream.layout_of(cfg, state.num_processes, state.process_index)
    derived = derive(cfg, state.num_processes, stream.Stream(
        len(splits.train), family.train_repeats(cfg), cfg.train.seed, layout.micro_batch, layout.global_batch,
        cfg.train.max_updates_per_epoch).updates_per_epoch)
    if state.is_main_process:
        print(f'# derived: {derived.describe()}')
        print(f'# data: {cfg.data.name}, {len(splits.train)} train / {len(splits.val)} val images, '
              f'{len(splits.classes)} classes')


def check_architectures(family, cfg) -> None:
    """What the run checks from the config and the model registries alone, before any data or weights: every model
    name, the patch grid, the method's heads. Built on the meta device (no memory, no initialisation) where the
    architecture allows, else on the CPU with random weights. Raises the run's own ConfigError."""
    import torch
    num_classes = cfg.data.num_classes or family.check_classes  # the head's size does not matter
    try:
        with torch.device('meta'):
            family.check_architectures(cfg, num_classes)
    except ConfigError:
        raise
    except Exception:  # an architecture whose construction computes on its tensors
        family.check_architectures(cfg, num_classes)


def check_data(cfg) -> int:
    """`--check-data`: every image decoded once; 0 when all are readable, 2 (and the list) otherwise."""
    from shake_vit.core import data
    from shake_vit.core.family import family_of
    splits = family_of(cfg).build_splits(cfg)
    bad = data.find_bad_images(cfg, splits)
    total = len(splits.train) + len(splits.val)
    if not bad:
        print(f'[shake-vit] all {total} images of {cfg.data.name} are readable')
        return 0
    print(f'[shake-vit] {len(bad)} of {total} images cannot be read:', *bad, sep='\n  ')
    return 2


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    from shake_vit.core.checkpoint import CheckpointError
    from shake_vit.core.data import BadImage
    from shake_vit.core.engine import NonFiniteLoss
    # An error in the config is the same in every process: one of them says it. Errors met while running (a bad
    # image in one process's share) are said by the process that met them.
    said_once = int(os.environ.get('RANK', '0')) != 0
    try:
        from shake_vit.core.family import family_of
        if args.eval or args.export:
            from shake_vit.core.runner import evaluate_checkpoint, export
            from shake_vit.core.weights import config_for
            cfg = config_for(args.eval or args.export, args.config, args.overrides)
            said_once = False
            if args.eval:
                evaluate_checkpoint(args.eval, cfg)
            else:
                export(args.export, cfg, args.export_head, args.export_dir, args.export_ema, args.export_format)
            return 0
        cfg = load_config(args.config or [str(QUICKSTART)], args.overrides)
        if args.print_config:  # what it refuses, every process refuses alike: one says it
            print_config(cfg)
            return 0
        said_once = False
        if args.check_data:
            return check_data(cfg)
        if args.cache_teacher:
            family_of(cfg).cache_teacher(cfg, args.cache_teacher)
            return 0
        from shake_vit.core.runner import train
        train(cfg, resume=args.resume)
    except (ConfigError, CheckpointError) as err:
        if args.debug:
            raise
        if not said_once:
            print(f'error: {BadImage.reason(err) if isinstance(err, BadImage) else err}', file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        if args.debug:
            raise
        print(f'error: {err}', file=sys.stderr)
        return 3
    return 0


if __name__ == '__main__':
    sys.exit(main())
