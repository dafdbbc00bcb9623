"""Evaluation: metrics on features and logits (classification, retrieval, calibration, OOD, linear probe).

The metric modules take torch tensors or numpy arrays and contain no model, so any runner that
produces logits or embeddings can score them. Metric names follow LAION-AI/CLIP_benchmark
(``acc1``, ``acc5``, ``mean_per_class_recall``, ``image_retrieval_recall@k``, ``lp_acc1``, ...).
"""
