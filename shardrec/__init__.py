"""shardrec: train recommendation models with sharded embedding tables on TorchRec."""

__version__ = "0.1.0"
