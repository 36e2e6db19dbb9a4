"""Trainers (point and auto branch fine-tuning) live here; see the continual-learning issue."""
