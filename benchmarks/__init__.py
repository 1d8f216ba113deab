"""Benchmarks of memguard: ground truth on real training steps, accuracy and speed.

Run the scripts from the repository root (``python benchmarks/accuracy.py``); see README.md.
"""
