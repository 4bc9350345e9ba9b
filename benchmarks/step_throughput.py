"""Training-step throughput of none, deit_hard and shake, against timm's TokenDistillationTask doing DeiT-hard; and, on
CRD's CIFAR pair, of SHAKE's two CNN shadow heads against KD (the paper: SHAKE x1.18 of KD on CIFAR-100).

Every method runs through the same loop (shake_vit.core.engine.Trainer.step: mixup off, forward, backward, AdamW update)
on the same synthetic batch already on the device, so only the task differs. The methods are interleaved within each
repeat, warm-up steps are excluded, and the median over repeats is reported; ratios are taken inside one run.

    python -m benchmarks.step_throughput                      # CPU configuration (this machine)
    python -m benchmarks.step_throughput --preset gpu         # DeiT-S + RegNetY-16GF, 224 px, bf16, batch 256
    python -m benchmarks.step_throughput --preset cifar --methods kd shake --variant model.shadow_on=teacher
    python -m benchmarks.step_throughput --steps 1 --repeats 1 --warmup 0 --no-memory   # the smoke test

Peak memory: on CUDA the allocator's peak per method; on the CPU the peak resident set of a separate process that
builds and steps only that method (`--no-memory` skips those processes).
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from timm.task import TokenDistillationTask

from benchmarks.study import ROOT
from shake_vit.classification.models import build_student
from shake_vit.classification.tasks import DistillationTask
from shake_vit.classification.teacher import Normalisation, build_teacher_model, freeze, speed_up, teacher_options
from shake_vit.core.config import load_config
from shake_vit.core.engine import Trainer
from shake_vit.core.optim import build_optimizer
from shake_vit.distill.methods import loss_fn

PRESETS = {
    # Small enough for 2 CPU cores; the teacher is a CNN as in DeiT.
    'cpu': ['data.img_size=64', 'model.kwargs.patch_size=8', 'model.kwargs.depth=6', 'teacher.name=resnet26',
            'train.batch_size=32', 'train.mixed_precision=no'],
    # The DeiT setting: DeiT-S student, RegNetY-16GF teacher, 224 px, bf16, 256 images per step.
    'gpu': ['model.name=deit_small_distilled_patch16_224', 'teacher.name=regnety_160', 'data.img_size=224',
            'train.batch_size=256', 'train.mixed_precision=bf16'],
    # DeiT-Ti + RegNetY-16GF at 224 px, cut to a CPU: 64 px, 8-px patches, 3 blocks, the teacher unchanged. Teacher
    # forward / student forward FLOPs = 14.5 here (torch.utils.flop_counter), 14.7 for the real pair, so the
    # teacher's share of a step matches the real one's.
    'deit_ratio': ['data.img_size=64', 'model.kwargs.patch_size=8', 'model.kwargs.depth=3', 'teacher.name=regnety_160',
                   'train.batch_size=32', 'train.mixed_precision=no'],
    # the real pair, DeiT-Ti + RegNetY-16GF at 224 px, bf16, batch 256 (benchmarks/gpu.sh)
    'gpu_tiny': ['model.name=deit_tiny_distilled_patch16_224', 'teacher.name=regnety_160', 'data.img_size=224',
                 'train.batch_size=256', 'train.mixed_precision=bf16'],
    # CRD's resnet32x4 -> resnet8x4 at CIFAR's 32 px and batch 64, fp32, the shadow head on the pooled features
    # (`--variant model.shadow_on=teacher`: the authors' proxy teacher on the teacher's maps).
    'cifar': ['model.name=cifar_resnet8x4', 'model.kwargs={}', 'model.drop_path_rate=0', 'model.shadow_on=pooled',
              'teacher.name=cifar_resnet32x4', 'data.img_size=32', 'train.batch_size=64', 'train.mixed_precision=no',
              'optim.opt=momentum'],
}
# shake_cached: shake with the teachers' logits read from a teacher-output cache (shake_vit/distill/cache.py) on disk,
# top-k as the writer stores ImageNet's, decoded by the reader's thread; no teacher is built.
METHODS = ('none', 'deit_hard', 'shake', 'timm_token_hard', 'kd', 'shake_cached')
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NUM_CLASSES = 1000


def build(method: str, cfg: DictConfig, acc: Accelerator) -> Trainer:
    """A Trainer whose task is ours for `method`, or timm's TokenDistillationTask for 'timm_token_hard'."""
    torch.manual_seed(0)
    method_cfg = cfg.copy()
    # the 'none' row is the two-head student without a teacher (the step docs/benchmarks.md reports); timm's task
    # trains the distilled DeiT deit_hard trains
    method_cfg.loss.method = {'none': 'none_both_heads', 'timm_token_hard': 'deit_hard',
                              'shake_cached': 'shake'}.get(method, method)
    student = build_student(method_cfg, NUM_CLASSES)
    optimizer = build_optimizer(cfg.optim, student, lr=1e-4)
    student, optimizer = acc.prepare(student, optimizer)
    if cfg.train.compile:  # what Accelerate's dynamo_backend='inductor' does in prepare, per configuration here
        student = torch.compile(student)
    teacher = None
    if method == 'shake_cached':
        task = DistillationTask(student, None, loss_fn(method_cfg), torch.nn.CrossEntropyLoss(), MEAN, STD,
                                cache=synthetic_cache(method_cfg, acc))
        return Trainer(acc, task.to(acc.device), optimizer, schedule=None, log_interval=10 ** 9)
    if method != 'none':
        teacher = freeze(build_teacher_model(cfg.teacher, NUM_CLASSES), Normalisation(MEAN, STD, 'ImageNet'))
        teacher = speed_up(teacher.to(acc.device), cfg.teacher)
    if method == 'timm_token_hard':
        acc.unwrap_model(student).model.set_distilled_training(True)
        task = TokenDistillationTask(acc.unwrap_model(student).model, teacher, criterion=torch.nn.CrossEntropyLoss(),
                                     distill_type='hard', task_loss_weight=0.5, device=acc.device, verbose=False)
        task.trainable_module = student.model if hasattr(student, 'model') else student
    else:
        task = DistillationTask(student, teacher, loss_fn(method_cfg), torch.nn.CrossEntropyLoss(), MEAN, STD,
                                **teacher_options(cfg))
    return Trainer(acc, task.to(acc.device), optimizer, schedule=None, log_interval=10 ** 9)


CACHE_BATCHES = 16  # batches in the synthetic cache shard; the reader cycles through them


def synthetic_cache(cfg: DictConfig, acc: Accelerator):
    """A teacher-output cache on disk for one epoch of CACHE_BATCHES batches of the benchmark's batch (labels
    y_labels(cfg)), in the format the writer would choose for ImageNet-1k's 300-epoch schedule (top-10, the teacher's
    precision), and its reader, positioned at the start."""
    import atexit
    import shutil
    import tempfile

    from shake_vit.distill import cache as tc
    from shake_vit.distill import cache_format as cf
    root = Path(tempfile.mkdtemp(prefix='shake_cache_bench_'))
    atexit.register(shutil.rmtree, root, True)
    fmt = cf.choose_format(cfg, NUM_CLASSES, 1_281_167 * 300, 1)
    g = torch.Generator().manual_seed(0)
    writer = tc.ShardWriter(root, 0, 0, range(CACHE_BATCHES), cfg.train.batch_size)
    for _ in range(CACHE_BATCHES):
        logits = torch.randn(cfg.train.batch_size, NUM_CLASSES, generator=g) * 3
        if fmt.precision == 'bf16':
            logits = logits.to(torch.bfloat16).float()
        writer.add(y_labels(cfg).numpy(), [cf.encode(logits, fmt)])
    writer.finish()
    (root / tc.MANIFEST).write_text(json.dumps({
        'version': tc.VERSION, 'identity': tc.identity(cfg, MEAN, STD), 'teachers': [{'sha256': '-'}],
        'classes': [str(i) for i in range(NUM_CLASSES)], 'format': fmt.__dict__, 'epochs': cfg.train.epochs,
        'micro_batches_per_epoch': CACHE_BATCHES, 'block': CACHE_BATCHES}))
    epoch = SimpleNamespace(micro_batch=cfg.train.batch_size, micro_batches_per_epoch=CACHE_BATCHES)  # a Stream's
    reader = tc.Reader(str(root), cfg, MEAN, STD, NUM_CLASSES, epoch, [{'sha256': '-'}], log=lambda m: None)
    reader.start_epoch(0, list(range(CACHE_BATCHES)))
    reader.fed = 0
    return reader


def y_labels(cfg: DictConfig) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (cfg.train.batch_size,), generator=torch.Generator().manual_seed(1))


def feed(trainer: Trainer, y_cpu: torch.Tensor) -> None:
    """What Trainer.train_epoch does before each step when the task reads a cache: check and stage the batch."""
    cache = getattr(trainer.task, 'cache', None)
    if cache is None:
        return
    if cache.fed == CACHE_BATCHES:  # the shard is used up: start it again
        cache.start_epoch(0, list(range(CACHE_BATCHES)))
        cache.fed = 0
    cache.next_batch(y_cpu)
    cache.fed += 1


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def measure(configs: Dict[str, DictConfig], methods: List[str], steps: int, warmup: int,
            repeats: int) -> Dict[str, dict]:
    """Median step time of every (configuration, method) pair, all built in this process and interleaved."""
    base = next(iter(configs.values()))
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=base.train.mixed_precision)
    size, batch = base.data.img_size, base.train.batch_size
    x = torch.randn(batch, 3, size, size, device=acc.device)
    y_cpu = y_labels(base)
    y = y_cpu.to(acc.device)
    trainers = {(label, m): build(m, cfg, acc) for label, cfg in configs.items() for m in methods
                if not (m == 'timm_token_hard' and label != 'base')}
    times = {key: [] for key in trainers}
    peak = {}
    for key, trainer in trainers.items():
        trainer.task.train()
        if acc.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            feed(trainer, y_cpu)
            trainer.step(x, y)
        sync(acc.device)
        if acc.device.type == 'cuda':
            peak[key] = torch.cuda.max_memory_allocated() / 2 ** 30
    for _ in range(repeats):  # interleaved, so a slow moment of the machine hits every method alike
        for key, trainer in trainers.items():
            sync(acc.device)
            start = time.perf_counter()
            for _ in range(steps):
                feed(trainer, y_cpu)
                trainer.step(x, y)
            sync(acc.device)
            times[key].append((time.perf_counter() - start) / steps)
    out = {}
    for (label, m), t in times.items():
        step = statistics.median(t)
        out[f'{m} [{label}]' if label != 'base' else m] = {
            'method': m, 'variant': label, 'step_s': step, 'images_per_sec': batch / step,
            'peak_gib': peak.get((label, m)), 'repeats': [round(v, 5) for v in t]}
    return out


def peak_rss_gib() -> float:
    """This process's peak resident set. VmHWM, not getrusage: Linux carries ru_maxrss over fork and exec, so a
    child would report its parent's peak."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def cpu_peak_rss(args, method: str) -> float:
    """Peak resident memory (GiB) of a process that builds and steps only `method`."""
    cmd = [sys.executable, '-m', 'benchmarks.step_throughput', '--preset', args.preset, '--methods', method,
           '--steps', '2', '--warmup', '1', '--repeats', '1', '--no-memory', '--json',
           *sum([['--set', s] for s in args.set], [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])['max_rss_gib']


def flops_per_step(cfg: DictConfig, device: torch.device) -> float:
    """Student forward + backward and teacher forward of one step, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    acc = Accelerator(cpu=device.type == 'cpu', mixed_precision=cfg.train.mixed_precision)
    trainer = build('shake', cfg, acc)
    size, batch = cfg.data.img_size, cfg.train.batch_size
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        with acc.autocast():
            out = trainer.task(x, y)
        out['loss'].backward()
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', choices=sorted(PRESETS), default='cpu')
    p.add_argument('--methods', nargs='+', default=['none', 'deit_hard', 'shake', 'timm_token_hard'], choices=METHODS)
    p.add_argument('--steps', type=int, default=5, help='timed steps per repeat')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='config override for every method (e.g. teacher.precision=bf16, teacher.channels_last=true)')
    p.add_argument('--variant', action='append', default=[], metavar='KEY=VALUE',
                   help='also measure every method with this change, in the same run (repeatable), e.g. '
                        'teacher.precision=bf16, teacher.inference_mode=false, train.compile=true; several overrides '
                        'in one variant are separated by spaces ("train.compile=true teacher.compile=true")')
    p.add_argument('--no-memory', action='store_true', help='skip the per-method CPU memory processes')
    p.add_argument('--mfu-peak-tflops', type=float, default=989.0,
                   help='dense bf16 peak of the GPU for model FLOPs utilisation (H100/H200 SXM: 989)')
    p.add_argument('--json', action='store_true', help='print one JSON line instead of tables')
    args = p.parse_args()
    base = [*PRESETS[args.preset], 'aug.mixup=0', 'aug.cutmix=0', *args.set]
    configs = {'base': load_config(None, base)}
    configs.update({v: load_config(None, [*base, *v.split()]) for v in args.variant})
    cfg = configs['base']
    results = measure(configs, args.methods, args.steps, args.warmup, args.repeats)
    if args.json:
        print(json.dumps({'results': results, 'max_rss_gib': peak_rss_gib()}))
        return
    cuda = torch.cuda.is_available()
    if not cuda and not args.no_memory:
        for m in args.methods:
            results[m]['peak_gib'] = cpu_peak_rss(args, m)
    device = torch.cuda.get_device_name() if cuda else f'CPU, {torch.get_num_threads()} threads'
    print(f'# {device}; preset {args.preset} {" ".join(args.set)}; batch {cfg.train.batch_size}, '
          f'{cfg.data.img_size} px, {args.steps} steps x {args.repeats} repeats after {args.warmup} warm-up')
    print(f"| method | step (ms) | images/s | peak memory (GiB{', CUDA allocator' if cuda else ', process RSS'}) |")
    print('| --- | --- | --- | --- |')
    for name, r in results.items():
        mem = f"{r['peak_gib']:.2f}" if r['peak_gib'] is not None else 'not measured'
        print(f"| {name} | {1000 * r['step_s']:.1f} | {r['images_per_sec']:.1f} | {mem} |")
    step = {name: r['step_s'] for name, r in results.items()}
    pairs = [('shake', 'deit_hard'), ('deit_hard', 'timm_token_hard'), ('deit_hard', 'none'), ('shake', 'none'),
             ('shake', 'kd'), ('shake_cached', 'shake'), ('shake_cached', 'none')]
    pairs += [(f'shake [{v}]', 'kd') for v in args.variant]
    pairs += [(f'{m} [{v}]', m) for v in args.variant for m in args.methods]
    print('\n| ratio (step time) | value |\n| --- | --- |')
    for a, b in pairs:
        if a in step and b in step:
            print(f'| {a} / {b} | {step[a] / step[b]:.3f} |')
    if cuda:
        flops = flops_per_step(cfg, torch.device('cuda'))
        achieved = flops / step['shake'] / 1e12 if 'shake' in step else float('nan')
        print(f'\nshake step: {flops / 1e12:.2f} TFLOP (student fwd+bwd, teacher fwd), {achieved:.0f} TFLOP/s, '
              f'MFU {100 * achieved / args.mfu_peak_tflops:.1f}% of {args.mfu_peak_tflops:.0f} TFLOP/s')


if __name__ == '__main__':
    main()
