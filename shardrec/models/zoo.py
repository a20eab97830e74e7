"""Imports every model module so that each registers itself."""

from shardrec.models import deepfm, dlrm, widedeep  # noqa: F401
from shardrec.models import autoint, dcn, dcnv2, xdeepfm  # noqa: F401
from shardrec.models import masknet, multitower, rocket_launching, wukong  # noqa: F401
from shardrec.models import bst, dien, din  # noqa: F401
from shardrec.models import dssm  # noqa: F401
from shardrec.models import comirec, mind, youtubednn  # noqa: F401
from shardrec.models import gru4rec, hstu, sasrec  # noqa: F401
from shardrec.models import hllm  # noqa: F401
from shardrec.models import aitm, esmm, mmoe, ple, sharedbottom  # noqa: F401
