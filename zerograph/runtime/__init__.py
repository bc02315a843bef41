"""The small runtime on torch.distributed that executes zerograph's graphs."""
