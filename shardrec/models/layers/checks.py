"""Config checks the models share; each error names the config key to change."""

from __future__ import annotations

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError


def check_layer_sizes(sizes: list[int], *, key: str) -> None:
    """Raises a ConfigError naming ``key`` unless ``sizes`` is a non-empty list of positive ints."""
    if not sizes or any(s <= 0 for s in sizes):
        raise ConfigError(f"'{key}' must be a non-empty list of positive layer widths, got {sizes}")


def check_features(schema: FeatureSchema, *, model: str) -> None:
    """Raises a ConfigError unless ``schema`` has at least one dense and one sparse feature."""
    if not schema.dense:
        raise ConfigError(f"model '{model}' needs at least one dense feature; add one under 'features.dense'")
    if not schema.sparse:
        raise ConfigError(f"model '{model}' needs at least one sparse feature; add one under 'features.sparse'")


def shared_embedding_dim(schema: FeatureSchema, *, model: str) -> int:
    """Returns the embedding_dim every table shares, or raises a ConfigError naming the tables."""
    dims = {t.embedding_dim for t in schema.tables}
    if len(dims) != 1:
        listing = ", ".join(f"{t.name}={t.embedding_dim}" for t in schema.tables)
        raise ConfigError(
            f"model '{model}' needs every table to have the same embedding_dim, but the tables differ "
            f"({listing}); set the same 'embedding_dim' on every table under 'features.tables'"
        )
    return dims.pop()
