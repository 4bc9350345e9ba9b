"""Weight files: reading them safely and finding the run config they belong to.

Readers: `read_state_dict` (any local file, never unpickling code unless trusted), `read_weights` (a run, checkpoint
or export folder, for `--eval` and `--export`), `config_for` (the config a checkpoint was trained with). Fitting
weights into a family's student is the family's (shake_vit/classification/pretrained.py).
"""
import functools
import socket
import urllib.parse
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file
from timm.models import load_state_dict

from .checkpoint import EMA_FILE, latest_checkpoint
from .config import ConfigError, load_config

StateDict = Dict[str, torch.Tensor]
WEIGHT_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin', '.ckpt', '.tar')  # what names a weights file


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a connection (asked once per process); HF_HUB_OFFLINE=1 means no."""
    import huggingface_hub.constants as hub
    if hub.HF_HUB_OFFLINE:
        return False
    try:
        socket.create_connection((urllib.parse.urlparse(hub.ENDPOINT).hostname, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline_unless_reachable() -> None:
    """Before timm fetches hub weights: without a network, the hub's offline mode, so that timm reads weights already
    in the local cache, or fails at once (about 50 s of retries, and as many warning lines, otherwise)."""
    if not hub_reachable():
        import huggingface_hub.constants as hub
        hub.HF_HUB_OFFLINE = True


def read_state_dict(path: str, trusted: bool = False) -> StateDict:
    """A state dict from a local file: `.safetensors`, or a torch file read with `weights_only=True`.

    timm's `load_state_dict` unwraps `{'state_dict': ...}` and DeiT's `{'model': ...}` and strips `module.`;
    `use_ema=False` because timm otherwise silently prefers EMA weights when a checkpoint has both. A file that needs
    arbitrary unpickling (which can run code from the file) is refused unless `trusted`
    (`train.trust_pickled_files=true`).
    """
    if not Path(path).is_file():
        raise ConfigError(f"Checkpoint '{path}' does not exist.")
    try:
        return load_state_dict(path, use_ema=False, weights_only=not trusted)
    except Exception as err:  # torch, zip, pickle and safetensors each raise their own types for a bad file
        msg = str(err)
        if 'Unsupported globals' in msg:
            found = msg.split('Unsupported globals:', 1)[1].split('. No automatic')[0].strip()
            raise ConfigError(
                f"'{path}' stores Python objects besides tensors ({found}); unpickling them could run code from "
                'the file, so it was refused. If you trust its source, set train.trust_pickled_files=true, or '
                'convert it once to .safetensors.') from None
        raise ConfigError(f"'{path}' is not a readable checkpoint (a PyTorch or .safetensors state dict): "
                          f"{type(err).__name__}: {msg.splitlines()[0][:200]}. Is the file complete?") from None


def read_weights(path: Path, trusted: bool, rename: Callable[[StateDict], StateDict]
                 ) -> Tuple[StateDict, Optional[StateDict], Path]:
    """Student weights (and EMA weights, if any) from a checkpoint folder, a run folder, an export folder or a file,
    their keys as `rename` makes them (the family's student's).

    Returns:
        (weights, EMA weights or None, the folder where `eval.json` goes)
    """
    path = Path(path)
    if path.is_dir() and (path / 'checkpoints').is_dir():
        newest = latest_checkpoint(path / 'checkpoints')
        if newest is None:
            raise ConfigError(f'{path}/checkpoints holds no complete checkpoint.')
        path = newest
    if path.is_dir():
        weights = path / 'model.safetensors'
        if not weights.is_file():
            raise ConfigError(f'{path} holds no model.safetensors: pass a checkpoint folder (OUTPUT/checkpoints/'
                              'update_N), a run folder, an export folder, or a weights file.')
        ema = path / EMA_FILE
        return rename(load_file(str(weights))), rename(load_file(str(ema))) if ema.is_file() else None, path
    if not path.is_file():
        raise ConfigError(f"Nothing to evaluate at '{path}'.")
    return rename(read_state_dict(str(path), trusted)), None, path.parent


def find_config(path: Path) -> Optional[Path]:
    """The `config.yaml` of the run a checkpoint belongs to: next to it, or up to three folders above."""
    path = Path(path).resolve()
    for folder in [path if path.is_dir() else path.parent, *list(path.parents)[:3]]:
        if (folder / 'config.yaml').is_file():
            return folder / 'config.yaml'
    return None


def config_for(path: str, configs: Optional[Sequence[str]], overrides: Sequence[str]) -> DictConfig:
    """The explicit `--config` files, else the checkpoint's own run config, then the overrides."""
    if configs:
        return load_config(configs, overrides)
    found = find_config(Path(path))
    if found is None:
        raise ConfigError(f"No config.yaml next to or above '{path}': pass the recipe it was trained with, "
                          '--config configs/NAME.yaml.')
    cfg = load_config([str(found)], overrides)
    cfg.train.output_dir = str(found.parent)  # the run folder, wherever the command is started from
    return cfg
