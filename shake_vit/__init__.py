"""shake-vit: SHAKE (shadow knowledge distillation) for DeiT students on timm and Accelerate."""
__version__ = '0.1.0'
