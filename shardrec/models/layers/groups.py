"""Feature groups: which features each part of a model reads (``model.feature_groups``), as
TorchEasyRec's ``feature_groups`` configure them (e.g. Wide & Deep's wide and deep groups).

A model names its parts; a config maps some of them to lists of sparse and dense feature names,
and a part left out reads every feature (the default, so an unset ``feature_groups`` changes
nothing). A group's features keep schema order, whatever order the list gives.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class FeatureGroup:
    """The features one part of a model reads."""

    schema: FeatureSchema
    """The group's sparse features and their tables and its dense features, in schema order; the
    whole schema for a part that reads every feature."""
    dense_columns: list[int] | None
    """Positions of the group's dense features in the dense tensor; None: every column, in order."""


def check_group_names(groups: dict[str, list[str]], *, parts: dict[str, str]) -> None:
    """Config-level checks of ``model.feature_groups``: known group names (``parts`` maps each to
    what it feeds), non-empty lists, no feature twice in a group."""
    known = ", ".join(f"{name} ({what})" for name, what in parts.items())
    for name, features in groups.items():
        if name not in parts:
            raise ConfigError(f"'model.feature_groups' has unknown group '{name}'; this model's groups: {known}")
        if not features:
            raise ConfigError(f"'model.feature_groups.{name}' lists no features; name at least one, or remove "
                              "the group to have that part read every feature")
        if len(set(features)) != len(features):
            raise ConfigError(f"'model.feature_groups.{name}' names a feature twice: {features}")


def resolve_groups(
    groups: dict[str, list[str]], schema: FeatureSchema, *, parts: list[str], model: str,
    defaults: dict[str, list[str]] | None = None,
) -> dict[str, FeatureGroup]:
    """Every part's :class:`FeatureGroup` for ``schema``: its configured features, else its
    ``defaults`` entry, else every feature.

    Raises a ConfigError naming a group's unknown feature (and the known ones), or, when every part
    has a group, the features none reads.
    """
    known = schema.sparse_names + schema.dense_names
    for name, features in groups.items():
        unknown = [f for f in features if f not in known]
        if unknown:
            raise ConfigError(
                f"'model.feature_groups.{name}' names unknown feature '{unknown[0]}'; model '{model}' knows "
                f"{', '.join(known)} (features.sparse and features.dense)"
            )
    if all(p in groups for p in parts):
        read = {f for p in parts for f in groups[p]}
        unread = [f for f in known if f not in read]
        if unread:
            raise ConfigError(
                f"features {', '.join(unread)} are in no group of 'model.feature_groups' ({', '.join(parts)}); "
                "add each to a group, or remove it from 'features'"
            )
    chosen = {**(defaults or {}), **groups}
    return {p: group_of(schema, chosen[p]) if p in chosen else FeatureGroup(schema=schema, dense_columns=None) for p in parts}


def field_names(schema: FeatureSchema) -> list[str]:
    """The fields of an interaction part by default: every sparse feature, or, in a schema of dense
    features alone, every dense feature (each then embedded as a field)."""
    return schema.sparse_names or schema.dense_names


def group_of(schema: FeatureSchema, names: list[str]) -> FeatureGroup:
    """The :class:`FeatureGroup` of the features ``names`` of ``schema``, in schema order."""
    chosen = set(names)
    sparse = [f for f in schema.sparse if f.name in chosen]
    tables = {f.table for f in sparse}
    columns = [i for i, f in enumerate(schema.dense) if f.name in chosen]
    sub = FeatureSchema(
        label=schema.label, dense=[schema.dense[i] for i in columns], sparse=sparse,
        tables=[t for t in schema.tables if t.name in tables],
    )
    return FeatureGroup(schema=sub, dense_columns=None if columns == list(range(len(schema.dense))) else columns)
