import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shake_vit package from the checkout

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope='session')
def imagefolder(tmp_path_factory):
    """A tiny ImageNet-layout folder: train/ and val/, 4 classes, 12 and 5 JPEGs each, 48x40 px."""
    root = tmp_path_factory.mktemp('imagefolder')
    rng = np.random.default_rng(0)
    for split, count in (('train', 12), ('val', 5)):
        for c in range(4):
            folder = root / split / f'class_{c}'
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
                pixels[:, :, c % 3] = 200 + c * 10  # a class-dependent colour
                Image.fromarray(pixels).save(folder / f'{i}.jpg', quality=90)
    return root
