"""Command-line tools of the project (serve, add studies, users, model store, supervoxels, starter training)."""
