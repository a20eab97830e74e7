"""Building blocks every model uses: the MLP, activations, self-attention and the transformer
block, embedding helpers, the first-order (linear) part, feature groups and config checks.

Everything here is created on the ``device`` it is given, which may be ``torch.device("meta")``
(the sharding planner builds models there). DistributedModelParallel re-creates meta buffers as
zeros, so any constant a forward needs is computed in the forward; the only buffers are running
statistics (:class:`BatchNorm`, :class:`Dice`), which the trainer resets through their
``reset_running_stats`` once the model is placed. Nothing here registers a model, so any model
may import it.
"""

from shardrec.models.layers.activation import ACTIVATIONS, Activation, Dice, PReLU, build_activation
from shardrec.models.layers.attention import MultiHeadSelfAttention, TransformerBlock, attention_mask, causal_mask
from shardrec.models.layers.checks import (
    check_dense_embedding_dim,
    check_features,
    check_layer_sizes,
    field_dim,
    shared_embedding_dim,
)
from shardrec.models.layers.embedding import (
    DenseFieldEmbedding,
    PositionEmbedding,
    bag_config,
    build_ebc,
    build_ebc_if_tables,
    embedding_output_dim,
    pooled_by_feature,
    pooled_embeddings,
    select_columns,
    stack_fields,
)
from shardrec.models.layers.first_order import FIRST_ORDER_DIM, LINEAR_SUFFIX, FirstOrder, build_linear_ebc
from shardrec.models.layers.groups import FeatureGroup, check_group_names, field_names, group_of, resolve_groups
from shardrec.models.layers.mlp import MLP, NORMS, BatchNorm, MLPConfig, Norm, mlp_block

__all__ = [
    "ACTIVATIONS", "MLPConfig", "NORMS", "BatchNorm", "Norm", "PReLU", "mlp_block",
    "FIRST_ORDER_DIM", "LINEAR_SUFFIX", "MLP", "Activation", "DenseFieldEmbedding", "Dice", "FeatureGroup", "FirstOrder",
    "MultiHeadSelfAttention", "PositionEmbedding", "TransformerBlock", "attention_mask", "bag_config",
    "build_activation", "build_ebc", "build_ebc_if_tables", "build_linear_ebc", "causal_mask",
    "check_dense_embedding_dim", "check_features", "check_group_names", "check_layer_sizes", "embedding_output_dim",
    "field_dim", "field_names", "group_of", "pooled_by_feature", "pooled_embeddings", "resolve_groups", "select_columns",
    "shared_embedding_dim", "stack_fields",
]
