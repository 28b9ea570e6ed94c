"""bertforge data_prep: corpora -> cleaned sentences -> WordPiece -> instances -> WebDataset shards.

Imports nothing from ``pretrain``: it runs on CPU-only prep nodes without the training stack.
"""
__version__ = "0.1.0"
