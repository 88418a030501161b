"""Contrastive encoder pretraining building blocks: CLIP / SigLIP losses, a gradient-carrying all-gather and
tensor-only image augmentation."""
