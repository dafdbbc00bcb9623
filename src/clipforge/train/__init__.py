"""Training: contrastive losses (CLIP InfoNCE, SigLIP sigmoid, distillation) and distributed helpers."""
