"""emergence-ray: many Ray workers, each on its shard, train one image classifier together."""

__version__ = "0.1.0"
