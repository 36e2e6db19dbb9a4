"""Active learning: which image to label next, and how much the model's labels needed correcting."""
