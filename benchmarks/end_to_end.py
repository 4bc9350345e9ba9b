"""End-to-end training images/s of the DeiT-Ti SHAKE recipe on a generated ImageNet-shaped JPEG folder, four ways in
one run: PIL loader + live teacher (eager), PIL + teacher-output cache + torch.compile, DALI + live teacher + compile,
DALI + cache + compile. The loader, the teacher and the step each bound a run somewhere; this measures them together.

Each way is a real `train.py` run of the recipe (configs/deit_tiny_shake_in1k.yaml: bf16, batch 128 per process,
RandAugment, erasing, mixup, repeated augmentation) for 2 x --steps updates, logging every --steps updates: the
second log point's images/s covers the last --steps updates alone (compilation, worker start-up and the loaders'
buffers fall in the first). The teacher is the recipe's RegNetY-16GF with random weights saved to a file (a
throughput needs no trained teacher, and no download), its health check off. Each cache is written before its run, by
`--cache-teacher`, with the same loader, and not timed.

    python -m benchmarks.end_to_end [--steps 30] [--workers 16] [--ways pil_live_eager dali_cache_compile]
    python -m benchmarks.end_to_end --smoke    # the mechanics on a CPU: tiny models, 32 px, no compile
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

from benchmarks.data_throughput import make_imagefolder
from benchmarks.study import ROOT

WAYS = {  # name: (loader, teacher-output cache, compile)
    'pil_live_eager': ('pil', False, False),
    'pil_cache_compile': ('pil', True, True),
    'dali_live_compile': ('dali', False, True),
    'dali_cache_compile': ('dali', True, True),
}
CLASSES = 8


def last_images_per_sec(out: Path) -> float:
    """The run's last `train/images_per_sec` point in its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    points = []
    for events in sorted(out.glob('tensorboard/**/events.out.tfevents.*')):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if 'train/images_per_sec' in acc.Tags()['scalars']:
            points += acc.Scalars('train/images_per_sec')
    if not points:
        raise SystemExit(f'{out} logged no train/images_per_sec')
    return max(points, key=lambda p: p.step).value


def teacher_file(name: str, path: Path) -> Path:
    """`name` with random weights for CLASSES classes, saved where teacher.checkpoint reads it."""
    import timm
    from safetensors.torch import save_file
    model = timm.create_model(name, pretrained=False, num_classes=CLASSES)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def run(args: List[str], log: Path) -> None:
    cmd = [sys.executable, str(ROOT / 'train.py'), *args]
    with open(log, 'w') as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f'{" ".join(cmd)} failed; its output: {log}\n' + log.read_text()[-3000:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ways', nargs='+', default=list(WAYS), choices=list(WAYS))
    p.add_argument('--steps', type=int, default=30, help='timed updates (after as many untimed ones)')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--workers', type=int, default=os.cpu_count())
    p.add_argument('--smoke', action='store_true', help='tiny models at 32 px (configs/smoke.yaml), no compile')
    p.add_argument('--keep', help='a folder to keep the runs in (default: a temporary one)')
    args = p.parse_args()
    preset = ['--config', 'configs/deit_tiny_shake_in1k.yaml'] + (['--config', 'configs/smoke.yaml'] if args.smoke
                                                                    else [])
    updates = 2 * args.steps
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = work / 'data'
        if not data.exists():  # one epoch of repeated augmentation covers every update (DeiT's RASampler rounding)
            make_imagefolder(data, -(-updates * args.batch_size // 256) * 256 + 256, args.workers, CLASSES, val=64)
        from shake_vit.core.config import load_config
        teacher_name = load_config([str(ROOT / a) for a in preset[1::2]]).teacher.name
        teacher = teacher_file(teacher_name, work / 'teacher.safetensors')
        common = [*preset, f'data.root={data}', f'data.num_workers={args.workers}', f'teacher.checkpoint={teacher}',
                  'teacher.pretrained=false', 'health.teacher=false', 'train.epochs=1',
                  f'train.max_updates_per_epoch={updates}', f'train.log_interval={args.steps}',
                  f'train.batch_size={args.batch_size}', 'train.overwrite=true']
        for way in args.ways:
            loader, cached, compiled = WAYS[way]
            extra = [f'data.loader={loader}']
            if cached:
                cache = work / f'cache_{loader}'
                if not (cache / 'manifest.json').is_file():
                    run([*common, *extra, f'train.output_dir={work / f"writer_{loader}"}', '--cache-teacher',
                         str(cache)], work / f'writer_{loader}.log')
                extra.append(f'teacher.cache={cache}')
            if compiled and not args.smoke:
                extra += ['train.compile=true', 'teacher.compile=true']
            out = work / way
            start = time.perf_counter()
            run([*common, *extra, f'train.output_dir={out}'], work / f'{way}.log')
            figures[way] = last_images_per_sec(out)
            rows.append((way, figures[way], time.perf_counter() - start))
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f'no GPU, {os.cpu_count()} CPU cores'
    base = figures.get('pil_live_eager')
    print(f'# {device}; {"smoke (tiny models, 32 px, no compile)" if args.smoke else "DeiT-Ti + RegNetY-16GF, 224 px"}'
          f', batch {args.batch_size}, {args.workers} loader workers; images/s over updates {args.steps + 1}-{updates}')
    print('| way | images/s | x PIL + live eager | run (s, with start-up and compile) |\n| --- | --- | --- | --- |')
    for way, ips, seconds in rows:
        print(f'| {way} | {ips:.1f} | {ips / base:.2f} | {seconds:.0f} |' if base else
              f'| {way} | {ips:.1f} | - | {seconds:.0f} |')
    print(json.dumps({'images_per_sec': figures}))


if __name__ == '__main__':
    main()
