"""Infrastructure every stage stands on: config, distributed setup, the DeepSpeed engine and checkpoints, the shared
training loop, crash-safe I/O, run folders, the stage cache and user-facing errors."""
