"""Active-learning strategies live here; see the continual-learning issue."""
