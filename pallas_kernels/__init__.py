"""Pallas attention kernels for sparrow-jax: VATA draft attention, tree-verify (split-K) attention and
blockwise prefill attention (with segment ids and a custom VJP), plus plain-jnp references and the
dispatch behind `sparrow_jax.models.attention.attention(..., impl=AttentionImpl("pallas"))`.

On CPU every kernel runs under the Pallas interpreter (chosen automatically). GPU (Triton) and TPU
(Mosaic) builds lower (checked by cross-platform export in the tests) but have not been compiled or
run on hardware. See README.md in this directory.
"""

from pallas_kernels.common import Backend
from pallas_kernels.prefill import prefill_attention
from pallas_kernels.reference import prefill_reference, tree_verify_reference, vata_reference
from pallas_kernels.tree_verify import tree_verify_attention
from pallas_kernels.vata import vata_attention

__all__ = ["Backend", "prefill_attention", "prefill_reference", "tree_verify_attention", "tree_verify_reference",
           "vata_attention", "vata_reference"]
