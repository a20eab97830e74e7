"""Imports every model module so that each registers itself."""

from shardrec.models import deepfm, dlrm, widedeep  # noqa: F401
from shardrec.models import autoint, dcn, dcnv2, xdeepfm  # noqa: F401
from shardrec.models import masknet, multitower, rocket_launching, wukong  # noqa: F401
from shardrec.models import bst, dien, din  # noqa: F401
