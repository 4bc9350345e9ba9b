"""Architectures timm lacks, registered in timm's model registry so every factory builds them by name: CRD's CIFAR
networks (crd.py) and adapters (adapters.py)."""
from . import adapters, crd  # noqa: F401  (they register their models)
