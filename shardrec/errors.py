"""Errors shardrec raises for bad input; each message names the key, file or feature and the fix."""


class ShardrecError(Exception):
    """Base class of every user-facing shardrec error."""


class ConfigError(ShardrecError):
    """A job config key or value is invalid."""


class DataError(ShardrecError):
    """Input data is missing, malformed or inconsistent with the feature schema."""


class PlanError(ShardrecError):
    """The sharding plan cannot be made or does not match the model."""


class CheckpointError(ShardrecError):
    """A checkpoint is missing, partial or does not match the model."""


class LaunchError(ShardrecError):
    """A job cannot be submitted to a scheduler, or the scheduler does not know it."""


class RankLostError(ShardrecError):
    """Another rank stopped answering: a collective timed out or lost its peer."""
