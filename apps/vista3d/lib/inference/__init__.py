"""The inference core: preprocessing, the network's automatic and click paths, stitching and edits."""
