"""Pruning as pure transforms over parameter pytrees.

Masks (magnitude layer/global, random, N:M, channel), schedules, an optax wrapper that
keeps the params pruned, reports, packed storage and channel shrinking.
"""

from jaxopt_dnn.sparsity.export import PackedArray
from jaxopt_dnn.sparsity.export import pack
from jaxopt_dnn.sparsity.export import pack_sparse
from jaxopt_dnn.sparsity.export import shrink_channels
from jaxopt_dnn.sparsity.export import shrunk_apply
from jaxopt_dnn.sparsity.export import strip
from jaxopt_dnn.sparsity.export import tree_bytes
from jaxopt_dnn.sparsity.export import unpack
from jaxopt_dnn.sparsity.masks import apply_masks
from jaxopt_dnn.sparsity.masks import channel_masks
from jaxopt_dnn.sparsity.masks import check_mask_tree
from jaxopt_dnn.sparsity.masks import dense_marker
from jaxopt_dnn.sparsity.masks import erk_sparsities
from jaxopt_dnn.sparsity.masks import is_dense
from jaxopt_dnn.sparsity.masks import magnitude_masks
from jaxopt_dnn.sparsity.masks import nm_group_axes
from jaxopt_dnn.sparsity.masks import nm_masks
from jaxopt_dnn.sparsity.masks import random_masks
from jaxopt_dnn.sparsity.masks import removable_kernels
from jaxopt_dnn.sparsity.masks import smallest_k_masks
from jaxopt_dnn.sparsity.optimizer import PruneState
from jaxopt_dnn.sparsity.optimizer import masks_from_state
from jaxopt_dnn.sparsity.optimizer import prune_optimizer
from jaxopt_dnn.sparsity.report import SparsityReport
from jaxopt_dnn.sparsity.report import sparsity_report
from jaxopt_dnn.sparsity.schedules import constant_schedule
from jaxopt_dnn.sparsity.schedules import polynomial_schedule
from jaxopt_dnn.sparsity.oneshot import oneshot
