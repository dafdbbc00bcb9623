"""Token reduction in the image tower: ToMe, PiToMe and EViT as hooks of the model, their schedules and their cost."""
