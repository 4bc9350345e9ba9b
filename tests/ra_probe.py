"""Run under `accelerate launch --multi_gpu --num_processes 2`: record what each process's train loader draws.

Builds the loaders exactly as the trainer does (shake_vit.classification.data.build_pipeline) and writes, for two
epochs, the (index, augmentation seed) keys every process fetched to the JSON file named by the first argument.
"""
import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from shake_vit.classification import data
from shake_vit.classification.models import build_student
from shake_vit.core.config import load_config


def main(out_path: str, *overrides: str) -> None:
    acc = Accelerator(cpu=not torch.cuda.is_available())
    cfg = load_config(None, ['data.name=digits', 'data.img_size=32', 'data.num_workers=0', 'aug.repeated_aug=3',
                             'train.batch_size=16', 'model.kwargs.patch_size=8', 'model.kwargs.depth=1', *overrides])
    splits = data.build_splits(cfg)
    pipe = data.build_pipeline(cfg, acc, splits, build_student(cfg, len(splits.classes)), cfg.aug.repeated_aug)
    epochs = []
    for epoch in range(2):
        pipe.train_loader.batch_sampler.set_epoch(epoch)
        keys = [key for batch in pipe.train_loader.batch_sampler for key in batch]
        epochs.append(gather_object([{'rank': acc.process_index, 'keys': keys}]))
    if acc.is_main_process:
        json.dump({'num_processes': acc.num_processes, 'train_size': len(splits.train),
                   'batches_per_process': len(pipe.train_loader), 'epochs': epochs}, open(out_path, 'w'))
    acc.end_training()  # the process group torn down before exit (left to the interpreter, gloo can abort)


if __name__ == '__main__':
    main(*sys.argv[1:])
