"""Config checks the models share; each error names the config key to change."""

from __future__ import annotations

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError


def check_layer_sizes(sizes: list[int], *, key: str) -> None:
    """Raises a ConfigError naming ``key`` unless ``sizes`` is a non-empty list of positive ints."""
    if not sizes or any(s <= 0 for s in sizes):
        raise ConfigError(f"'{key}' must be a non-empty list of positive layer widths, got {sizes}")


def check_features(schema: FeatureSchema, *, model: str, needs_ids: str | None = None) -> None:
    """Raises a ConfigError unless ``schema`` has a feature the model can read.

    Any schema with a dense or a sparse feature will do, unless ``needs_ids`` is set: then the
    model cannot work without sparse features, and ``needs_ids`` says why in the error.
    """
    if needs_ids is not None and not schema.sparse:
        raise ConfigError(
            f"model '{model}' needs at least one sparse feature ({needs_ids}); add one under 'features.sparse', "
            "or choose a model that reads dense features alone (e.g. deepfm, autoint, dcn)"
        )
    if not schema.sparse and not schema.dense:
        raise ConfigError(f"model '{model}' has no features to read; add some under 'features.sparse' or 'features.dense'")


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


def field_dim(schema: FeatureSchema, *, configured: int | None, model: str) -> int:
    """Width D of the model's fields (``schema``: the features they are made of): the tables' shared
    embedding_dim, or ``model.dense_embedding_dim`` (``configured``) when every field is an embedded
    dense feature.

    Raises a ConfigError when neither gives a width, or when both do and they differ.
    """
    if not schema.tables:
        if configured is None:
            raise ConfigError(
                f"model '{model}' embeds each dense feature as a field, and no sparse feature among its fields has a "
                "table whose embedding_dim would set their width; set 'model.dense_embedding_dim' (e.g. 16)"
            )
        return configured
    dim = shared_embedding_dim(schema, model=model)
    if configured is not None and configured != dim:
        raise ConfigError(
            f"'model.dense_embedding_dim' is {configured}, but the dense fields share the tables' embedding_dim "
            f"({dim}); remove 'model.dense_embedding_dim' or set it to {dim}"
        )
    return dim


def check_dense_embedding_dim(value: int | None) -> None:
    """Raises a ConfigError naming ``model.dense_embedding_dim`` unless it is unset or positive."""
    if value is not None and value <= 0:
        raise ConfigError(f"'model.dense_embedding_dim' must be > 0 (or unset), got {value}")
