"""The bottom of experiments/: helpers every other package may use (settings, progress, files); it imports nothing else of experiments."""
