"""What turns raw inputs into model inputs: the tokenizer (open_clip's ids) and the image transforms (open_clip's tensors)."""
