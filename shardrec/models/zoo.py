"""Imports every model module so that each registers itself."""

from shardrec.models import deepfm, dlrm, widedeep  # noqa: F401
