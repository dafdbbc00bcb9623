"""Training: contrastive losses (CLIP InfoNCE, SigLIP sigmoid) and distributed helpers."""
